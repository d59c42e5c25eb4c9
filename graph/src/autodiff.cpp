// The backward pass as PyTorch's engine (torch/csrc/autograd/engine.cpp) runs it:
//  - a node per forward op with an input that requires grad; its dependencies are the number of
//    edges into it from nodes that will run;
//  - ready nodes run highest sequence number first (ReadyQueue's CompareNodeTaskTime), i.e. the
//    latest forward op first; AccumulateGrad has the highest priority, so it runs at once;
//  - a node's incoming gradients and saved tensors are released when it finishes;
//  - validate_outputs reduces a broadcast gradient with sum_to while the node's inputs are alive;
//  - InputBuffer::accumulate adds in place when it holds the only reference to the old gradient,
//    else out of place; AccumulateGrad steals a gradient it holds the only reference to and whose
//    strides match the parameter's ("gradient layout contract"), else clones it.
#include "autodiff.hpp"
#include "backward_rules.hpp"
#include "checkpoint_frames.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <map>
#include <queue>
#include <tuple>
#include <unordered_map>

#include "actsim/util/error.hpp"

namespace actsim::graph {
namespace {

constexpr int32_t kBlockRegionBase = 3 << 20;  // lower.cpp's per-block regions of explicit schedules

struct Slot {
  TensorId grad = kNoTensor;  // accumulated gradient for this forward output
};

// Whether a tensor's elements fill exactly numel contiguous slots (in some dim order).
bool non_overlapping_and_dense(const Shape& shape, const Strides& strides) {
  std::vector<size_t> order;
  for (size_t d = 0; d < shape.size(); ++d) {
    if (shape[d] != 1) order.push_back(d);
  }
  std::sort(order.begin(), order.end(), [&](size_t a, size_t b) { return strides[a] < strides[b]; });
  int64_t expected = 1;
  for (size_t d : order) {
    if (strides[d] != expected) return false;
    expected *= shape[d];
  }
  return true;
}

class Engine {
 public:
  Engine(Builder& b, const std::vector<TensorId>& params, const BlockPlan* plan, OpId forward_begin,
         const std::vector<TensorId>* grads, const GradReadyHook& hook)
      : b_(b), g_(b.graph()), hook_(hook), params_(params), plan_(plan), reentrant_(b.ckpt_reentrant),
        grads_before_(grads) {
    param_grad_.assign(params.size(), kNoTensor);
    param_buf_.assign(params.size(), kNoTensor);
    param_deps_.assign(params.size(), 0);
    slots_.resize(g_.n_ops());  // backward nodes are forward ops: ids below the current count
    deps_.assign(g_.n_ops(), 0);
    refs_.assign(g_.storages().size() * 2, 0);
    for (size_t i = 0; i < params.size(); ++i) param_index_[index(params[i])] = i;
    for (size_t i = index(forward_begin); i < g_.n_ops(); ++i) {
      const Op& op = g_.ops()[i];
      if (op.phase == Phase::forward && op.region >= 0) regions_[op.region].push_back(OpId{static_cast<uint32_t>(i)});
    }
  }

  std::vector<TensorId> run(TensorId loss);

 private:
  bool is_node(OpId f) const {
    for (TensorId t : g_.op(f).inputs) {
      if (g_.tensor(t).requires_grad) return true;
    }
    return false;
  }
  // The edge an input's gradient flows along: a parameter, or (producer op, output index).
  struct Edge {
    bool is_param = false;
    size_t param = 0;
    OpId op = kNoOp;
    size_t out = 0;
  };
  bool edge_of(TensorId t, Edge& e) const;
  TensorId new_grad(const std::string& name, const Shape& shape, DType dt, const Strides& strides = {}) {
    return graph::new_grad(b_, name, shape, dt, strides);
  }
  void run_node(OpId f);
  void deliver(TensorId grad, TensorId input, int32_t from_region = -1);
  void accumulate(TensorId& buf, TensorId grad, int32_t layer);
  void accumulate_grad(size_t param);
  int& ref(TensorId t) {
    const uint32_t s = index(g_.tensor(t).storage);
    if (s >= refs_.size()) refs_.resize(std::max<size_t>(s + 1, refs_.size() * 2), 0);
    return refs_[s];
  }
  void add_ref(TensorId t) { ++ref(t); }
  void drop_ref(TensorId t) { --ref(t); }
  int refs(TensorId t) { return ref(t); }

