// Simulating one resolved step (simulate_step) and one scenario (analyze = resolve + simulate_step).
#include "actsim/study/analyze.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <map>
#include <tuple>

#include "actsim/graph/profile.hpp"
#include "actsim/study/pipeline.hpp"
#include "actsim/util/error.hpp"

namespace actsim::study {

using sim::StepTables;
using sim::ByteOverflow;
using sim::simulate;
using sim::SimResult;

using graph::Category;
using graph::Location;

Analysis analyze(const Scenario& s) { return analyze(s, s.runtime()); }

Analysis analyze(const Scenario& s, const graph::RuntimeProfile& runtime) {
  if (s.training.parallel.pp > 1 && !s.training.parallel.pp_stage()) return analyze_pipeline(s, runtime);  // issue 13
  if (s.training.parallel.zero_redundancy() && s.training.parallel.zero_rank < 0) {
    return analyze_zero_redundancy(s, runtime);  // zero_redundancy (issue 13): one lowering per distinct rank
  }
  return simulate_step(resolve(s, runtime), s);
}

namespace {

// An overflow of a scenario's step names the keys that size it.
[[noreturn]] void overflow_of(const Scenario& s, const ByteOverflow& e) {
  throw ByteOverflow(fmt::format("{}, {}, {}, {}: {}", s.where("model.n_layers"), s.where("model.seq_len"),
                                 s.where("training.batch_size"), s.where("model.d_model"), e.what()));
}

}  // namespace

Analysis simulate_step(const ResolvedStep& step, const Scenario& s) {
  try {
    Analysis a = simulate_step(step);
    a.scenario = s;
    return a;
  } catch (const ByteOverflow& e) {
    overflow_of(s, e);
  }
}

SimResult simulate_step_result(const ResolvedStep& step, const Scenario& s) {
  try {
    return simulate_step_result(step);
  } catch (const ByteOverflow& e) {
    overflow_of(s, e);
  }
}

namespace {

// The step's graph, lowered once (the plan is the resolved one). Unnamed when only the engine
// reads it (LowerOptions::names).
std::unique_ptr<graph::StepGraph> lower(const ResolvedStep& step, bool names = true) {
  return std::make_unique<graph::StepGraph>(
      graph::lower_training_step(step.model, step.training, *step.runtime, &step.plan, {.names = names}));
}

}  // namespace

std::optional<SimResult> try_simulate_step(const ResolvedStep& step, std::span<sim::Observer* const> observers,
                                           std::string* why) {
  const std::unique_ptr<graph::StepGraph> g = lower(step, /*names=*/false);
  std::optional<StepTables> tables = StepTables::try_build(g->graph, step.device, why);
  if (!tables) return std::nullopt;
  return simulate(*tables, observers);
}

SimResult simulate_step_result(const ResolvedStep& step, std::span<sim::Observer* const> observers) {
  std::string why;
  std::optional<SimResult> r = try_simulate_step(step, observers, &why);
  if (!r) throw ByteOverflow(why);
  return *r;
}

Analysis simulate_step(const ResolvedStep& step) {
  Analysis a;
  a.block_plan = step.plan;
  a.step = lower(step);
  a.tables = std::make_unique<StepTables>(a.step->graph, step.device);
  a.result = simulate(*a.tables);
  const graph::Graph& g = a.step->graph;
  std::vector<bool> param_storage(g.storages().size(), false);
  for (graph::TensorId p : a.step->params) {
    param_storage[graph::index(g.tensor(p).storage)] = true;
    // issue 13 (ZeRO-3): a partitioned parameter is a view of its block's gathered parameters
    if (g.storage(g.tensor(p).storage).producer == graph::kNoOp) a.params_bytes += g.storage(g.tensor(p).storage).bytes;
    a.param_count += graph::numel(g.tensor(p).shape);
  }
  for (size_t s = 0; s < g.storages().size(); ++s) {  // ZeRO-3: this rank's partitions of those
    const graph::Storage& st = g.storages()[s];
    if (st.category == Category::parameter && st.producer == graph::kNoOp && !param_storage[s]) a.params_bytes += st.bytes;
  }
  std::vector<graph::StorageId> grad_storages;  // distinct: DDP's bucket views share a bucket
  for (graph::TensorId t : a.step->param_grads) {
    if (t != graph::kNoTensor) grad_storages.push_back(g.tensor(t).storage);
  }
  std::sort(grad_storages.begin(), grad_storages.end());
  grad_storages.erase(std::unique(grad_storages.begin(), grad_storages.end()), grad_storages.end());
  for (graph::StorageId sid : grad_storages) a.grads_bytes += g.storage(sid).bytes;
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
  // parameters, optimizer state and gradients aside. Without checkpointing these are exactly the
  // storages autograd saves; with it, what each block keeps through the forward pass. A buffer
  // counts only when autograd saves it (Gemma's embed_scale, by the embedding's mul), not when a
  // recomputation reads it again.
  // With gradient accumulation, what one micro-batch keeps: the first's ops (the later one's are alike).
  const size_t n_ops = g.micro_batches > 1 ? graph::index(g.last_micro_batch) : g.n_ops();
  const size_t n_st = g.storages().size();
  std::vector<bool> kept(n_st, false);
  auto keepable = [&](graph::StorageId sid, const graph::Op& reader) {
    const graph::Storage& st = g.storage(sid);
    if (st.location == Location::host) return false;
    if (st.category == Category::parameter || st.category == Category::optimizer_state ||
        st.category == Category::gradient) {
      return false;
    }
    if (st.category == Category::buffer) return !reader.recompute;
    if (st.producer == graph::kNoOp) return true;
    const graph::Op& by = g.op(st.producer);
    // checkpoint's RNG stash is kept, but it is no saved tensor (the saved-tensor hooks never see it)
    return by.phase == graph::Phase::forward && by.kind != graph::OpKind::rng_stash;
  };
  for (size_t i = 0; i < n_ops; ++i) {
    const graph::Op& op = g.ops()[i];
    if (op.phase == graph::Phase::forward) continue;
    // Only autograd keeps tensors for backward: its nodes, and the recompute and prefetch that feed
    // them. The optimizer step and the training loop's own ops (GradScaler's loss * scale) keep
    // nothing; the engine's bookkeeping (sum_to, accumulate) holds only what a node keeps.
    if (op.kind != graph::OpKind::backward && op.kind != graph::OpKind::prefetch && !op.recompute) continue;
    for (const auto* list : {&op.inputs, &op.holds}) {
      for (graph::TensorId t : *list) {
        graph::StorageId sid = g.tensor(t).storage;
        if (keepable(sid, op)) kept[graph::index(sid)] = true;
      }
    }
  }
  // Each kept storage counts in the block of the first forward op that keeps it: saves it, or
  // (in a recompute region) reads it from outside the region, or caches it (ops:LIST).
  a.per_layer_saved.assign(static_cast<size_t>(g.n_layers), 0);
  std::vector<bool> counted(n_st, false);
  // torch.utils.checkpoint's _NoopSaveInputs packs the call's tensor arguments under the
  // saved-tensor hooks even when nothing in the region needs a gradient (a frozen block,
  // training.trainable): saved, though the frame drops them when the call returns.
  auto packed_argument = [&](const graph::Op& op, graph::TensorId t) {
    const graph::Storage& st = g.storage(g.tensor(t).storage);
    if (st.category != Category::activation && st.category != Category::input) return false;
    return st.producer == graph::kNoOp || g.op(st.producer).region != op.region;
  };
  auto count = [&](const graph::Op& op, graph::TensorId t, bool packed = false) {
    graph::StorageId sid = g.tensor(t).storage;
    const size_t i = graph::index(sid);
    if ((!kept[i] && !packed) || counted[i]) return;
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
      for (graph::TensorId t : op.inputs) count(op, t, packed_argument(op, t));
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

void apply_calibration(Analysis& a, const sim::Calibration& c) {
  a.tables = std::make_unique<sim::StepTables>(a.step->graph, a.scenario.device, &c);
  a.result = sim::simulate(*a.tables);
}

}  // namespace actsim::study
