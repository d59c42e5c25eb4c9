// The backward pass as PyTorch's engine (torch/csrc/autograd/engine.cpp) runs it:
//  - a node per forward op with an input that requires grad; its dependencies are the number of
//    edges into it from nodes that will run;
//  - ready nodes run highest sequence number first (ReadyQueue's CompareNodeTaskTime), i.e. the
//    latest forward op first; AccumulateGrad has the highest priority, so it runs at once;
//  - a node's incoming gradients and saved tensors are released when it finishes;
//  - validate_outputs reduces a broadcast gradient with sum_to while the node's inputs are alive;
//  - InputBuffer::accumulate adds in place when it holds the only reference to the old gradient,
//    else out of place; AccumulateGrad steals a gradient it holds the only reference to and whose
#include "autodiff_engine.hpp"

#include <fmt/format.h>

#include <algorithm>

#include "actsim/util/error.hpp"

namespace actsim::graph {
namespace autodiff_detail {
namespace {

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

}  // namespace

TensorId Engine::mapped(TensorId t) {
  const Tensor& tt = g_.tensor(t);
  const uint32_t sid = index(tt.storage);
  if (sid >= remap_.size() || remap_[sid] == 0) return t;
  if (index(t) < remapped_t_.size() && remapped_t_[index(t)] != kNoTensor) return remapped_t_[index(t)];
  Tensor c = tt;
  c.storage = remap_of(sid);
  c.producer = kNoOp;
  c.requires_grad = false;
  c.is_view = true;  // a view of the replacement (which has its own first tensor)
  c.name += ".re";  // c is a copy of tt
  TensorId id = g_.add_tensor(std::move(c));
  if (index(t) >= remapped_t_.size()) remapped_t_.resize(std::max<size_t>(index(t) + 1, remapped_t_.size() * 2), kNoTensor);
  remapped_t_[index(t)] = id;
  cached_views_[index(tt.storage)].push_back(index(t));
  return id;
}

void Engine::remap_storage(uint32_t sid, StorageId to) {
  set_remap(sid, to);
  // Tensors viewing an older replacement of this storage are stale now.
  auto it = cached_views_.find(sid);
  if (it == cached_views_.end()) return;
  for (uint32_t t : it->second) remapped_t_[t] = kNoTensor;
  it->second.clear();
}

// torch.utils.checkpoint(use_reentrant=False): the first time backward needs a saved tensor of
// the region, the region's forward ops run again; only the ops whose outputs (transitively) feed
// a saved tensor are rerun (2.x stops recomputation early), ops with cached outputs (selective
// activation checkpointing) are not rerun at all.
// A wrapped number (`* scaling`) that 2.x saves past the checkpoint's hooks: no saved tensor of
// the frame, so the recomputation neither waits for it nor starts when a node reads it.
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
  if (b_.fsdp_node) b_.fsdp_node(Builder::kFsdpBackwardEnd);  // fsdp2: the root's post-backward
  b_.hold_until_last(seed);
  keep_checkpoint_frames(g_, b_.rng_stash, regions_, recomputations_, b_.ckpt_kwargs);
  return param_grad_;
}

// fsdp (issue 13): ZeRO-3 gathers a block's partitioned parameters again before its first backward
// node; the backward reads them there (the forward's gathered copy was freed after the forward).
void Engine::regather_block(int32_t layer) {
  auto it = b_.regather.find(layer);
  if (it == b_.regather.end()) return;
  const Builder::Regather rg = it->second;
  b_.regather.erase(it);
  const Storage st = g_.storage(rg.forward);  // copies: fresh() may grow the graph's tables
  const Tensor ft = g_.tensor(st.first);
  b_.set_layer(layer);
  b_.set_scope("zero3");
  const std::string unit = fmt::format("blocks.{}", layer);  // named in scope zero3
  TensorId t = b_.fresh(unit + ".gathered_params.backward", ft.shape, ft.dtype, st.category);
  const OpId gather = b_.emit({.kind = OpKind::all_gather, .name = unit + ".all_gather", .outputs = {t},
                               .bytes_moved = st.bytes, .stream = kCommStream, .params = {.group_size = rg.group}});
  b_.emit({.kind = OpKind::bucket_copy, .name = unit + ".wait", .kernels = 0, .after = {gather}});
  set_remap(index(rg.forward), g_.tensor(t).storage);
}

void Engine::run_node(OpId fid) {
  const Op& f = g_.op(fid);  // stable: the graph's ops live in a deque
  if (f.layer >= 0 && !b_.offloaded.empty()) {
    prefetch_block(f.layer);
    prefetch_block(f.layer - 1);
  }
  if (f.layer >= 0 && !b_.regather.empty()) regather_block(f.layer);  // fsdp: ZeRO-3
  if (b_.fsdp_node) {  // fsdp2: pre-/post-backward of the units (lower_fsdp.cpp)
    b_.fsdp_node(f.layer);
    for (const auto& [from, to] : b_.fsdp_remap) remap_storage(index(from), to);
    b_.fsdp_remap.clear();
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
  if (f.region >= 0 && !recomputed_[f.region] && (is_reentrant_region(f.region) || unpacks(f))) {
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
  TensorIds remapped_saved;
  if (n_remapped_ > 0) {
    remapped_saved = f.saved;
    for (TensorId& t : remapped_saved) t = mapped(t);
  }
  const TensorIds& saved = n_remapped_ > 0 ? remapped_saved : f.saved;  // f never moves
  b_.set_layer(f.layer);
  b_.set_scope(f.name);
  auto& slots = slots_[index(fid)];
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
  const TensorIds& grads = rule.grads;
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
  if (rule.collective != OpKind::backward) {  // issue 13: a tensor-parallel region's collective
    op.kind = rule.collective;
    op.params.group_size = rule.group_size;
    op.bytes_moved = rule.bytes;
    op.flops = 0;
  }
  b_.emit(std::move(op));

  // The node's outputs now reference their storages; its inputs are released after delivery's
  // sum_to (which runs inside call_function, while they are alive).
  for (TensorId t : grads) {
    if (t != kNoTensor) add_ref(t);
  }
  TensorIds node_holds;  // inline lists (issue 9: no allocation per node)
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
  struct Out {
    TensorId grad, input;
  };
  util::SmallVector<Out, 4> outs;  // (grad, input) after reduction
  outs.reserve(grads.size());
  for (size_t i = 0; i < grads.size(); ++i) {
    if (grads[i] == kNoTensor) continue;
    TensorId gi = grads[i];
    const Tensor& x = in(i);
    // issue 13, DTensor: the embedding weight's gradient is the full Replicate [V, h] of a shard
    const bool dt_full_grad = is_tp_region(f) && f.params.start == kDtEmbedding;
    if (g_.tensor(gi).shape != x.shape && !dt_full_grad) {
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
    outs.push_back({gi, f.inputs[i]});
  }
  for (const Slot& s : slots) {
    if (s.grad != kNoTensor) drop_ref(s.grad);
  }
  for (const Out& o : outs) deliver(o.grad, o.input, f.region);
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
    param_grad_[i] = hook_ ? hook_(i, pg) : pg;  // issue 13: DDP's hook on the last micro-batch
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
    auto& slots = slots_[index(e.op)];
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
  auto& slots = slots_[index(e.op)];
  slots.resize(g_.op(e.op).outputs.size());
  accumulate(slots[e.out].grad, grad, g_.op(e.op).layer);
  if (--deps_[index(e.op)] == 0) ready_.push(index(e.op));
}

}  // namespace autodiff_detail

std::vector<TensorId> differentiate(Builder& b, TensorId loss, const std::vector<TensorId>& params,
                                    const BlockPlan* plan, OpId forward_begin, const std::vector<TensorId>* grads,
                                    const GradReadyHook& on_grad_ready) {
  autodiff_detail::Engine e(b, params, plan, forward_begin, grads, on_grad_ready);
  return e.run(loss);
}

}  // namespace actsim::graph