  Builder& b_;
  Graph& g_;
  GradReadyHook hook_;  // issue 13: DDP / ZeRO gradient hooks
  const std::vector<TensorId>& params_;
  const BlockPlan* plan_;
  const bool reentrant_;                                   // checkpoint.impl = reentrant
  const std::vector<TensorId>* grads_before_;              // [params] .grad from earlier micro-batches
  std::unordered_map<int32_t, bool> scheduled_;            // block -> its before_backward list ran
  std::unordered_map<uint32_t, std::vector<uint32_t>> cached_views_;  // storage -> remapped_t_ keys
  std::unordered_map<uint32_t, size_t> param_index_;
  std::vector<TensorId> param_grad_;
  std::vector<TensorId> param_buf_;                        // AccumulateGrad's InputBuffer
  std::vector<int> param_deps_;                            // AccumulateGrad's pending edges
  std::vector<std::vector<Slot>> slots_;                   // [forward ops] per-output gradient
  std::vector<int> deps_;                                  // [forward ops] pending edges
  std::vector<int> refs_;                                  // [storages] live gradient references
  std::priority_queue<uint32_t> ready_;                    // forward op index: latest first

  // Checkpointing and offload: forward storages replaced in backward by a recomputed or
  // prefetched copy, and the tensors viewing those copies.
  std::unordered_map<uint32_t, StorageId> remap_;          // storage -> replacement storage
  std::unordered_map<uint32_t, TensorId> remapped_t_;      // tensor -> same view of the replacement
  std::unordered_map<int32_t, std::vector<OpId>> regions_; // region -> forward ops, in order
  std::unordered_map<int32_t, bool> recomputed_;
  std::unordered_map<int32_t, Recomputation> recomputations_;
  std::unordered_map<int32_t, bool> prefetched_;           // block -> prefetch emitted
  TensorId mapped(TensorId t);
  void remap_storage(uint32_t sid, StorageId to);
  void recompute_region(int32_t r, const std::vector<uint32_t>* targets = nullptr);
  void prefetch_block(int32_t layer);

