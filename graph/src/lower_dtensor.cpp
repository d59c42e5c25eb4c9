// Tensor and sequence parallelism with PyTorch's DTensor, one rank of it (issue 13,
// parallel.tp_impl = "dtensor"): the reference llama parallelized with
// torch.distributed.tensor.parallel.parallelize_module as torchtitan's apply_tp does
// (tests/torch/measure_dtensor.py is the oracle: 2 gloo ranks on the CPU, to the byte).
//
//  - ColwiseParallel (q/k/v_proj, w1, w3, lm_head): the weight shard [out/t, in]. Without sp each
//    module wraps its input with DTensor.from_local(Replicate) on its own: in backward each one
//    all-reduces its input gradient (a functional all-reduce: a new buffer, the partial gradient
//    freed), three all-reduces for q, k and v where Megatron has one. With sp, PrepareModuleInput
//    (or lm_head's input_layouts = Shard(1)) all-gathers the [b, s/t, h] shard to [b, s, h] and
//    the matmuls SAVE the gathered input (Megatron saves the shard and gathers again in
//    backward): t times the bytes of Megatron's saved input; its gradient is reduce-scattered once.
//  - RowwiseParallel (o_proj, w2): the weight shard [out, in/t]; the partial output redistributed
//    to Replicate (all-reduce) or Shard(1) (reduce-scatter), out of place: a new buffer, the
//    partial freed after it. Redistributing along dim 1 first concatenates the chunks along dim 0
//    (a copy of the partial), and gloo's reduce-scatter clones its input once more.
//  - An all-gather along dim 1 gathers along dim 0 into a [t*b, s/t, h] buffer and concatenates
//    its chunks: a second full-size buffer while it runs.
//  - RowwiseParallel embedding (tok_embeddings): the vocabulary split in t equal shards (no
//    padding: the loader refuses a vocabulary t does not divide); the out-of-shard mask (an
//    [b, s] bool) lives until the partial lookup is reduced; the lookup saves the ids, not the
//    masked ids; its weight gradient is embedding_dense_backward's on the Replicate gradient:
//    a full [V, h] tensor, not the shard, kept as the parameter's .grad until zero_grad.
//  - loss_parallel (torchtitan's default): log_softmax on the [b*s, V/t] logits shard with two
//    all-reduces of one fp32 value per token, then nll_loss with a third; its backward computes
//    the whole gradient of the logits (exp(logp) - one-hot) with its temporaries (two logits-size
//    buffers and 33 bytes per token), and log_softmax's backward passes it through.
//  - Norms (SequenceParallel with sp) and the residual adds on [b, s/t, h] with sp.
// Collectives are ops of the compute stream (DTensor waits for each before its first use).
// Not modelled: the Partial gradients of the replicated norm weights under sp, all-reduced by
// every optimizer op that reads them (small transients), and DTensor's 4- and 8-byte scalars.
#include "backward_rules.hpp"
#include "lowering.hpp"

