// Data parallelism, one rank of it (issue 13): what torch.nn.parallel.DistributedDataParallel and
// DeepSpeed's ZeRO stages 1 and 2 add to a rank's step, and the fp32 master weights.
//
//  - DDP (parallel.sharding = none, dp > 1): every gradient is copied, divided by the world size,
//    into a flat bucket (reducer.cpp mark_variable_ready_dense: mul_out(grad, 1/N) into the
//    bucket's view) by a hook that runs right after its AccumulateGrad; a bucket whose gradients
//    are all in is all-reduced on the communication stream; at the end of backward the buckets
//    are copied back into the gradients (finalize_bucket_dense). The buckets are persistent
//    (allocated when DDP is built). Buckets are filled in the order the gradients become ready
//    (Reducer::rebuild_buckets after the first iteration): the first up to 1 MiB
//    (dist._DEFAULT_FIRST_BUCKET_BYTES), the others up to bucket_cap_mb, a bucket closing as soon
//    as it reaches its cap. With gradient_as_bucket_view the gradient is dropped after the copy
//    and .grad becomes the bucket's view. DDP.forward first broadcasts the module's buffers from
//    rank 0 (_sync_buffers: one flattened copy of the buffers of a dtype at a time).
//  - ZeRO-1 (DeepSpeed stage 1): gradients all-reduced in buckets, in place; the optimizer state
//    (fp32 master copy, exp_avg, exp_avg_sq) is one flat fp32 partition of ceil(P / N) elements
//    per rank; after the step the updated bf16/fp32 parameter shards are all-gathered.
//  - ZeRO-2: each gradient is reduce-scattered as soon as it is ready and only its shard kept.
//  - master_weights = fp32 without sharding: the same flat fp32 partition with N = 1.
#include <algorithm>

#include "lowering.hpp"

