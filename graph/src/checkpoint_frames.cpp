// See checkpoint_frames.hpp. The lifetimes were measured on PyTorch 2.13 with tests/torch
// (checkpoint=full|every:K|selective|ops:LIST): torch/utils/checkpoint.py _checkpoint_hook,
// _NoopSaveInputs, _CachingTorchDispatchMode / _CachedTorchDispatchMode.
#include "checkpoint_frames.hpp"

namespace actsim::graph {

std::vector<TensorId> checkpoint_arguments(const Graph& g, const std::vector<OpId>& ops) {
  std::unordered_map<uint32_t, bool> own, held;
  for (OpId o : ops) {
    for (TensorId t : g.op(o).outputs) {
      if (!g.tensor(t).is_view) own[index(g.tensor(t).storage)] = true;  // allocated in the region
    }
  }
  std::vector<TensorId> out;
  for (OpId o : ops) {
    for (TensorId t : g.op(o).inputs) {
      const uint32_t s = index(g.tensor(t).storage);
      const Category c = g.storage(g.tensor(t).storage).category;
      if (own.count(s) || held.count(s) || (c != Category::activation && c != Category::input)) continue;
      held[s] = true;
      out.push_back(t);
    }
  }
  return out;
}

void keep_checkpoint_frames(Graph& g, const std::unordered_map<int32_t, TensorId>& rng_stash,
                            const std::unordered_map<int32_t, std::vector<OpId>>& regions,
                            const std::unordered_map<int32_t, Recomputation>& recomputations) {
  if (rng_stash.empty()) return;
  std::unordered_map<int32_t, OpId> last;
  for (size_t i = 0; i < g.n_ops(); ++i) {
    const Op& op = g.ops()[i];
    if (op.phase != Phase::backward || op.forward == kNoOp || op.recompute) continue;
    const int32_t r = g.op(op.forward).region;
    if (r >= 0) last[r] = OpId{static_cast<uint32_t>(i)};
  }
  for (const auto& [r, stash] : rng_stash) {
    auto it = last.find(r);
    auto ops = regions.find(r);
    if (it == last.end() || ops == regions.end()) continue;
    Op& end = g.mutable_op(it->second);
    if (stash != kNoTensor) end.holds.push_back(stash);
    // The checkpoint call's arguments (the block input, llama's token positions) are saved by
    // its frame (_NoopSaveInputs) until then too: activations the region reads from outside.
    for (TensorId t : checkpoint_arguments(g, ops->second)) end.holds.push_back(t);
  }
  // Selective activation checkpointing caches the outputs of the listed ops whether or not
  // backward asks for them; those it never asks for stay in the cache until the region's
  // frame dies (its last backward node), the others leave it when the recomputation takes them.
  std::vector<bool> read(g.storages().size(), false);
  for (const Op& op : g.ops()) {
    if (op.phase != Phase::backward) continue;
    for (const auto* list : {&op.inputs, &op.holds}) {
      for (TensorId t : *list) read[index(g.tensor(t).storage)] = true;
    }
  }
  // A recomputation that runs past a cached op takes its entry (and drops it when nothing
  // needs it); entries past where the recomputation stopped stay until the frame dies.
  for (const auto& [r, ops] : regions) {
    auto it = last.find(r);
    if (it == last.end()) continue;
    static const Recomputation kNotRun;
    const auto rc_it = recomputations.find(r);
    const Recomputation& rc = rc_it == recomputations.end() ? kNotRun : rc_it->second;
    for (size_t k = 0; k < ops.size(); ++k) {
      const Op& op = g.op(ops[k]);
      if (!op.cached) continue;
      OpId until = it->second;
      if (rc.reached && k <= rc.reach && rc.end != kNoOp) {
        until = rc.end;
        for (const auto& [pos, id] : rc.emitted) {
          if (pos > k) {
            until = id;
            break;
          }
        }
      }
      for (TensorId t : op.outputs) {
        const Tensor& tt = g.tensor(t);
        if (!tt.is_view && !read[index(tt.storage)]) {
          read[index(tt.storage)] = true;
          g.mutable_op(until).holds.push_back(t);
        }
      }
    }
  }
}

}  // namespace actsim::graph