namespace actsim::graph {

bool Lowering::gloo() const { return prof.id == ProfileId::torch2_cpu; }

namespace {
Op dt_op(OpKind k, const char* name, TpRegion r, int64_t tp, int64_t bytes, int64_t backward_ws = 0) {
  Op op{.kind = k, .name = name, .bytes_moved = bytes, .kernels = r == kDtFromLocal ? 0 : 1,
        .params = {.start = r, .group_size = tp}};
  op.params.scalar = static_cast<double>(backward_ws);
  return op;
}
}  // namespace

TensorId Lowering::dt_in(TensorId x) {
  if (!sp()) return x;  // each ColwiseParallel wraps its input itself (dt_column)
  Graph& g = out.graph;
  const Tensor xt = g.tensor(x);
  Shape full = xt.shape;
  full[1] *= tp();
  TensorId y = b.fresh("dt.all_gather", full, xt.dtype);
  // all_gather_into_tensor into [t*b, s/t, h], then chunk + cat along dim 1; its backward, a
  // reduce-scatter along dim 1, concatenates first (and gloo clones once more).
  const int64_t full_bytes = g.view_bytes(y);
  Op op = dt_op(OpKind::all_gather, "dt.redistribute_shard1_to_replicate", kDtGather, tp(), full_bytes,
                (gloo() ? 2 : 1) * full_bytes);
  op.workspace_bytes = full_bytes;
  op.inputs = {x};
  op.outputs = {y};
  b.emit(std::move(op));
  return y;
}

TensorId Lowering::dt_column(TensorId xin, TensorId w, std::optional<TensorId> bias) {
  if (sp()) return linear(xin, w, bias);  // the gathered input, saved by the matmul
  const Tensor xt = out.graph.tensor(xin);
  TensorId y = b.alias(xin, xt.name, xt.shape, xt.strides, xt.offset);
  Op op = dt_op(OpKind::all_reduce, "dt.from_local", kDtFromLocal, tp(), 0);
  op.inputs = {xin};
  op.outputs = {y};
  b.emit(std::move(op));
  return linear(y, w, bias);
}

TensorId Lowering::dt_row(TensorId x, TensorId w, std::optional<TensorId> bias) {
  Graph& g = out.graph;
  TensorId y = linear(x, w, std::nullopt);
  const Tensor yt = g.tensor(y);
  const int64_t bytes = g.view_bytes(y);
  TensorId r;
  if (!sp()) {
    r = b.fresh("dt.all_reduce", yt.shape, yt.dtype);
    Op op = dt_op(OpKind::all_reduce, "dt.redistribute_partial_to_replicate", kDtAllReduce, tp(), bytes);
    op.inputs = {y};
    op.outputs = {r};
    b.emit(std::move(op));
  } else {
    Shape shard = yt.shape;
    shard[1] /= tp();
    r = b.fresh("dt.reduce_scatter", shard, yt.dtype);
    // the chunks along dim 1 concatenated along dim 0 (and cloned by gloo); backward: an
    // all-gather along dim 1 (its [t*b, s/t, h] buffer)
    Op op = dt_op(OpKind::reduce_scatter, "dt.redistribute_partial_to_shard1", kDtReduceScatter, tp(), bytes, bytes);
    op.workspace_bytes = (gloo() ? 2 : 1) * bytes;
    op.inputs = {y};
    op.outputs = {r};
    b.emit(std::move(op));
  }
  return bias ? b.binary(OpKind::add, r, *bias) : r;
}

TensorId Lowering::dt_embedding(TensorId w, TensorId idx, bool scatter) {
  Graph& g = out.graph;
  const Shape is = g.tensor(idx).shape;
  // _MaskPartial: mask = (ids < start) | (ids >= end), kept for the reduction; the masked ids
  // (ids.clone() - start, masked to 0) live through the lookup.
  TensorId mask = b.fresh("dt.embedding.mask", is, DType::b8);
  b.emit({.kind = OpKind::moe_index, .name = "dt.embedding.mask", .inputs = {idx}, .outputs = {mask},
          .workspace_bytes = 2 * numel(is) * dtype_size(DType::i64), .bytes_moved = 3 * numel(is) * 8, .kernels = 5});
  // The autograd node is the DTensor embedding on the Replicate-placed gradient: the weight's
  // gradient is a full [V, h] tensor (embedding_dense_backward), not the shard.
  const size_t first = g.n_ops();
  TensorId e = b.embedding(w, idx);
  Op& eop = g.mutable_op(OpId{static_cast<uint32_t>(first)});
  eop.workspace_bytes = numel(is) * dtype_size(DType::i64);  // the masked ids
  eop.params.start = kDtEmbedding;
  eop.params.group_size = tp();
  const Tensor et = g.tensor(e);
  const int64_t bytes = g.view_bytes(e);
  TensorId r;
  if (scatter && sp()) {
    Shape shard = et.shape;
    shard[1] /= tp();
    r = b.fresh("dt.reduce_scatter", shard, et.dtype);
    Op op = dt_op(OpKind::reduce_scatter, "dt.redistribute_partial_to_shard1", kDtReduceScatter, tp(), bytes, bytes);
    op.workspace_bytes = (gloo() ? 2 : 1) * bytes;
    op.inputs = {e, mask};
    op.outputs = {r};
    b.emit(std::move(op));
  } else {
    r = b.fresh("dt.all_reduce", et.shape, et.dtype);
    Op op = dt_op(OpKind::all_reduce, "dt.redistribute_partial_to_replicate", kDtAllReduce, tp(), bytes);
    op.inputs = {e, mask};
    op.outputs = {r};
    b.emit(std::move(op));
  }
  return r;
}

TensorId Lowering::dt_cross_entropy(TensorId logits2d, TensorId target1d) {
  Graph& g = out.graph;
  const Tensor lt = g.tensor(logits2d);
  const int64_t N = lt.shape[0], L = g.view_bytes(logits2d), e = dtype_size(lt.dtype);
  // _log_softmax on the shard, in fp32: amax and its all-reduce, x - max, exp, sum and its
  // all-reduce, log, then (x - max) - log (fp32 values per token: 12 bytes live at the end); the
  // shifted logits live until the result exists. 16-bit logits are copied to fp32 first and the
  // fp32 result cast back: the copy, the shifted logits and the fp32 result live at once.
  TensorId logp = b.fresh("dt.log_softmax", lt.shape, lt.dtype);
  Op ls = dt_op(OpKind::log_softmax, "dt.loss_parallel.log_softmax", kDtLogSoftmax, tp(), 3 * L);
  ls.workspace_bytes = (e < 4 ? 3 * (L / e * 4) : L) + 12 * N;
  ls.inputs = {logits2d};
  ls.outputs = {logp};
  b.emit(std::move(ls));
  g.mutable_op(OpId{static_cast<uint32_t>(g.n_ops() - 1)}).saved.clear();
  // _nll_loss_forward: the target mask and its masked copy, the gathered log-probabilities and
  // their all-reduce; the loss and total_weight out.
  TensorId loss = b.fresh("loss", {}, lt.dtype);
  TensorId total_weight = b.fresh("nll_loss.total_weight", {}, lt.dtype);
  // backward: zeros_like, exp and add of the logits' size beside the result, and 33 bytes per
  // token (the int64 where/masked target/arange, the fp32 where and sub, the bool mask)
  Op nl = dt_op(OpKind::nll_loss, "dt.loss_parallel.nll_loss", kDtNllLoss, tp(), 2 * g.view_bytes(target1d),
                2 * L + N * (3 * 8 + 2 * e + 1));
  nl.workspace_bytes = 2 * N * 8 + 3 * N * e;
  nl.inputs = {logp, target1d};
  nl.outputs = {loss, total_weight};
  b.emit(std::move(nl));
  Op& o = g.mutable_op(OpId{static_cast<uint32_t>(g.n_ops() - 1)});
  o.saved = {logp, target1d, total_weight};
  return loss;
}

}  // namespace actsim::graph
