// Lowering and simulating one scenario: analyze(), the per-block plan of a policy, the batch search.
#include "actsim/study/analyze.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <map>
#include <tuple>

#include "actsim/graph/profile.hpp"
#include "actsim/study/planner.hpp"
#include "actsim/util/error.hpp"

namespace actsim::study {

using sim::Plan;
using sim::ByteOverflow;
using sim::simulate;

using graph::Category;
using graph::Location;

graph::BlockPlan block_plan_of(const Scenario& s) {
  if (s.block_plan) return *s.block_plan;
  const graph::CheckpointPolicy p = graph::parse_policy(s.checkpoint_policy, s.where("checkpoint.policy"));
  if (p.kind == graph::CheckpointPolicy::Kind::budget) {
    // The planner's plan (the least-memory plan when nothing fits the budget).
    Scenario t = s;
    t.checkpoint_policy = "none";
    return plan_for_budget(t, p.budget_bytes).plan;
  }
  return graph::block_plan(p, s.model.n_layers);
}

Analysis analyze(const Scenario& s) { return analyze(s, s.runtime()); }

Analysis analyze(const Scenario& s, const graph::RuntimeProfile& runtime) {
  Analysis a;
  a.scenario = s;
  a.block_plan = block_plan_of(s);
  a.step = std::make_unique<graph::StepGraph>(
      graph::lower_training_step(s.model, s.training, runtime, &a.block_plan));
  try {
    a.plan = std::make_unique<Plan>(a.step->graph, s.device);
  } catch (const ByteOverflow& e) {
    throw ByteOverflow(fmt::format("{}, {}, {}, {}: {}", s.where("model.n_layers"), s.where("model.seq_len"),
                                   s.where("training.batch_size"), s.where("model.d_model"), e.what()));
  }
  a.result = simulate(*a.plan);
  const graph::Graph& g = a.step->graph;
  for (graph::TensorId p : a.step->params) {
    a.params_bytes += g.storage(g.tensor(p).storage).bytes;
    a.param_count += graph::numel(g.tensor(p).shape);
  }
  for (graph::TensorId t : a.step->param_grads) {
    if (t != graph::kNoTensor) a.grads_bytes += g.storage(g.tensor(t).storage).bytes;
  }
  for (const graph::Storage& st : g.storages()) {
    if (st.producer != graph::kNoOp) continue;
    if (st.category == Category::optimizer_state) {
      (st.location == Location::host ? a.optimizer_host_bytes : a.optimizer_bytes) += st.bytes;
    }
    if (st.category == Category::buffer) a.buffers_bytes += st.bytes;
    if (st.category == Category::input) a.inputs_bytes += st.bytes;
  }
  // Kept for backward: device storages that exist when backward starts (from before the step or
  // from a forward op) and that a backward-phase op (backward, recompute, prefetch) reads or holds;
  // parameters, buffers, optimizer state and gradients aside. Without checkpointing these are
  // exactly the storages autograd saves; with it, what each block keeps through the forward pass.
  const size_t n_st = g.storages().size();
  std::vector<bool> kept(n_st, false);
  auto keepable = [&](graph::StorageId sid) {
    const graph::Storage& st = g.storage(sid);
    if (st.location == Location::host) return false;
    if (st.category == Category::parameter || st.category == Category::buffer ||
        st.category == Category::optimizer_state || st.category == Category::gradient) {
      return false;
    }
    if (st.producer == graph::kNoOp) return true;
    const graph::Op& by = g.op(st.producer);
    // checkpoint's RNG stash is kept, but it is no saved tensor (the saved-tensor hooks never see it)
    return by.phase == graph::Phase::forward && by.kind != graph::OpKind::rng_stash;
  };
  for (const graph::Op& op : g.ops()) {
    if (op.phase == graph::Phase::forward) continue;
    for (const auto* list : {&op.inputs, &op.holds}) {
      for (graph::TensorId t : *list) {
        graph::StorageId sid = g.tensor(t).storage;
        if (keepable(sid)) kept[graph::index(sid)] = true;
      }
    }
  }
  // Each kept storage counts in the block of the first forward op that keeps it: saves it, or
  // (in a recompute region) reads it from outside the region, or caches it (ops:LIST).
  a.per_layer_saved.assign(static_cast<size_t>(g.n_layers), 0);
  std::vector<bool> counted(n_st, false);
  auto count = [&](const graph::Op& op, graph::TensorId t) {
    graph::StorageId sid = g.tensor(t).storage;
    const size_t i = graph::index(sid);
    if (!kept[i] || counted[i]) return;
    counted[i] = true;
    const graph::Storage& st = g.storage(sid);
    a.saved_bytes += st.bytes;
    if (op.layer >= 0) a.per_layer_saved[static_cast<size_t>(op.layer)] += st.bytes;
    else a.outside_saved += st.bytes;
    if (op.layer == 0) {
      std::string name = op.name.rfind("blocks.0.", 0) == 0 ? op.name.substr(9) : op.name;
      const graph::Tensor& tt = g.tensor(st.first);
      a.block_saved.push_back({name, tt.name.rfind("blocks.0.", 0) == 0 ? tt.name.substr(9) : tt.name, tt.shape,
                               tt.dtype, st.bytes});
    }
  };
  for (const graph::Op& op : g.ops()) {
    if (op.phase != graph::Phase::forward) break;
    if (op.region < 0) {
      for (graph::TensorId t : op.saved) count(op, t);
    } else {
      for (graph::TensorId t : op.inputs) count(op, t);
      for (graph::TensorId t : op.saved) count(op, t);  // what the region keeps past its hooks (kept only)
      if (op.cached) {
        for (graph::TensorId t : op.outputs) count(op, t);
      }
    }
  }
  for (size_t i = 0; i < n_st; ++i) {  // anything else kept (never expected): outside the blocks
    if (kept[i] && !counted[i]) a.saved_bytes += g.storages()[i].bytes, a.outside_saved += g.storages()[i].bytes;
  }
  return a;
}

int64_t max_batch_size(const Scenario& s) {
  auto fits = [&](int64_t b) {
    Scenario t = s;
    t.training.batch_size = b;
    graph::BlockPlan bp = block_plan_of(t);
    graph::StepGraph step = graph::lower_training_step(t.model, t.training, t.runtime(), &bp);
    try {
      Plan plan(step.graph, t.device);
      return simulate(plan).peak_bytes <= t.device.memory_bytes;
    } catch (const ByteOverflow&) {
      return false;  // a batch whose byte counts overflow int64 does not fit
    }
  };
  if (!fits(1)) return 0;
  int64_t lo = 1, hi = 2;
  while (fits(hi)) {
    lo = hi;
    hi *= 2;
    if (hi > (int64_t{1} << 24)) return lo;
  }
  while (hi - lo > 1) {
    int64_t mid = lo + (hi - lo) / 2;
    (fits(mid) ? lo : hi) = mid;
  }
  return lo;
}

void apply_calibration(Analysis& a, const sim::Calibration& c) {
  a.plan = std::make_unique<sim::Plan>(a.step->graph, a.scenario.device, &c);
  a.result = sim::simulate(*a.plan);
}

}  // namespace actsim::study
