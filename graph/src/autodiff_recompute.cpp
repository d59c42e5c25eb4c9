// Checkpoint recomputation and offload prefetch of the autograd engine (autodiff_engine.hpp): when
// backward first needs a region's saved tensors, the region's forward ops run again (2.x stops
// early, 1.13 and reentrant rerun the whole function); offloaded blocks come back on the copy stream.
#include "autodiff_engine.hpp"

#include <algorithm>

#include <unordered_map>

#include "actsim/util/error.hpp"

namespace actsim::graph::autodiff_detail {

bool Engine::wrapped_scalar(TensorId t) const {
  const OpId p = g_.tensor(t).producer;
  if (!b_.prof().wrapped_numbers_unhooked || reentrant_ || p == kNoOp) return false;
  const Op& o = g_.op(p);
  return (o.kind == OpKind::mul_scalar || o.kind == OpKind::div_scalar) && o.outputs.size() > 1 && o.outputs[1] == t;
}

void Engine::recompute_region(int32_t r, const std::vector<uint32_t>* targets) {
  recomputed_[r] = true;
  const std::vector<OpId>& ops = regions_[r];
  // [storages existing now]: needed when marked with this recomputation's stamp (issue 9: one
  // array for the whole backward, not one of every storage per recomputation).
  if (needed_mark_.size() < g_.storages().size()) needed_mark_.resize(g_.storages().size(), 0);
  const uint32_t stamp = ++needed_stamp_;
  // (Reentrant: the forward ran under no_grad and saved nothing; the recomputation saves as usual.)
  const bool keep_scalars = b_.prof().wrapped_numbers_unhooked && !reentrant_;
  if (targets) {
    for (uint32_t sid : *targets) needed_mark_[sid] = stamp;
  } else {
    for (OpId o : ops) {
      for (TensorId t : g_.op(o).saved) {
        if (!wrapped_scalar(t)) needed_mark_[index(g_.tensor(t).storage)] = stamp;
      }
    }
  }
  std::vector<bool> rerun(ops.size(), false);
  bool reached = false;  // the recomputation runs (cached ops hand out their outputs) up to `reach`
  size_t reach = 0;
  // The whole function runs again: reentrant checkpoint's backward calls it under enable_grad,
  // 1.13's unpack hook calls it under its inner hooks; 2.x non-reentrant stops early.
  const bool whole = !targets && (reentrant_ || !b_.prof().checkpoint_early_stop);
  for (size_t k = ops.size(); whole && k-- > 0;) {
    if (!reached) reached = true, reach = k;
    rerun[k] = !g_.op(ops[k]).cached;
  }
  for (size_t k = ops.size(); !whole && k-- > 0;) {
    const Op& op = g_.op(ops[k]);
    bool need = false;
    for (TensorId t : op.outputs) need = need || needed_mark_[index(g_.tensor(t).storage)] == stamp;
    if (!need) continue;
    if (!reached) reached = true, reach = k;
    if (op.cached) continue;
    rerun[k] = true;
    for (TensorId t : op.inputs) needed_mark_[index(g_.tensor(t).storage)] = stamp;
  }
  // 2.x's early stop (_StopRecomputationError at the frame's last pack): the function runs in
  // order up to there, so every op before the stop runs, needed or not (a frozen base linear's
  // output that only the LoRA sum after the stop reads); what the rest of the function would
  // still read (its Python locals: peft's float32 copy of x, `result`) lives until the stop.
  std::vector<TensorId> until_stop;
  if (!whole && !targets && reached) {
    // (op index, k) sorted by op index: a binary search, no map (issue 9).
    std::vector<std::pair<uint32_t, uint32_t>> pos;
    pos.reserve(reach + 1);
    for (size_t k = 0; k <= reach; ++k) {
      rerun[k] = !g_.op(ops[k]).cached;
      pos.emplace_back(index(ops[k]), static_cast<uint32_t>(k));
    }
    std::sort(pos.begin(), pos.end());
    for (size_t k = reach + 1; k < ops.size(); ++k) {
      for (const auto* list : {&g_.op(ops[k]).inputs, &g_.op(ops[k]).holds}) {
        for (TensorId t : *list) {
          const OpId p = g_.tensor(t).producer;
          if (p == kNoOp) continue;
          auto it = std::lower_bound(pos.begin(), pos.end(), std::pair<uint32_t, uint32_t>{index(p), 0});
          if (it != pos.end() && it->first == index(p) && rerun[it->second]) until_stop.push_back(t);
        }
      }
    }
  }
  // The recomputation runs under torch.random.fork_rng: another RNG stash while it runs. Wrapped
  // numbers the forward saved past the checkpoint's hooks (2.x) stay saved; the recomputation
  // makes its own, alive until it ends.
  std::vector<TensorId> transient;
  const size_t first_op = g_.n_ops();
  const auto stash = b_.rng_stash.find(r);
  if (reached && stash != b_.rng_stash.end() && stash->second != kNoTensor) {
    b_.set_layer(g_.op(ops.front()).layer);
    transient.push_back(b_.stash_rng("checkpoint.recompute.rng_state"));
  }
  Recomputation& rc = recomputations_[r];
  rc = {.reached = reached, .reach = reach};
  std::vector<std::pair<size_t, OpId>>& emitted = rc.emitted;
  for (size_t k = 0; k < ops.size(); ++k) {
    if (!rerun[k]) continue;
    emitted.emplace_back(k, OpId{static_cast<uint32_t>(g_.n_ops())});
    const Op& orig = g_.op(ops[k]);  // ops never move (ChunkedVector)
    Op op{.kind = orig.kind, .phase = Phase::backward, .layer = orig.layer, .name = orig.name + ".recompute",
          .workspace_bytes = orig.workspace_bytes, .flops = orig.flops, .bytes_moved = orig.bytes_moved,
          .kernels = orig.kernels, .forward = ops[k], .recompute = true, .params = orig.params};
    op.inputs.reserve(orig.inputs.size()), op.holds.reserve(orig.holds.size());
    for (TensorId t : orig.inputs) op.inputs.push_back(mapped(t));
    for (TensorId t : orig.holds) op.holds.push_back(mapped(t));
    for (size_t j = 0; j < orig.outputs.size(); ++j) {
      const TensorId t = orig.outputs[j];
      const Tensor& tt = g_.tensor(t);
      if (keep_scalars && j == 1 && (orig.kind == OpKind::mul_scalar || orig.kind == OpKind::div_scalar)) {
        const Storage& st = g_.storage(tt.storage);
        Tensor copy = tt;
        copy.name = tt.name + ".recompute";
        copy.producer = kNoOp;
        copy.storage = g_.add_storage({.bytes = st.bytes, .category = Category::temporary, .location = st.location,
                                       .layer = st.layer});
        const TensorId id = g_.add_tensor(std::move(copy));
        op.outputs.push_back(id);
        transient.push_back(id);
        continue;
      }
      if (!tt.is_view) {
        const Storage& st = g_.storage(tt.storage);
        remap_storage(index(tt.storage), g_.add_storage({.bytes = st.bytes, .category = st.category,
                                                         .location = st.location, .layer = st.layer}));
        TensorId id = mapped(t);
        g_.mutable_tensor(id).is_view = false;  // it allocates the replacement
        op.outputs.push_back(id);
      } else {
        TensorId m = mapped(t);
        if (m != t) op.outputs.push_back(m);  // a view of a recomputed base
      }
    }
    g_.add_op(std::move(op));
  }
  // Held by the recomputation's last op; one that op made itself (a wrapped number of the last
  // recomputed op: LoRA's `* scaling` ending a block) dies with it anyway.
  for (TensorId t : until_stop) transient.push_back(mapped(t));
  // The recomputation runs under the forward's autocast state, with a fresh weight-cast cache
  // that holds each recomputed parameter cast until the recomputation's autocast region exits.
  if (!b_.cast_cache.empty()) {
    std::unordered_map<uint32_t, bool> cached_cast;
    for (TensorId c : b_.cast_cache) cached_cast[index(c)] = true;
    for (const auto& [k, id] : emitted) {
      for (TensorId t : g_.op(ops[k]).outputs) {
        if (cached_cast.count(index(t))) transient.push_back(mapped(t));
      }
    }
  }
  const OpId last_op{static_cast<uint32_t>(g_.n_ops() - 1)};
  for (TensorId t : transient) {
    if (g_.tensor(t).producer != last_op) b_.hold_until_last(t);
  }
  if (g_.n_ops() > first_op) rc.end = OpId{static_cast<uint32_t>(g_.n_ops() - 1)};
  if (is_reentrant_region(r) && !ops.empty()) {
    // CheckpointFunction.backward keeps `outputs` (the recomputed call's result) until it returns.
    for (TensorId t : g_.op(ops.back()).outputs) reentrant_calls_[r].held.push_back(mapped(t));
  }
}

// Offload: bring block `layer`'s activations back on the copy stream, after the op emitted last
// (so a block's prefetch overlaps the backward of the block after it).
void Engine::prefetch_block(int32_t layer) {
  if (layer < 0 || prefetched_[layer]) return;
  prefetched_[layer] = true;
  const OpId last{static_cast<uint32_t>(g_.n_ops() - 1)};
  for (uint32_t sid : b_.offload_order) {
    const Builder::Offloaded& o = b_.offloaded.at(sid);
    if (o.layer != layer) continue;
    const Tensor h = g_.tensor(o.host);
    const Storage& st = g_.storage(StorageId{sid});
    StorageId ds = g_.add_storage({.bytes = st.bytes, .category = Category::activation, .layer = layer});
    const std::string name = g_.tensor(st.first).name + ".prefetch";
    Tensor d = h;
    d.storage = ds;
    d.producer = kNoOp;
    d.name = name;
    TensorId dt = g_.add_tensor(std::move(d));
    g_.add_op({.kind = OpKind::prefetch, .phase = Phase::backward, .layer = layer, .name = name,
               .inputs = {o.host}, .outputs = {dt}, .bytes_moved = st.bytes, .stream = 1, .after = {last}});
    set_remap(sid, ds);
  }
}

}  // namespace actsim::graph::autodiff_detail
