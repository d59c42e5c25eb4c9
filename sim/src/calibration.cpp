#include "actsim/sim/calibration.hpp"

#include <fmt/format.h>

#include <fstream>
#include <sstream>

#include "actsim/util/error.hpp"
#include "actsim/sim/engine.hpp"

namespace actsim::sim {

using nlohmann::json;

std::string calibration_kind(const graph::Graph& g, const graph::Op& op) {
  if ((op.kind == graph::OpKind::backward || op.kind == graph::OpKind::recompute) && op.forward != graph::kNoOp) {
    return fmt::format("{}.{}", to_string(op.kind), to_string(g.op(op.forward).kind));
  }
  return std::string(to_string(op.kind));
}

int64_t Calibration::op_time_ns(const graph::Graph& g, const graph::Op& op, const DeviceSpec& d) const {
  if (op.kernels == 0) return 0;
  if (auto it = seconds_by_name.find(op.name); it != seconds_by_name.end()) {
    // The same name with other shapes (another model size) is another op: scale by kind instead.
    auto sig = signature_by_name.find(op.name);
    if (sig == signature_by_name.end() || (sig->second.first == op.flops && sig->second.second == op.bytes_moved)) {
      return static_cast<int64_t>(it->second * 1e9 + 0.5);
    }
  }
  const int64_t roofline = sim::op_time_ns(g, op, d);
  if (auto it = scale_by_kind.find(calibration_kind(g, op)); it != scale_by_kind.end()) {
    return static_cast<int64_t>(static_cast<double>(roofline) * it->second + 0.5);
  }
  return roofline;
}

json calibration_json(const graph::Graph& g, std::span<const double> measured_s, std::span<const int64_t> predicted_ns,
                      const std::string& device, const std::string& backend) {
  ACTSIM_ASSERT(measured_s.size() == g.n_ops() && predicted_ns.size() == g.n_ops(), "one time per op");
  std::map<std::string, std::pair<double, int>> by_name;
  std::map<std::string, std::pair<double, double>> by_kind;  // measured s, predicted s
  json ops = json::array();
  double total = 0;
  for (size_t i = 0; i < g.n_ops(); ++i) {
    const graph::Op& op = g.ops()[i];
    if (op.kernels == 0) continue;
    total += measured_s[i];
    auto& n = by_name[op.name];
    n.first += measured_s[i];
    ++n.second;
    auto& k = by_kind[calibration_kind(g, op)];
    k.first += measured_s[i];
    k.second += static_cast<double>(predicted_ns[i]) * 1e-9;
    ops.push_back({{"op", i}, {"name", op.name}, {"kind", calibration_kind(g, op)}, {"seconds", measured_s[i]},
                   {"predicted_seconds", static_cast<double>(predicted_ns[i]) * 1e-9}});
  }
  json names = json::object();
  for (const auto& [name, v] : by_name) names[name] = v.first / v.second;
  // What each name was measured at (flops, bytes moved): a calibration applies by name only to
  // the same shapes. Duplicate names keep the first op's signature.
  json sigs = json::object();
  for (size_t i = 0; i < g.n_ops(); ++i) {
    const graph::Op& op = g.ops()[i];
    if (op.kernels != 0 && !sigs.contains(op.name)) sigs[op.name] = json::array({op.flops, op.bytes_moved});
  }
  json kinds = json::object();
  for (const auto& [kind, v] : by_kind) {
    kinds[kind] = {{"seconds", v.first}, {"predicted_seconds", v.second},
                   {"scale", v.second > 0 ? v.first / v.second : 0.0}};
  }
  return {{"format", "actsim-calibration"}, {"version", 1},     {"device", device},
          {"backend", backend},             {"step_seconds", total},
          {"by_name", names},               {"signature", sigs}, {"by_kind", kinds}, {"ops", ops}};
}

Calibration load_calibration(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw InputError(fmt::format("{}: cannot read the calibration file", path));
  std::stringstream ss;
  ss << in.rdbuf();
  json j = json::parse(ss.str(), nullptr, false);
  if (j.is_discarded() || !j.is_object()) throw InputError(fmt::format("{}: not a JSON object (a calibration file)", path));
  if (!j.contains("format") || j["format"] != "actsim-calibration") {
    throw InputError(fmt::format("{}: format is not \"actsim-calibration\"", path));
  }
  Calibration c;
  c.file = path;
  if (j.contains("device") && j["device"].is_string()) c.device = j["device"];
  if (j.contains("backend") && j["backend"].is_string()) c.backend = j["backend"];
  if (!j.contains("by_name") || !j["by_name"].is_object()) throw InputError(fmt::format("{}: by_name must be an object", path));
  for (const auto& [name, v] : j["by_name"].items()) {
    if (!v.is_number() || v.get<double>() < 0) {
      throw InputError(fmt::format("{}: by_name.\"{}\" must be a non-negative number of seconds", path, name));
    }
    c.seconds_by_name[name] = v.get<double>();
  }
  if (j.contains("signature") && j["signature"].is_object()) {
    for (const auto& [name, v] : j["signature"].items()) {
      if (!v.is_array() || v.size() != 2 || !v[0].is_number() || !v[1].is_number_integer()) {
        throw InputError(fmt::format("{}: signature.\"{}\" must be [flops, bytes_moved]", path, name));
      }
      c.signature_by_name[name] = {v[0].get<double>(), v[1].get<int64_t>()};
    }
  }
  if (j.contains("by_kind")) {
    if (!j["by_kind"].is_object()) throw InputError(fmt::format("{}: by_kind must be an object", path));
    for (const auto& [kind, v] : j["by_kind"].items()) {
      if (!v.is_object() || !v.contains("scale") || !v["scale"].is_number() || v["scale"].get<double>() < 0) {
        throw InputError(fmt::format("{}: by_kind.\"{}\".scale must be a non-negative number", path, kind));
      }
      if (v["scale"].get<double>() > 0) c.scale_by_kind[kind] = v["scale"].get<double>();
    }
  }
  return c;
}


}  // namespace actsim::sim
