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
//  - ZeRO-3 (DeepSpeed stage 3, zero3.md / partition_parameters.py): every parameter of at least
//    stage3_param_persistence_threshold (1e5) elements is partitioned, this rank keeping
//    ceil(numel / N) elements of it (ds_tensor, padded per parameter); smaller ones stay whole
//    (persistent). A unit's partitioned parameters are all-gathered into their full size before
//    it runs and released after: each block around its forward and again around its backward
//    (gathered when the backward reaches it: the first gradient of the step for the last block,
//    the previous block's last gradient for the others), the model's other parameters (embedding,
//    final norm, head: the root unit) from the forward's start to the end of backward.
//    Gradients are reduce-scattered as ZeRO-2's; the fp32 partition is the sum of the parameters'
//    partitions; nothing is all-gathered after the step (the parameters stay partitioned).
//  - master_weights = fp32 without sharding: the same flat fp32 partition with N = 1.
//  - zero_redundancy: sharding = zero1 with zero_impl = torch is DDP here (ParallelConfig::ddp());
//    its optimizer is lower_zero_redundancy.cpp's.
#include <algorithm>
#include <map>
#include <unordered_map>

#include "lowering.hpp"

namespace actsim::graph {

struct Lowering::Parallel {
  std::vector<OpId> broadcasts;           // DDP.forward's buffer broadcasts (workspace set at the end)
  struct Bucket {
    TensorId flat = kNoTensor;            // DDP: the persistent flat bucket; ZeRO-1: none
    int64_t bytes = 0;
    std::vector<TensorId> grads;          // ZeRO-1: the gradients reduced together
    OpId last_copy = kNoOp;
    bool closed = false;                  // full (its cap reached): all-reduced
    size_t n_grads = 0;                   // gradients in it
    size_t n_filled = 0;                  // a later backward: gradients copied in so far
  };
  std::vector<Bucket> buckets;
  std::vector<OpId> reductions;           // collectives the end of backward waits for
  size_t ready = 0;                       // gradients made so far in this backward
  size_t trainable = 0;                   // parameters that get a gradient (require grad)
  size_t forwards = 0;                    // DDP.forward calls lowered (micro-batches)
  // Gradient accumulation with hooks in more than one backward: the buckets are laid out by the
  // first one; a later one fills the same buckets (param -> bucket, offset in elements).
  bool laid_out = false;
  std::unordered_map<size_t, std::pair<size_t, int64_t>> slot;
  // fsdp: ZeRO-3's units (layer -> unit; -1 the root): gathered parameters and backward progress.
  struct Unit {
    TensorId gathered = kNoTensor;        // the all-gathered full parameters while the unit runs
    OpId gather = kNoOp;
    int64_t elements = 0;                 // partitioned parameters' full elements
  };
  std::map<int32_t, Unit> units;
  bool zero3_laid_out = false;
  std::vector<TensorId> partitions;       // this rank's partition of each parameter (params order)
  std::map<int32_t, std::vector<TensorId>> pending;  // each unit's partitioned parameters
};

std::string_view to_string(Sharding s) {
  switch (s) {
    case Sharding::none: return "none";
    case Sharding::zero1: return "zero1";
    case Sharding::zero2: return "zero2";
    case Sharding::zero3: return "zero3";
    case Sharding::fsdp2: return "fsdp2";  // fsdp2: lower_fsdp.cpp
  }
  return "?";
}

namespace {
constexpr int64_t kFirstBucketBytes = 1024 * 1024;  // torch.distributed._DEFAULT_FIRST_BUCKET_BYTES
int64_t shard(int64_t n, int64_t ranks) { return (n + ranks - 1) / ranks; }
constexpr int64_t kPersistenceThreshold = 100000;  // DeepSpeed's stage3_param_persistence_threshold
bool zero3_partitioned(int64_t numel) { return numel >= kPersistenceThreshold; }
}  // namespace

void Lowering::parallel_forward_begin() {
  if (!tr.parallel.active()) return;
  if (!par) par = std::make_shared<Parallel>();
  const size_t k = par->forwards++;
  if (tr.parallel.sharding == Sharding::fsdp2) return fsdp2_forward_begin();  // fsdp2
  if (tr.parallel.sharding == Sharding::zero3) return zero3_gather(-1);
  if (!tr.parallel.ddp()) return;  // zero_redundancy: DDP's too
  // _pre_forward broadcasts the buffers when the previous forward left require_forward_param_sync
  // set, i.e. ran outside no_sync: every micro-batch's forward, or with no_sync only the first
  // one's (the step before ended with a synchronised forward); .params are built by then.
  if (k > 0 && tr.parallel.no_sync) return;
  // ppdp: a pipeline stage's DDP runs every forward under no_sync (torch.distributed.pipelining's
  // forward_maybe_with_nosync), so no steady step broadcasts.
  if (tr.parallel.pp > 1) return;
  b.set_layer(-1);
  b.set_scope("ddp");
  // _sync_buffers -> _distributed_broadcast_coalesced: flatten, broadcast, copy back, free.
  par->broadcasts.push_back(b.emit({.kind = OpKind::all_gather, .name = "ddp.broadcast_buffers", .kernels = 1,
                                    .params = {.group_size = tr.parallel.dp}}));
}

void Lowering::parallel_forward_end() {
  if (fsdp) fsdp2_forward_end();  // fsdp2
  if (!par || par->broadcasts.empty()) return;
  Graph& g = out.graph;
  int64_t by_dtype[8] = {};
  for (const Storage& st : g.storages()) {
    if (st.category == Category::buffer && st.producer == kNoOp) by_dtype[static_cast<int>(g.tensor(st.first).dtype)] += st.bytes;
  }
  const int64_t ws = *std::max_element(std::begin(by_dtype), std::end(by_dtype));
  for (OpId id : par->broadcasts) {
    Op& op = g.mutable_op(id);
    op.workspace_bytes = ws;
    op.bytes_moved = 2 * ws;
    if (ws == 0) op.kernels = 0;  // no buffers: nothing broadcast
  }
}

bool Lowering::parallel_hooks(bool last_micro_batch) const {
  // DDP's no_sync (accelerate, HF Trainer): the reducer's hooks are armed only by a forward run
  // outside it, the last micro-batch's. ZeRO (refused with accumulation) and no_sync = false:
  // every backward reduces.
  return tr.parallel.active() && (last_micro_batch || !tr.parallel.no_sync);
}

TensorId Lowering::parallel_grad_ready(size_t i, TensorId grad) {
  Graph& g = out.graph;
  const ParallelConfig& pc = tr.parallel;
  const int64_t N = pc.dp;
  const TensorId p = out.params[i];
  const std::string name = g.tensor(p).name;
  const int64_t bytes = g.view_bytes(grad);
  if (pc.sharding == Sharding::fsdp2) return fsdp2_grad_ready(i, grad);  // fsdp2
  if (par->trainable == 0) {  // the model's parameters exist once its forward is lowered
    for (TensorId q : out.params) par->trainable += g.tensor(q).requires_grad ? 1 : 0;
  }
  ++par->ready;
  const bool last = par->ready == par->trainable;
  if (par->laid_out && pc.ddp()) return ddp_refill(i, grad);
  if (pc.sharding == Sharding::zero2 || pc.sharding == Sharding::zero3) {
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
    if (pc.ddp()) {
      Parallel::Bucket& nb = par->buckets.back();
      nb.flat = b.leaf(fmt::format("ddp.bucket{}", par->buckets.size() - 1), {0}, g.tensor(grad).dtype,
                       Category::gradient, false);
    }
  }
  Parallel::Bucket& bk = par->buckets.back();
  TensorId result = grad;
  if (pc.ddp()) {
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
    par->slot[i] = {par->buckets.size() - 1, offset};
  } else {
    bk.grads.push_back(grad);
  }
  bk.bytes += bytes;
  ++bk.n_grads;
  const int64_t limit = par->buckets.size() == 1 ? kFirstBucketBytes
                                                 : static_cast<int64_t>(pc.bucket_cap_mb * 1024 * 1024);
  if (bk.bytes >= limit || last) {
    bk.closed = true;
    std::vector<TensorId> ins = pc.ddp() ? std::vector<TensorId>{bk.flat} : bk.grads;
    Op ar{.kind = OpKind::all_reduce, .name = fmt::format("{}.bucket{}.all_reduce",
                                                          pc.ddp() ? "ddp" : "zero",
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
  if (tr.parallel.sharding == Sharding::fsdp2) return fsdp2_backward_end();  // fsdp2
  b.set_layer(-1);
  b.set_scope(tr.parallel.ddp() ? "ddp" : "zero");
  // The reducer's finalize (queue_callback at the end of backward) waits for every reduction;
  // DDP then copies each bucket back into the gradients (in place) unless they are its views.
  Op fin{.kind = OpKind::bucket_copy, .name = tr.parallel.ddp() ? "ddp.finalize" : "zero.finalize",
         .kernels = 0, .after = par->reductions};
  if (tr.parallel.ddp() && !tr.parallel.gradient_as_bucket_view) {
    int64_t total = 0;
    for (const auto& bk : par->buckets) {
      fin.inputs.push_back(bk.flat);
      total += bk.bytes;
    }
    for (TensorId t : out.param_grads) {
      if (t != kNoTensor) fin.inputs.push_back(t);
    }
    fin.kernels = static_cast<int32_t>(par->trainable);
    fin.bytes_moved = 2 * total;
  }
  b.emit(std::move(fin));
  // A later backward (accumulation without no_sync) fills the same buckets again.
  par->laid_out = true;
  par->ready = 0;
  par->reductions.clear();
  for (auto& bk : par->buckets) bk.closed = false, bk.last_copy = kNoOp;
}

TensorId Lowering::ddp_refill(size_t i, TensorId grad) {
  // A later backward's hook: the gradient into its place in the bucket laid out before; the
  // bucket is all-reduced when its last pending gradient is in.
  Graph& g = out.graph;
  const ParallelConfig& pc = tr.parallel;
  const TensorId p = out.params[i];
  const std::string name = g.tensor(p).name;
  const int64_t bytes = g.view_bytes(grad);
  const auto [bi, offset] = par->slot.at(i);
  Parallel::Bucket& bk = par->buckets[bi];
  b.set_scope("ddp");
  Op copy{.kind = OpKind::bucket_copy, .name = name + ".grad.to_bucket", .inputs = {grad, bk.flat},
          .workspace_bytes = prof.scalar_temp_bytes(g.tensor(grad).dtype), .flops = static_cast<double>(bytes),
          .bytes_moved = 2 * bytes};
  TensorId result = grad;
  if (pc.gradient_as_bucket_view && g.tensor(grad).storage != g.tensor(bk.flat).storage) {
    result = b.alias(bk.flat, name + ".grad", g.tensor(p).shape, {}, offset);
    copy.outputs = {result};
  }
  bk.last_copy = b.emit(std::move(copy));
  if (++bk.n_filled == bk.n_grads) {
    bk.n_filled = 0;
    par->reductions.push_back(b.emit({.kind = OpKind::all_reduce, .name = fmt::format("ddp.bucket{}.all_reduce", bi),
                                      .inputs = {bk.flat}, .bytes_moved = bk.bytes, .stream = kCommStream,
                                      .after = {bk.last_copy}, .params = {.group_size = pc.dp}}));
  }
  return result;
}

void Lowering::optimizer_flat() {
  // A flat fp32 partition (DeepSpeed's single_partition_of_fp32_groups, Megatron's main params):
  // master copy, exp_avg and exp_avg_sq of ceil(P / N) elements; FusedAdam over it.
  if (tr.parallel.sharding == Sharding::fsdp2) return fsdp2_optimizer();  // fsdp2: per-parameter state
  b.set_phase(Phase::optimizer);
  b.set_layer(-1);
  b.set_scope("optimizer");
  out.optimizer_impl = OptimizerImpl::fused;
  Graph& g = out.graph;
  const int64_t N = tr.parallel.sharding == Sharding::none ? 1 : tr.parallel.dp;
  int64_t P = 0, S3 = 0;
  for (TensorId p : out.params) P += numel(g.tensor(p).shape), S3 += shard(numel(g.tensor(p).shape), N);
  const bool zero3 = tr.parallel.sharding == Sharding::zero3;
  const int64_t S = zero3 ? S3 : shard(P, N);  // ZeRO-3: the parameters' own partitions, flattened
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
  const std::vector<TensorId>& targets = zero3 ? par->partitions : out.params;  // ZeRO-3: the partitions
  ins.insert(ins.end(), targets.begin(), targets.end());
  OpId cast = b.emit({.kind = OpKind::optim_update, .name = "optimizer.master_to_params", .inputs = ins,
                      .flops = static_cast<double>(S), .bytes_moved = S * (4 + dtype_size(dt))});
  if (N > 1 && !zero3) {
    b.emit({.kind = OpKind::all_gather, .name = "zero.params.all_gather", .inputs = out.params,
            .bytes_moved = P * dtype_size(dt), .stream = kCommStream, .after = {cast},
            .params = {.group_size = N}});
  }
}

// ---- fsdp: ZeRO-3's gathered units ----

void Lowering::zero3_block(int32_t layer, bool begin) {
  if (par && tr.parallel.sharding == Sharding::fsdp2) return fsdp2_block(layer, begin);  // fsdp2
  if (!par || tr.parallel.sharding != Sharding::zero3) return;
  const int32_t was_layer = b.layer();
  const std::string was_scope = b.scope();
  if (begin) {
    zero3_gather(layer);
  } else {
    zero3_release(layer);
  }
  b.set_layer(was_layer);
  b.set_scope(was_scope);
}

void Lowering::zero3_gather(int32_t layer) {
  Graph& g = out.graph;
  const int64_t N = tr.parallel.dp;
  if (!par->zero3_laid_out && layer >= 0) {
    // The parameters exist once the forward reaches the first block (the root's gather was
    // emitted before them, sized here). Each partitioned parameter becomes a view of its unit's
    // gathered parameters; its own storage shrinks to this rank's partition (ds_tensor).
    par->zero3_laid_out = true;
    std::map<int32_t, std::vector<TensorId>> members;
    for (TensorId p : out.params) {
      const Tensor t = g.tensor(p);  // a copy: add_tensor below
      const int64_t n = numel(t.shape);
      if (!zero3_partitioned(n)) {
        par->partitions.push_back(p);  // persistent: whole on every rank, never gathered
        continue;
      }
      const int32_t layer_of = g.storage(t.storage).layer;
      Parallel::Unit& u = par->units[layer_of];
      u.elements += n;
      members[layer_of].push_back(p);
      TensorId part = g.add_tensor({.name = t.name + ".partition", .shape = {shard(n, N)}, .dtype = t.dtype,
                                    .storage = t.storage});
      Storage& st = g.mutable_storage(t.storage);
      st.bytes = shard(n, N) * dtype_size(t.dtype);
      st.first = part;
      par->partitions.push_back(part);
    }
    Parallel::Unit& root = par->units[-1];
    if (root.gather != kNoOp) {
      Tensor& gt = g.mutable_tensor(root.gathered);
      gt.shape[0] = root.elements;
      g.mutable_storage(gt.storage).bytes = root.elements * dtype_size(dt);
      g.mutable_op(root.gather).bytes_moved = root.elements * dtype_size(dt);
      if (root.elements == 0) g.mutable_op(root.gather).kernels = 0;
      members_view(-1, members[-1]);
    }
    par->pending = std::move(members);
  }
  Parallel::Unit& u = par->units[layer];
  const std::string unit = layer < 0 ? std::string("root") : fmt::format("blocks.{}", layer);
  b.set_layer(layer);
  b.set_scope("zero3");
  u.gathered = b.fresh(fmt::format("{}.gathered_params", unit), {u.elements}, dt, Category::parameter);
  u.gather = b.emit({.kind = OpKind::all_gather, .name = fmt::format("{}.all_gather", unit),
                     .outputs = {u.gathered}, .bytes_moved = u.elements * dtype_size(dt), .stream = kCommStream,
                     .params = {.group_size = N}});
  // The unit's compute waits for its parameters (fetch_sub_module's wait on the gather).
  b.emit({.kind = OpKind::bucket_copy, .name = fmt::format("{}.wait", unit), .kernels = 0,
          .after = {u.gather}});
  if (layer >= 0) {
    if (u.elements == 0) g.mutable_op(u.gather).kernels = 0;
    members_view(layer, par->pending[layer]);
    b.regather[layer] = {.forward = g.tensor(u.gathered).storage, .group = N};
  }
}

void Lowering::members_view(int32_t layer, const std::vector<TensorId>& members) {
  // The unit's parameters as views of its gathered storage, in parameter order.
  Graph& g = out.graph;
  const TensorId gathered = par->units[layer].gathered;
  int64_t offset = 0;
  for (TensorId p : members) {
    Tensor& t = g.mutable_tensor(p);
    t.storage = g.tensor(gathered).storage;
    t.offset = offset;
    t.is_view = true;
    offset += numel(t.shape);
  }
}

void Lowering::zero3_release(int32_t layer) {
  Parallel::Unit& u = par->units[layer];
  if (u.gathered == kNoTensor) return;
  b.set_layer(layer);
  b.set_scope("zero3");
  // release_sub_module: the gathered parameters freed after the block's forward (their
  // partitions stay); the backward reads its own gathered copy (autodiff.cpp regather_block).
  b.emit({.kind = OpKind::bucket_copy,
          .name = fmt::format("{}.release", layer < 0 ? std::string("root") : fmt::format("blocks.{}", layer)),
          .inputs = {u.gathered}, .kernels = 0});
  u.gathered = kNoTensor;
}

}  // namespace actsim::graph
