// The schedule writer: a Schedule as JSON lines (docs/schedule-format.md), and model_json.
#include <fmt/format.h>

#include <cmath>
#include <nlohmann/json.hpp>

#include "actsim/schedule/schedule.hpp"
#include "format_names.hpp"

namespace actsim::schedule {

using namespace format;
using graph::OpId;

using graph::Category;
using graph::DType;
using graph::Graph;
using graph::Location;
using graph::Op;
using graph::OpKind;
using graph::Phase;
using graph::StorageId;
using graph::TensorId;
using nlohmann::json;
using Kind = ScheduleEntry::Kind;

namespace {

// JSON has no infinity: masked_fill's -inf travels as the string "-inf".
json num(double v) {
  if (std::isfinite(v)) return v;
  if (std::isnan(v)) return "nan";
  return v > 0 ? "inf" : "-inf";
}

json ids(const std::vector<TensorId>& v) {
  json a = json::array();
  for (TensorId t : v) a.push_back(t == graph::kNoTensor ? -1 : static_cast<int64_t>(graph::index(t)));
  return a;
}

json op_record(const Op& op) {
  json o;
  o["kind"] = std::string(to_string(op.kind));
  o["name"] = op.name;
  o["phase"] = std::string(to_string(op.phase));
  o["layer"] = op.layer;
  o["inputs"] = ids(op.inputs);
  o["outputs"] = ids(op.outputs);
  if (!op.saved.empty()) o["saved"] = ids(op.saved);
  if (!op.holds.empty()) o["holds"] = ids(op.holds);
  if (!op.releases.empty()) o["releases"] = ids(op.releases);
  if (op.workspace_bytes) o["workspace_bytes"] = op.workspace_bytes;
  if (op.flops) o["flops"] = op.flops;
  if (op.bytes_moved) o["bytes_moved"] = op.bytes_moved;
  if (op.kernels != 1) o["kernels"] = op.kernels;
  if (op.forward != graph::kNoOp) o["forward"] = graph::index(op.forward);
  if (!op.grad_outputs.empty()) {
    o["grad_outputs"] = ids(op.grad_outputs);
    o["grad_of"] = op.grad_of;
  }
  if (op.kind == OpKind::backward) {
    o["n_grad_inputs"] = op.n_grad_inputs;
    o["grad_in_of"] = op.grad_in_of;
  }
  if (op.stream) o["stream"] = op.stream;
  if (!op.after.empty()) {
    json a = json::array();
    for (OpId x : op.after) a.push_back(graph::index(x));
    o["after"] = a;
  }
  if (op.region >= 0) o["region"] = op.region;
  if (op.cached) o["cached"] = true;
  if (op.offload) o["offload"] = true;
  if (op.recompute) o["recompute"] = true;
  const graph::OpParams& p = op.params;
  json pj = json::object();
  if (p.view != graph::ViewKind::none) pj["view"] = std::string(kViewNames[static_cast<size_t>(p.view)]);
  if (p.dim0) pj["dim0"] = p.dim0;
  if (p.dim1) pj["dim1"] = p.dim1;
  if (p.start) pj["start"] = p.start;
  if (p.step != 1) pj["step"] = p.step;
  if (p.scalar != 0) pj["scalar"] = num(p.scalar);
  if (p.optim.step != graph::OptimStep::none) {
    const graph::OptimParams& q = p.optim;
    pj["optim"] = {{"step", std::string(kOptimNames[static_cast<size_t>(q.step)])},
                   {"full", q.full},
                   {"decoupled", q.decoupled},
                   {"lr", num(q.lr)},
                   {"beta1", num(q.beta1)},
                   {"beta2", num(q.beta2)},
                   {"eps", num(q.eps)},
                   {"weight_decay", num(q.weight_decay)},
                   {"momentum", num(q.momentum)}};
  }
  if (!pj.empty()) o["params"] = pj;
  return o;
}

}  // namespace

std::string_view to_string(Kind k) { return kEntryNames[static_cast<size_t>(k)]; }

nlohmann::json model_json(const graph::ModelConfig& m) {
  return {{"family", graph::to_string(m.family)}, {"vocab_size", m.vocab_size}, {"seq_len", m.seq_len},
          {"d_model", m.d_model},      {"n_heads", m.n_heads},       {"n_kv_heads", m.kv_heads()},
          {"n_layers", m.n_layers},    {"d_ff", m.ff()},             {"dropout", m.dropout},
          {"attention", graph::to_string(m.attention)},              {"tie_embeddings", m.tied()},
          {"rope_theta", m.rope_theta}};
}

std::string to_text(const Schedule& s) {
  const Graph& g = s.graph();
  const graph::ModelConfig& m = s.model;
  json h;
  h["format"] = "actsim-schedule";
  h["version"] = kFormatVersion;
  h["scenario"] = model_json(m);
  h["scenario"]["name"] = s.scenario_name;
  h["scenario"].update({
                   {"batch_size", s.training.batch_size},
                   {"dtype", std::string(graph::to_string(s.training.dtype))},
                   {"optimizer", std::string(to_string(s.training.optimizer))},
                   {"optimizer_impl", std::string(to_string(s.step.optimizer_impl))},
                   {"profile", std::string(to_string(s.profile))},
                   {"device", s.device}});
  h["simulated"] = {{"peak_bytes", s.simulated_peak_bytes},
                    {"live_step_start", s.simulated_live_step_start},
                    {"step_time_ns", s.simulated_step_time_ns}};
  h["counts"] = {{"storages", g.storages().size()},
                 {"tensors", g.tensors().size()},
                 {"ops", g.n_ops()},
                 {"entries", s.entries.size()}};
  h["n_layers"] = g.n_layers;
  h["params"] = ids(s.step.params);
  h["param_grads"] = ids(s.step.param_grads);
  h["loss"] = s.step.loss == graph::kNoTensor ? -1 : static_cast<int64_t>(graph::index(s.step.loss));
  std::string out = h.dump() + "\n";
  for (size_t i = 0; i < g.storages().size(); ++i) {
    const graph::Storage& st = g.storages()[i];
    out += json::array({"storage", i, st.bytes, std::string(to_string(st.category)),
                        st.location == Location::host ? "host" : "device", st.layer, st.keep ? 1 : 0})
               .dump();
    out += "\n";
  }
  for (size_t i = 0; i < g.tensors().size(); ++i) {
    const graph::Tensor& t = g.tensors()[i];
    out += json::array({"tensor", i, t.name, t.shape, t.strides, t.offset, std::string(graph::to_string(t.dtype)),
                        graph::index(t.storage), t.is_view ? 1 : 0, t.requires_grad ? 1 : 0})
               .dump();
    out += "\n";
  }
  for (size_t i = 0; i < g.n_ops(); ++i) {
    out += json::array({"op", i, op_record(g.ops()[i])}).dump();
    out += "\n";
  }
  for (const ScheduleEntry& e : s.entries) {
    const std::string k(to_string(e.kind));
    json a;
    switch (e.kind) {
      case Kind::alloc: {
        const graph::Storage& st = g.storages()[e.id];
        const DType dt = st.first == graph::kNoTensor ? DType::u8 : g.tensor(st.first).dtype;
        a = json::array({k, e.id, e.bytes, std::string(to_string(st.category)), std::string(graph::to_string(dt)),
                         e.live, e.time_ns});
        break;
      }
      case Kind::run: a = json::array({k, e.id, e.time_ns, e.duration_ns}); break;
      case Kind::free: a = json::array({k, e.id, e.live, e.time_ns}); break;
      case Kind::ws_alloc:
      case Kind::ws_free: a = json::array({k, e.id, e.bytes, e.live, e.time_ns}); break;
    }
    out += a.dump();
    out += "\n";
  }
  out += json::array({"end", s.entries.size()}).dump() + "\n";
  return out;
}

}  // namespace actsim::schedule
