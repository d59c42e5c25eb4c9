#include "actsim/sim/device.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <mutex>
#include <toml++/toml.h>

#include "actsim/util/error.hpp"

namespace actsim::sim {

double DeviceSpec::flops(graph::DType t) const {
  switch (t) {
    case graph::DType::bf16: return flops_bf16;
    case graph::DType::f16: return flops_fp16;
    default: return flops_fp32;
  }
}

std::string data_dir() {
  if (const char* d = std::getenv("ACTSIM_DATA")) return d;
  return std::string(ACTSIM_SOURCE_DIR) + "/scenarios";
}

int edit_distance(const std::string& a, const std::string& b) {
  std::vector<int> prev(b.size() + 1), cur(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) prev[j] = static_cast<int>(j);
  for (size_t i = 1; i <= a.size(); ++i) {
    cur[0] = static_cast<int>(i);
    for (size_t j = 1; j <= b.size(); ++j) {
      int sub = prev[j - 1] + (std::tolower(a[i - 1]) == std::tolower(b[j - 1]) ? 0 : 1);
      cur[j] = std::min({prev[j] + 1, cur[j - 1] + 1, sub});
    }
    std::swap(prev, cur);
  }
  return prev[b.size()];
}

std::string closest(const std::string& s, const std::vector<std::string>& names) {
  std::string best;
  int best_d = 1 << 30;
  for (const auto& n : names) {
    int d = edit_distance(s, n);
    if (d < best_d) best_d = d, best = n;
  }
  return best_d <= std::max<int>(2, static_cast<int>(s.size()) / 3) ? best : "";
}

namespace {
std::vector<DeviceSpec> load_devices() {
  const std::string path = data_dir() + "/devices.toml";
  toml::table t;
  try {
    t = toml::parse_file(path);
  } catch (const toml::parse_error& e) {
    throw InputError(fmt::format("{}:{}: {}", path, e.source().begin.line, e.description()));
  }
  std::vector<DeviceSpec> out;
  for (auto&& [key, node] : t) {
    const toml::table* d = node.as_table();
    if (!d) continue;
    const toml::key& name = key;  // a lambda may not capture a structured binding before C++20 (clang 14)
    auto num = [&](const char* key) -> double {
      auto v = (*d)[key].value<double>();
      if (!v || *v < 0) {
        throw InputError(fmt::format("{}:{}: {}.{} must be a non-negative number", path,
                                     d->source().begin.line, name.str(), key));
      }
      return *v;
    };
    DeviceSpec s;
    s.name = std::string(name.str());
    s.memory_bytes = static_cast<int64_t>(num("memory_gib") * 1024.0 * 1024.0 * 1024.0);
    s.flops_fp32 = num("flops_fp32");
    s.flops_tf32 = (*d)["flops_tf32"].value_or(0.0);
    s.flops_bf16 = num("flops_bf16");
    s.flops_fp16 = num("flops_fp16");
    s.mem_bandwidth = num("mem_bandwidth");
    s.host_bandwidth = num("host_bandwidth");
    s.launch_overhead_ns = static_cast<int64_t>(num("launch_overhead_ns"));
    s.matmul_efficiency = (*d)["matmul_efficiency"].value_or(0.7);
    // issue 13: optional link figures (collectives)
    s.link_bandwidth = (*d)["link_bandwidth"].value_or(0.0);
    s.network_bandwidth = (*d)["network_bandwidth"].value_or(0.0);
    s.link_latency_ns = (*d)["link_latency_ns"].value_or(int64_t{0});
    s.gpus_per_node = (*d)["gpus_per_node"].value_or(int64_t{8});
    if (s.link_bandwidth < 0 || s.network_bandwidth < 0 || s.link_latency_ns < 0 || s.gpus_per_node < 1) {
      throw InputError(fmt::format("{}:{}: {}: link figures must be non-negative (gpus_per_node positive)", path,
                                   d->source().begin.line, name.str()));
    }
    s.source = (*d)["source"].value_or(std::string{});
    out.push_back(std::move(s));
  }
  return out;
}
}  // namespace

const std::vector<DeviceSpec>& devices() {
  static std::vector<DeviceSpec> d = load_devices();
  return d;
}

const DeviceSpec& find_device(const std::string& name, const std::string& where) {
  std::vector<std::string> names;
  for (const DeviceSpec& d : devices()) {
    if (d.name == name) return d;
    names.push_back(d.name);
  }
  std::string hint = closest(name, names);
  throw InputError(fmt::format("{}: unknown device \"{}\"{} (known: {})", where, name,
                               hint.empty() ? "" : fmt::format("; did you mean \"{}\"?", hint),
                               fmt::join(names, ", ")));
}

}  // namespace actsim::sim
