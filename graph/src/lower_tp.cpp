// Tensor and sequence parallelism, one rank of it (issue 13): Megatron-LM's layers
// (megatron/core/tensor_parallel/layers.py, mappings.py, cross_entropy.py) as hooks the gpt2 and
// llama lowerings call instead of F.linear and F.embedding. With parallel.tp == 1 every hook is
// the plain op, so the graph is the single-device one.
//
//  - ColumnParallelLinear (QKV / q,k,v, fc1 / w1,w3, lm_head): the weight shard [out/t, in]. Its
//    input passes through copy_to_tensor_model_parallel_region (identity; the backward
//    all-reduces the input's gradient) or, with sequence parallelism, is all-gathered from the
//    [s/t] shard. Megatron's LinearWithGradAccumulationAndAsyncCommunication saves the shard, not
//    the gathered input, and gathers it again in backward: the gathered input here lives from
//    the all-gather to the matmul, the saved tensor is the shard.
//  - RowParallelLinear (attention projection, fc2 / w2): the weight shard [out, in/t]; the partial
//    output all-reduced (reduce_from_tensor_model_parallel_region) or, with sequence parallelism,
//    reduce-scattered to [s/t]; the bias (replicated) added after the reduction.
//  - Attention on n_heads/t heads (and n_kv_heads/t key/value heads: the query groups are sharded,
//    never replicated; the loader refuses a tp that does not divide them).
//  - VocabParallelEmbedding: rows [V'/t, h] of the vocabulary padded as Megatron pads it
//    (make_vocab_size_divisible_by = 128, times t); out-of-shard ids masked to 0; the partial
//    lookup all-reduced, or reduce-scattered with sequence parallelism when no position
//    embedding follows (llama). gpt2 adds its (replicated) position embedding to the full
//    sequence, then scatters it (scatter_to_sequence_parallel_region: a split, no communication).
//  - Vocab-parallel cross-entropy on the [b, s, V'/t] logits shard: the all-reduces of the logits'
//    max, the predicted logits and the sum of exponentials (fp32, one value per token) are ops.
//    The loss itself is PyTorch's cross_entropy on the shard (Megatron's fp32 exp_logits saved
//    for backward are the same bytes as log_softmax's fp32 output of 16-bit logits on CUDA).
//  - Norms and dropouts see [b, s/t, h] under sequence parallelism, [b, s, h] without.
// Collectives run on the compute stream: Megatron's tensor-parallel communication is synchronous,
// on the critical path; its time is the ring collective's over t ranks (sim/src/engine.cpp).
// Not modelled: Megatron's global memory buffer for the gathered input (a temporary here), the
// backward re-gather's buffer and time, and the in-place zeroing of out-of-shard embedding rows.
#include "backward_rules.hpp"
#include "lowering.hpp"