  // Reentrant checkpoint (CheckpointFunction): the call's backward node is the region's nodes
  // run as one nested backward. Per region: its nodes still to run, the gradients it received
  // (held by the node's args and the nested GraphRoot until it returns), the recomputed output.
  struct Reentrant {
    int pending = 0;
    std::vector<TensorId> grads_in;
    std::vector<TensorId> held;                            // the recomputed outputs of the call
  };
  std::unordered_map<int32_t, Reentrant> reentrant_calls_;
  // Gradients for a reentrant call's arguments (detach_variable's leaves) gather in the leaf's
  // AccumulateGrad: (region, producer op, output) -> the buffer and its pending edges.
  struct ArgGrad {
    TensorId buf = kNoTensor;
    int pending = 0;
  };
  std::map<std::tuple<int32_t, uint32_t, size_t>, ArgGrad> arg_grads_;
  bool is_reentrant_region(int32_t r) const { return reentrant_ && r >= 0; }
  void finish_reentrant(int32_t r);
};

TensorId Engine::mapped(TensorId t) {
  const Tensor& tt = g_.tensor(t);
  auto it = remap_.find(index(tt.storage));
  if (it == remap_.end()) return t;
  auto jt = remapped_t_.find(index(t));
  if (jt != remapped_t_.end()) return jt->second;
  Tensor c = tt;
  c.storage = it->second;
  c.producer = kNoOp;
  c.requires_grad = false;
  c.is_view = true;  // a view of the replacement (which has its own first tensor)
  c.name = tt.name + ".re";
  TensorId id = g_.add_tensor(std::move(c));
  remapped_t_[index(t)] = id;
  cached_views_[index(tt.storage)].push_back(index(t));
  return id;
}

void Engine::remap_storage(uint32_t sid, StorageId to) {
  remap_[sid] = to;
  // Tensors viewing an older replacement of this storage are stale now.
  auto it = cached_views_.find(sid);
  if (it == cached_views_.end()) return;
  for (uint32_t t : it->second) remapped_t_.erase(t);
  it->second.clear();
}

// torch.utils.checkpoint(use_reentrant=False): the first time backward needs a saved tensor of
// the region, the region's forward ops run again; only the ops whose outputs (transitively) feed
// a saved tensor are rerun (2.x stops recomputation early), ops with cached outputs (selective
// activation checkpointing) are not rerun at all.
void Engine::recompute_region(int32_t r, const std::vector<uint32_t>* targets) {
  recomputed_[r] = true;
  const std::vector<OpId>& ops = regions_[r];
  std::unordered_map<uint32_t, bool> needed_st;
  if (targets) {
    for (uint32_t sid : *targets) needed_st[sid] = true;
  } else {
    for (OpId o : ops) {
      for (TensorId t : g_.op(o).saved) needed_st[index(g_.tensor(t).storage)] = true;
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
    for (TensorId t : op.outputs) need = need || needed_st.count(index(g_.tensor(t).storage));
    if (!need) continue;
    if (!reached) reached = true, reach = k;
    if (op.cached) continue;
    rerun[k] = true;
    for (TensorId t : op.inputs) needed_st[index(g_.tensor(t).storage)] = true;
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
  // (Reentrant: the forward ran under no_grad and saved nothing; the recomputation saves as usual.)
  const bool keep_scalars = b_.prof().wrapped_numbers_unhooked && !reentrant_;
  Recomputation& rc = recomputations_[r];
  rc = {.reached = reached, .reach = reach};
  std::vector<std::pair<size_t, OpId>>& emitted = rc.emitted;
  for (size_t k = 0; k < ops.size(); ++k) {
    if (!rerun[k]) continue;
    emitted.emplace_back(k, OpId{static_cast<uint32_t>(g_.n_ops())});
    const Op orig = g_.op(ops[k]);
    Op op{.kind = orig.kind, .phase = Phase::backward, .layer = orig.layer, .name = orig.name + ".recompute",
          .workspace_bytes = orig.workspace_bytes, .flops = orig.flops, .bytes_moved = orig.bytes_moved,
          .kernels = orig.kernels, .forward = ops[k], .recompute = true, .params = orig.params};
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
    remap_[sid] = ds;
  }
}

bool Engine::edge_of(TensorId t, Edge& e) const {
  const Tensor& tt = g_.tensor(t);
  if (!tt.requires_grad) return false;
  if (tt.producer == kNoOp) {
    auto it = param_index_.find(index(t));
    ACTSIM_ASSERT(it != param_index_.end(), "leaf requiring grad is not a parameter: " + tt.name);
    e = {.is_param = true, .param = it->second};
    return true;
  }
  const Op& p = g_.op(tt.producer);
  for (size_t j = 0; j < p.outputs.size(); ++j) {
    if (p.outputs[j] == t) {
      e = {.op = tt.producer, .out = j};
      return true;
    }
  }
  ACTSIM_ASSERT(false, "tensor not among its producer's outputs");
  return false;
}

std::vector<TensorId> Engine::run(TensorId loss) {
  // Dependencies: count edges into each node over the nodes reachable from the loss.
  std::vector<OpId> stack{g_.tensor(loss).producer};
  std::vector<bool> seen(g_.n_ops(), false);
  seen[index(stack[0])] = true;
  while (!stack.empty()) {
    OpId f = stack.back();
    stack.pop_back();
    const int32_t fr = g_.op(f).region;
    if (is_reentrant_region(fr)) ++reentrant_calls_[fr].pending;
    for (TensorId in : g_.op(f).inputs) {
      Edge e;
      if (!edge_of(in, e)) continue;
      if (e.is_param) {
        ++param_deps_[e.param];
        continue;
      }
      if (is_reentrant_region(fr) && g_.op(e.op).region != fr) {
        // An argument of a reentrant call: one edge from the call's node, however many ops use it.
        ArgGrad& a = arg_grads_[{fr, index(e.op), e.out}];
        if (a.pending++ == 0) ++deps_[index(e.op)];
      } else {
        ++deps_[index(e.op)];
      }
      if (!seen[index(e.op)]) {
        seen[index(e.op)] = true;
        stack.push_back(e.op);
      }
    }
  }
  // loss.backward(): ones_like(loss), held by autograd.backward's grad_tensors until it returns.
  b_.set_phase(Phase::backward);
  b_.set_layer(-1);
  b_.set_scope("");
  const Tensor& lt = g_.tensor(loss);
  TensorId seed = new_grad("grad_seed", lt.shape, lt.dtype);
  b_.emit({.kind = OpKind::grad_seed, .name = "loss.backward.ones_like", .outputs = {seed}, .bytes_moved = 4});
  OpId root = lt.producer;
  slots_[index(root)].resize(g_.op(root).outputs.size());
  slots_[index(root)][0].grad = seed;
  add_ref(seed);
  ready_.push(index(root));
  while (!ready_.empty()) {
    OpId f{ready_.top()};
    ready_.pop();
    run_node(f);
  }
  b_.hold_until_last(seed);
  keep_checkpoint_frames(g_, b_.rng_stash, regions_, recomputations_);
  return param_grad_;
}

void Engine::run_node(OpId fid) {
  const Op& f = g_.op(fid);  // stable: the graph's ops live in a deque
  if (f.layer >= 0 && !b_.offloaded.empty()) {
    prefetch_block(f.layer);
    prefetch_block(f.layer - 1);
  }
  // (Reentrant: each recomputed block is one CheckpointFunction call; rotor's nested schedule needs
  // non-reentrant frames, so the call's own backward recomputes it.)
  if (plan_ && !plan_->before_backward.empty() && !reentrant_ && f.layer >= 0 && !scheduled_[f.layer]) {
    // An explicit (nested) schedule: before the first backward node of this block, run the
    // forward recomputations the planner listed for it.
    scheduled_[f.layer] = true;
    const auto& list = plan_->before_backward[static_cast<size_t>(f.layer)];
    for (size_t k = 0; k < list.size(); ++k) {
      const BlockPlan::Recompute& rc = list[k];
      const int32_t region = kBlockRegionBase + rc.block;
      // The block's output is needed when a later recomputation starts from it.
      std::vector<uint32_t> targets;
      if (k + 1 < list.size() || !rc.keep_all) {
        targets.push_back(index(g_.tensor(b_.block_outputs[static_cast<size_t>(rc.block)]).storage));
      }
      if (rc.keep_all) {
        for (OpId o : regions_[region]) {
          for (TensorId t : g_.op(o).saved) targets.push_back(index(g_.tensor(t).storage));
        }
      }
      recompute_region(region, &targets);
    }
  }
  if (f.region >= 0 && !recomputed_[f.region]) {
    ACTSIM_ASSERT(!plan_ || plan_->before_backward.empty() || reentrant_ || f.region < kBlockRegionBase,
                  "a scheduled block's backward ran before its recomputation: " + f.name);
    if (is_reentrant_region(f.region)) {
      // CheckpointFunctionBackward begins: its incoming gradients stay referenced until it returns.
      Reentrant& rc = reentrant_calls_[f.region];
      for (const Slot& s : slots_[index(fid)]) {
        if (s.grad != kNoTensor) rc.grads_in.push_back(s.grad), add_ref(s.grad);
      }
    }
    recompute_region(f.region);
  }
  // Saved tensors, replaced by their recomputed or prefetched copies where there are some.
  std::vector<TensorId> saved = f.saved;
  if (!remap_.empty()) {
    for (TensorId& t : saved) t = mapped(t);
  }
  b_.set_layer(f.layer);
  b_.set_scope(f.name);
  std::vector<Slot>& slots = slots_[index(fid)];
  slots.resize(f.outputs.size());
  TensorId g = slots[0].grad;
  for (const Slot& s : slots) {
    if (g == kNoTensor) g = s.grad;
  }
  ACTSIM_ASSERT(g != kNoTensor, "node ran without any incoming gradient: " + f.name);
  auto in = [&](size_t i) -> const Tensor& { return g_.tensor(f.inputs[i]); };
  const DType dt = g_.tensor(g).dtype;

  // The op kind's backward rule (backward_rules.cpp): grads[i] is the gradient this node
  // produces for input i (kNoTensor if none).
  BackwardRule rule = backward_rule(b_, f, g);
  const std::vector<TensorId>& grads = rule.grads;
  const int64_t workspace = rule.workspace;
  const int kernels = rule.kernels;

  Op op{.kind = OpKind::backward, .name = "backward", .workspace_bytes = workspace, .kernels = kernels,
        .forward = fid};
  op.inputs.reserve(slots.size() + saved.size()), op.grad_in_of.reserve(slots.size());
  op.grad_of.reserve(grads.size()), op.grad_outputs.reserve(grads.size());
  for (size_t j = 0; j < slots.size(); ++j) {
    if (slots[j].grad == kNoTensor) continue;
    op.inputs.push_back(slots[j].grad);
    op.grad_in_of.push_back(static_cast<int8_t>(j));
  }
  op.n_grad_inputs = static_cast<int8_t>(op.inputs.size());
  for (TensorId t : saved) op.inputs.push_back(t);
  for (size_t i = 0; i < grads.size(); ++i) {
    if (grads[i] == kNoTensor) continue;
    op.grad_of.push_back(static_cast<int8_t>(i));
    op.grad_outputs.push_back(grads[i]);
  }
  int64_t out_bytes = 0;
  for (TensorId t : grads) {
    if (t == kNoTensor) continue;
    bool listed = false;
    for (TensorId o : op.outputs) listed = listed || o == t;
    if (g_.tensor(t).producer == kNoOp && !listed) {
      op.outputs.push_back(t);
      if (!g_.tensor(t).is_view) out_bytes += g_.view_bytes(t);
    }
  }
  // Time model inputs: a backward costs about twice its forward (two matmuls for a matmul's two
  // gradients; elementwise kernels read the gradient and the saved tensors).
  op.flops = 2.0 * f.flops;
  op.bytes_moved = out_bytes + g_.view_bytes(g);
  for (TensorId t : saved) op.bytes_moved += g_.view_bytes(t);
  if (kernels == 0) op.bytes_moved = 0, op.flops = 0;
  b_.emit(std::move(op));

  // The node's outputs now reference their storages; its inputs are released after delivery's
  // sum_to (which runs inside call_function, while they are alive).
  for (TensorId t : grads) {
    if (t != kNoTensor) add_ref(t);
  }
  std::vector<TensorId> node_holds;
  node_holds.reserve(slots.size() + saved.size());
  for (const Slot& s : slots) {
    if (s.grad != kNoTensor) node_holds.push_back(s.grad);
  }
  for (size_t i = 0; i < saved.size(); ++i) {
    // 2.x non-reentrant checkpoint: the frame hands a recomputed tensor over when it is unpacked
    // and forgets it, so it dies with the node's apply(), before validate_outputs' sum_to.
    const bool handed_over =
        f.region >= 0 && saved[i] != f.saved[i] && b_.prof().checkpoint_unpack_releases && !reentrant_;
    if (!handed_over) node_holds.push_back(saved[i]);
  }
  std::vector<std::pair<TensorId, TensorId>> outs;  // (grad, input) after reduction
  outs.reserve(grads.size());
  for (size_t i = 0; i < grads.size(); ++i) {
    if (grads[i] == kNoTensor) continue;
    TensorId gi = grads[i];
    const Tensor& x = in(i);
    if (g_.tensor(gi).shape != x.shape) {
      // validate_outputs: at::sum_to(grad, metadata.shape()).
      TensorId r = new_grad(fmt::format("grad_sum_to{}", i), x.shape, dt);
      b_.emit({.kind = OpKind::sum_to, .name = "sum_to", .inputs = {gi}, .outputs = {r}, .holds = node_holds,
               .flops = static_cast<double>(numel(g_.tensor(gi).shape)),
               .bytes_moved = g_.view_bytes(gi) + g_.view_bytes(r)});
      drop_ref(gi);
      add_ref(r);
      gi = r;
    }
    if (g_.tensor(gi).dtype != in(i).dtype && is_floating(in(i).dtype)) {
      // validate_outputs: grad = grad.to(metadata.dtype) -- under autocast a float32 residual's
      // gradient reaches the bf16 operand of a promoting add or mul.
      const Shape shape = in(i).shape;
      const DType to = in(i).dtype;
      const Strides st = g_.tensor(gi).is_view ? Strides{} : g_.tensor(gi).strides;
      TensorId r = new_grad(fmt::format("grad_to{}", i), shape, to, st);
      b_.emit({.kind = OpKind::cast, .name = "grad.to", .inputs = {gi}, .outputs = {r}, .holds = node_holds,
               .bytes_moved = g_.view_bytes(gi) + g_.view_bytes(r)});
      drop_ref(gi);
      add_ref(r);
      gi = r;
    }
    outs.emplace_back(gi, f.inputs[i]);
  }
  for (const Slot& s : slots) {
    if (s.grad != kNoTensor) drop_ref(s.grad);
  }
  for (auto& [gi, x] : outs) deliver(gi, x, f.region);
  if (is_reentrant_region(f.region) && --reentrant_calls_[f.region].pending == 0) finish_reentrant(f.region);
}

// The nested backward of a reentrant call is over: CheckpointFunction.backward returns (its
// recomputed outputs and incoming gradients go), then the node releases its saved arguments.
void Engine::finish_reentrant(int32_t r) {
  Reentrant& rc = reentrant_calls_[r];
  for (TensorId t : rc.grads_in) {
    drop_ref(t);
    b_.hold_until_last(t);
  }
  for (TensorId t : rc.held) b_.hold_until_last(t);
  for (TensorId t : checkpoint_arguments(g_, regions_[r])) b_.hold_until_last(t);
}

void Engine::accumulate(TensorId& buf, TensorId grad, int32_t layer) {
  if (buf == kNoTensor) {
    buf = grad;
    return;
  }
  // InputBuffer::accumulate: in place when the buffer holds the last reference to the old
  // gradient's storage and it is dense; a view keeps its base alive, so a view never qualifies.
  const Tensor& old = g_.tensor(buf);
  bool dense = true;
  for (int64_t s : old.strides) dense = dense && s != 0;
  b_.set_layer(layer);
  if (refs(buf) == 1 && dense && !old.is_view) {
    b_.emit({.kind = OpKind::accumulate, .name = "grad.add_", .inputs = {buf, grad},
             .flops = static_cast<double>(numel(old.shape)), .bytes_moved = 3 * g_.view_bytes(grad)});
    drop_ref(grad);
    return;
  }
  TensorId sum = new_grad("grad_sum", old.shape, old.dtype, dense && !old.is_view ? old.strides : Strides{});
  b_.emit({.kind = OpKind::accumulate, .name = "grad.add", .inputs = {buf, grad}, .outputs = {sum},
           .flops = static_cast<double>(numel(old.shape)), .bytes_moved = 3 * g_.view_bytes(grad)});
  drop_ref(grad);
  drop_ref(buf);
  add_ref(sum);
  buf = sum;
}

void Engine::accumulate_grad(size_t i) {
  // AccumulateGrad (torch/csrc/autograd/functions/accumulate_grad.h), first gradient of the step
  // (zero_grad(set_to_none=True) left .grad empty): steal it when nothing else references it and
  // its strides match the parameter's (the gradient layout contract), else clone it.
  TensorId grad = param_buf_[i];
  TensorId p = params_[i];
  const Tensor& pt = g_.tensor(p);
  const Tensor& gt = g_.tensor(grad);
  b_.set_layer(g_.storage(pt.storage).layer);
  b_.set_scope("");
  if (grads_before_ && (*grads_before_)[i] != kNoTensor) {
    // A later micro-batch of gradient accumulation: .grad is defined and backward runs without
    // grad mode, so `variable_grad += new_grad` adds in place (dense + dense, in 1.13 and 2.x
    // alike); the new gradient is released when the node ends.
    const TensorId pg = (*grads_before_)[i];
    b_.emit({.kind = OpKind::accumulate, .name = pt.name + ".grad.add_", .inputs = {pg, grad},
             .flops = static_cast<double>(numel(pt.shape)), .bytes_moved = 3 * g_.view_bytes(grad)});
    drop_ref(grad);
    param_grad_[i] = pg;
    return;
  }
  const bool layout_ok =
      gt.strides == pt.strides && gt.offset == 0 && g_.storage(gt.storage).bytes == g_.view_bytes(grad);
  TensorId pg = grad;
  if (!(refs(grad) == 1 && layout_ok)) {
    pg = b_.fresh(pt.name + ".grad", pt.shape, pt.dtype, Category::gradient);
    b_.emit({.kind = OpKind::copy, .name = pt.name + ".grad.clone", .inputs = {grad}, .outputs = {pg},
             .bytes_moved = 2 * g_.view_bytes(grad)});
    drop_ref(grad);
    add_ref(pg);
  }
  g_.mutable_storage(g_.tensor(pg).storage).category = Category::gradient;
  g_.mutable_tensor(pg).name = pt.name + ".grad";
  param_grad_[i] = hook_ ? hook_(i, pg) : pg;
}

void Engine::deliver(TensorId grad, TensorId input, int32_t from_region) {
  Edge e;
  if (!edge_of(input, e)) return;
  if (!e.is_param && is_reentrant_region(from_region) && g_.op(e.op).region != from_region) {
    // A reentrant call's argument: its detached leaf's AccumulateGrad gathers the gradient, steals
    // it when nothing else references it and its layout matches, else clones it; the call returns
    // it (inp.grad) to the outer engine.
    ArgGrad& a = arg_grads_.at({from_region, index(e.op), e.out});
    const int32_t layer = g_.op(e.op).layer;
    accumulate(a.buf, grad, layer);
    if (--a.pending > 0) return;
    TensorId gx = a.buf;
    const Tensor& xt = g_.tensor(input);
    const Tensor& gt = g_.tensor(gx);
    // torch/csrc/autograd/utils/grad_layout_contract.h: obeys_layout_contract, clone_obey_contract.
    const bool dense = non_overlapping_and_dense(xt.shape, xt.strides);
    bool layout_ok = dense || is_contiguous(gt.shape, gt.strides);
    for (size_t d = 0; dense && d < xt.shape.size(); ++d) {
      layout_ok = layout_ok && (xt.shape[d] == 1 || gt.strides[d] == xt.strides[d]);
    }
    if (!(refs(gx) == 1 && layout_ok)) {
      b_.set_layer(layer);
      TensorId c = new_grad("checkpoint.arg.grad", xt.shape, gt.dtype, dense ? xt.strides : Strides{});
      b_.emit({.kind = OpKind::copy, .name = "checkpoint.arg.grad.clone", .inputs = {gx}, .outputs = {c},
               .bytes_moved = 2 * g_.view_bytes(gx)});
      drop_ref(gx);
      add_ref(c);
      gx = c;
    }
    std::vector<Slot>& slots = slots_[index(e.op)];
    slots.resize(g_.op(e.op).outputs.size());
    accumulate(slots[e.out].grad, gx, layer);
    if (--deps_[index(e.op)] == 0) ready_.push(index(e.op));
    return;
  }
  if (e.is_param) {
    accumulate(param_buf_[e.param], grad, g_.storage(g_.tensor(params_[e.param]).storage).layer);
    // AccumulateGrad has the highest priority in the ready queue: it runs as soon as ready.
    if (--param_deps_[e.param] == 0) accumulate_grad(e.param);
    return;
  }
  std::vector<Slot>& slots = slots_[index(e.op)];
  slots.resize(g_.op(e.op).outputs.size());
  accumulate(slots[e.out].grad, grad, g_.op(e.op).layer);
  if (--deps_[index(e.op)] == 0) ready_.push(index(e.op));
}

}  // namespace

std::vector<TensorId> differentiate(Builder& b, TensorId loss, const std::vector<TensorId>& params,
                                    const BlockPlan* plan, OpId forward_begin, const std::vector<TensorId>* grads,
                                    const GradReadyHook& on_grad_ready) {
  Engine e(b, params, plan, forward_begin, grads, on_grad_ready);
  return e.run(loss);
}

}  // namespace actsim::graph