namespace actsim::graph {

struct Lowering::Parallel {
  OpId broadcast = kNoOp;                 // DDP.forward's buffer broadcast (workspace set at the end)
  struct Bucket {
    TensorId flat = kNoTensor;            // DDP: the persistent flat bucket; ZeRO-1: none
    int64_t bytes = 0;
    std::vector<TensorId> grads;          // ZeRO-1: the gradients reduced together
    OpId last_copy = kNoOp;
    bool closed = false;                  // full (its cap reached): all-reduced
  };
  std::vector<Bucket> buckets;
  std::vector<OpId> reductions;           // collectives the end of backward waits for
  size_t ready = 0;                       // gradients made so far
};

std::string_view to_string(Sharding s) {
  switch (s) {
    case Sharding::none: return "none";
    case Sharding::zero1: return "zero1";
    case Sharding::zero2: return "zero2";
  }
  return "?";
}

namespace {
constexpr int32_t kCommStream = 2;
constexpr int64_t kFirstBucketBytes = 1024 * 1024;  // torch.distributed._DEFAULT_FIRST_BUCKET_BYTES
int64_t shard(int64_t n, int64_t ranks) { return (n + ranks - 1) / ranks; }
}  // namespace

void Lowering::parallel_forward_begin() {
  if (!tr.parallel.active()) return;
  par = std::make_shared<Parallel>();
  if (tr.parallel.sharding != Sharding::none) return;
  b.set_layer(-1);
  b.set_scope("ddp");
  // _sync_buffers -> _distributed_broadcast_coalesced: flatten, broadcast, copy back, free.
  par->broadcast = b.emit({.kind = OpKind::all_gather, .name = "ddp.broadcast_buffers", .kernels = 1,
                           .params = {.group_size = tr.parallel.dp}});
}

void Lowering::parallel_forward_end() {
  if (!par || par->broadcast == kNoOp) return;
  Graph& g = out.graph;
  int64_t by_dtype[8] = {};
  for (const Storage& st : g.storages()) {
    if (st.category == Category::buffer && st.producer == kNoOp) by_dtype[static_cast<int>(g.tensor(st.first).dtype)] += st.bytes;
  }
  const int64_t ws = *std::max_element(std::begin(by_dtype), std::end(by_dtype));
  Op& op = g.mutable_op(par->broadcast);
  op.workspace_bytes = ws;
  op.bytes_moved = 2 * ws;
  if (ws == 0) op.kernels = 0;  // no buffers: nothing broadcast
}

TensorId Lowering::parallel_grad_ready(size_t i, TensorId grad) {
  Graph& g = out.graph;
  const ParallelConfig& pc = tr.parallel;
  const int64_t N = pc.dp;
  const TensorId p = out.params[i];
  const std::string name = g.tensor(p).name;
  const int64_t bytes = g.view_bytes(grad);
  ++par->ready;
  const bool last = par->ready == out.params.size();
  if (pc.sharding == Sharding::zero2) {
    // reduce_scatter of the gradient; this rank keeps its shard, the full gradient dies with it.
    TensorId sh = b.fresh(name + ".grad_shard", {shard(numel(g.tensor(p).shape), N)}, g.tensor(grad).dtype,
                          Category::gradient);
    OpId rs = b.emit({.kind = OpKind::reduce_scatter, .name = name + ".grad.reduce_scatter", .inputs = {grad},
                      .outputs = {sh}, .bytes_moved = bytes, .stream = kCommStream,
                      .params = {.group_size = N}});
    par->reductions.push_back(rs);
    return sh;
  }
  if (par->buckets.empty() || par->buckets.back().closed) {
    par->buckets.emplace_back();
    if (pc.sharding == Sharding::none) {
      Parallel::Bucket& nb = par->buckets.back();
      nb.flat = b.leaf(fmt::format("ddp.bucket{}", par->buckets.size() - 1), {0}, g.tensor(grad).dtype,
                       Category::gradient, false);
    }
  }
  Parallel::Bucket& bk = par->buckets.back();
  TensorId result = grad;
  if (pc.sharding == Sharding::none) {
    Tensor& flat = g.mutable_tensor(bk.flat);
    const int64_t offset = flat.shape[0];
    flat.shape[0] += numel(g.tensor(grad).shape);
    g.mutable_storage(flat.storage).bytes += bytes;
    b.set_scope("ddp");
    // mul_out(bucket_view, grad, 1/N): a wrapped Python number and its cast while it runs.
    Op copy{.kind = OpKind::bucket_copy, .name = name + ".grad.to_bucket", .inputs = {grad, bk.flat},
            .workspace_bytes = prof.scalar_temp_bytes(g.tensor(grad).dtype), .flops = static_cast<double>(bytes),
            .bytes_moved = 2 * bytes};
    if (pc.gradient_as_bucket_view) {
      result = b.alias(bk.flat, name + ".grad", g.tensor(p).shape, {}, offset);
      copy.outputs = {result};
    }
    bk.last_copy = b.emit(std::move(copy));
  } else {
    bk.grads.push_back(grad);
  }
  bk.bytes += bytes;
  const int64_t limit = par->buckets.size() == 1 ? kFirstBucketBytes
                                                 : static_cast<int64_t>(pc.bucket_cap_mb * 1024 * 1024);
  if (bk.bytes >= limit || last) {
    bk.closed = true;
    std::vector<TensorId> ins = pc.sharding == Sharding::none ? std::vector<TensorId>{bk.flat} : bk.grads;
    Op ar{.kind = OpKind::all_reduce, .name = fmt::format("{}.bucket{}.all_reduce",
                                                          pc.sharding == Sharding::none ? "ddp" : "zero",
                                                          par->buckets.size() - 1),
          .inputs = std::move(ins), .bytes_moved = bk.bytes, .stream = kCommStream,
          .params = {.group_size = N}};
    if (bk.last_copy != kNoOp) ar.after = {bk.last_copy};
    par->reductions.push_back(b.emit(std::move(ar)));
  }
  return result;
}

void Lowering::parallel_backward_end() {
  if (!par) return;
  b.set_layer(-1);
  b.set_scope(tr.parallel.sharding == Sharding::none ? "ddp" : "zero");
  // The reducer's finalize (queue_callback at the end of backward) waits for every reduction;
  // DDP then copies each bucket back into the gradients (in place) unless they are its views.
  Op fin{.kind = OpKind::bucket_copy, .name = tr.parallel.sharding == Sharding::none ? "ddp.finalize" : "zero.finalize",
         .kernels = 0, .after = par->reductions};
  if (tr.parallel.sharding == Sharding::none && !tr.parallel.gradient_as_bucket_view) {
    int64_t total = 0;
    for (const auto& bk : par->buckets) {
      fin.inputs.push_back(bk.flat);
      total += bk.bytes;
    }
    for (TensorId t : out.param_grads) {
      if (t != kNoTensor) fin.inputs.push_back(t);
    }
    fin.kernels = static_cast<int32_t>(out.params.size());
    fin.bytes_moved = 2 * total;
  }
  b.emit(std::move(fin));
}

void Lowering::optimizer_flat() {
  // A flat fp32 partition (DeepSpeed's single_partition_of_fp32_groups, Megatron's main params):
  // master copy, exp_avg and exp_avg_sq of ceil(P / N) elements; FusedAdam over it.
  b.set_phase(Phase::optimizer);
  b.set_layer(-1);
  b.set_scope("optimizer");
  out.optimizer_impl = OptimizerImpl::fused;
  Graph& g = out.graph;
  const int64_t N = tr.parallel.sharding == Sharding::none ? 1 : tr.parallel.dp;
  int64_t P = 0;
  for (TensorId p : out.params) P += numel(g.tensor(p).shape);
  const int64_t S = shard(P, N);
  TensorId master = b.leaf("optimizer.fp32_master", {S}, DType::f32, Category::optimizer_state, false);
  TensorId m = b.leaf("optimizer.exp_avg", {S}, DType::f32, Category::optimizer_state, false);
  TensorId v = b.leaf("optimizer.exp_avg_sq", {S}, DType::f32, Category::optimizer_state, false);
  TensorId step = b.leaf("optimizer.step", {}, DType::f32, Category::optimizer_state, false);
  std::vector<TensorId> grads;
  for (TensorId t : out.param_grads) {
    if (t != kNoTensor) grads.push_back(t);
  }
  // This rank's gradient shard as fp32 (a copy even when the gradients are fp32).
  TensorId g32 = b.fresh("optimizer.fp32_grad", {S}, DType::f32, Category::temporary);
  b.emit({.kind = OpKind::optim_temp, .name = "optimizer.grad_to_fp32", .inputs = grads, .outputs = {g32},
          .flops = static_cast<double>(S), .bytes_moved = S * (4 + dtype_size(dt))});
  OpParams op;
  op.optim = {.step = OptimStep::adam_fused, .decoupled = tr.optimizer == Optimizer::adamw, .lr = tr.lr,
              .weight_decay = tr.weight_decay >= 0 ? tr.weight_decay : (tr.optimizer == Optimizer::adamw ? 1e-2 : 0.0)};
  b.emit({.kind = OpKind::optim_update, .name = "optimizer.fused_adam", .inputs = {master, g32, m, v, step},
          .flops = 16.0 * static_cast<double>(S), .bytes_moved = 4 * 7 * S, .params = op});
  // The updated master shard cast into this rank's shard of the parameters.
  std::vector<TensorId> ins{master};
  ins.insert(ins.end(), out.params.begin(), out.params.end());
  OpId cast = b.emit({.kind = OpKind::optim_update, .name = "optimizer.master_to_params", .inputs = ins,
                      .flops = static_cast<double>(S), .bytes_moved = S * (4 + dtype_size(dt))});
  if (N > 1) {
    b.emit({.kind = OpKind::all_gather, .name = "zero.params.all_gather", .inputs = out.params,
            .bytes_moved = P * dtype_size(dt), .stream = kCommStream, .after = {cast},
            .params = {.group_size = N}});
  }
}

}  // namespace actsim::graph