namespace actsim::graph {

std::string_view to_string(TpImpl t) { return t == TpImpl::megatron ? "megatron" : "dtensor"; }

int64_t Lowering::tp_vocab() const {
  if (tp() == 1) return m.vocab_size;
  if (dtensor()) return m.vocab_size / tp();  // DTensor: equal shards (the loader checks t | V)
  const int64_t multiple = 128 * tp();  // megatron/training/tokenizer: _vocab_size_with_padding
  return (m.vocab_size + multiple - 1) / multiple * multiple / tp();
}

namespace {
// A tensor-parallel region op of the compute stream (its backward: backward_rules.cpp).
Op region(OpKind k, const char* name, TpRegion r, int64_t tp, int64_t bytes) {
  return Op{.kind = k, .name = name, .bytes_moved = bytes, .kernels = r == kTpCopyTo ? 0 : 1,
            .params = {.start = r, .group_size = tp}};
}
}  // namespace

TensorId Lowering::tp_in(TensorId x) {
  if (tp() == 1) return x;
  if (dtensor()) return dt_in(x);  // lower_dtensor.cpp
  Graph& g = out.graph;
  const Tensor xt = g.tensor(x);
  if (!sp()) {
    TensorId y = b.alias(x, xt.name, xt.shape, xt.strides, xt.offset);
    Op op = region(OpKind::all_reduce, "tp.copy_to_region", kTpCopyTo, tp(), 0);
    op.inputs = {x};
    op.outputs = {y};
    b.emit(std::move(op));
    return y;
  }
  Shape full = xt.shape;
  full[1] *= tp();  // [b, s/t, h] -> [b, s, h]
  TensorId y = b.fresh("tp.all_gather", full, xt.dtype);
  Op op = region(OpKind::all_gather, "tp.gather_from_sp_region", kTpGatherFromSp, tp(), g.view_bytes(y));
  op.inputs = {x};
  op.outputs = {y};
  b.emit(std::move(op));
  tp_shard_of[index(y)] = x;
  return y;
}

TensorId Lowering::tp_column(TensorId xin, TensorId w, std::optional<TensorId> bias) {
  if (dtensor()) return dt_column(xin, w, bias);
  Graph& g = out.graph;
  const size_t first = g.n_ops();
  TensorId y = linear(xin, w, bias);
  auto it = tp_shard_of.find(index(xin));
  if (it == tp_shard_of.end()) return y;
  // The matmul saves the sequence shard (Megatron's ctx.save_for_backward(input, weight)).
  const StorageId gathered = g.tensor(xin).storage;
  for (size_t i = first; i < g.n_ops(); ++i) {
    Op& op = g.mutable_op(OpId{static_cast<uint32_t>(i)});
    for (TensorId& t : op.saved) {
      if (g.tensor(t).storage == gathered) t = it->second;
    }
  }
  return y;
}

TensorId Lowering::tp_row(TensorId x, TensorId w, std::optional<TensorId> bias) {
  if (tp() == 1) return linear(x, w, bias);
  if (dtensor()) return dt_row(x, w, bias);
  Graph& g = out.graph;
  TensorId y = linear(x, w, std::nullopt);
  const Tensor yt = g.tensor(y);
  if (!sp()) {
    TensorId r = b.alias(y, yt.name, yt.shape, yt.strides, yt.offset);
    Op op = region(OpKind::all_reduce, "tp.reduce_from_region", kTpReduceFrom, tp(), g.view_bytes(y));
    op.inputs = {y};
    op.outputs = {r};
    b.emit(std::move(op));
    y = r;
  } else {
    Shape shard = yt.shape;
    shard[1] /= tp();
    TensorId r = b.fresh("tp.reduce_scatter", shard, yt.dtype);
    Op op = region(OpKind::reduce_scatter, "tp.reduce_scatter_to_sp_region", kTpReduceScatterToSp, tp(), g.view_bytes(y));
    op.inputs = {y};
    op.outputs = {r};
    b.emit(std::move(op));
    y = r;
  }
  return bias ? b.binary(OpKind::add, y, *bias) : y;
}

TensorId Lowering::tp_embedding(TensorId w, TensorId idx, bool scatter) {
  if (tp() == 1) return b.embedding(w, idx);
  if (dtensor()) return dt_embedding(w, idx, scatter);
  Graph& g = out.graph;
  const Shape is = g.tensor(idx).shape;
  // input_mask = (ids < start) | (ids >= end); masked_input = ids - start; masked_input[input_mask] = 0
  TensorId mask = b.fresh("vocab_parallel.input_mask", is, DType::b8);
  TensorId masked = b.fresh("vocab_parallel.masked_input", is, DType::i64);
  b.emit({.kind = OpKind::moe_index, .name = "vocab_parallel.mask", .inputs = {idx}, .outputs = {mask, masked},
          .bytes_moved = 2 * g.view_bytes(masked) + g.view_bytes(mask), .kernels = 4});
  TensorId e = b.embedding(w, masked);
  b.hold_until_last(mask);
  const Tensor et = g.tensor(e);
  if (scatter && sp()) {
    Shape shard = et.shape;
    shard[1] /= tp();
    TensorId r = b.fresh("tp.reduce_scatter", shard, et.dtype);
    Op op = region(OpKind::reduce_scatter, "tp.reduce_scatter_to_sp_region", kTpReduceScatterToSp, tp(), g.view_bytes(e));
    op.inputs = {e};
    op.outputs = {r};
    b.emit(std::move(op));
    return r;
  }
  TensorId r = b.alias(e, et.name, et.shape, et.strides, et.offset);
  Op op = region(OpKind::all_reduce, "tp.reduce_from_region", kTpReduceFrom, tp(), g.view_bytes(e));
  op.inputs = {e};
  op.outputs = {r};
  b.emit(std::move(op));
  return r;
}

TensorId Lowering::tp_scatter(TensorId x) {
  if (!sp()) return x;
  Graph& g = out.graph;
  const Tensor xt = g.tensor(x);
  Shape shard = xt.shape;
  shard[1] /= tp();
  TensorId r = b.fresh("tp.scatter", shard, xt.dtype);
  // _split_along_first_dim: a narrow and .contiguous() (a copy); no communication.
  Op op = region(OpKind::copy, "tp.scatter_to_sp_region", kTpScatterToSp, tp(), 2 * g.view_bytes(r));
  op.inputs = {x};
  op.outputs = {r};
  b.emit(std::move(op));
  return r;
}

void Lowering::tp_loss_reductions() {
  if (tp() == 1 || dtensor()) return;  // DTensor: loss_parallel's own (dt_cross_entropy)
  const int64_t bytes = tr.batch_size * m.seq_len * 4;  // one fp32 value per token
  for (const char* n : {"vocab_parallel_ce.logits_max.all_reduce", "vocab_parallel_ce.predicted_logits.all_reduce",
                        "vocab_parallel_ce.sum_exp_logits.all_reduce"}) {
    b.emit({.kind = OpKind::all_reduce, .name = n, .workspace_bytes = bytes, .bytes_moved = bytes,
            .params = {.group_size = tp()}});
  }
}

}  // namespace actsim::graph
