// actsim::graph::Graph — the training-step dataflow graph: ops in execution order over tensors
// that live in storages (a view aliases its base's storage, so it costs nothing).
//
//   Graph g;
//   StorageId s = g.add_storage({.bytes = 4096, .category = Category::activation});
//   TensorId t  = g.add_tensor({.name = "x", .shape = {32, 32}, .dtype = DType::f32, .storage = s});
//   OpId op     = g.add_op({.kind = OpKind::gelu_tanh, .phase = Phase::forward, .outputs = {t}});
//   g.validate();   // acyclic, each tensor produced once, shapes inside their storages
//
// The graph is append-only and frozen after validation. tensor(), storage() and op() read; writes
// go through mutable_tensor() & co. while it is built (the builder, autodiff, the schedule reader),
// which a frozen graph refuses, or through the explicit rewrite(), which validates it again.
// Analyses keep their results in side tables indexed by the ids, not in node fields.
#pragma once

#include <string>
#include <vector>

#include "actsim/graph/chunked_vector.hpp"
#include "actsim/graph/types.hpp"

namespace actsim::graph {

// Every op kind the lowering, autodiff and optimizer emit. Views cost nothing; everything else
// that outputs a non-view tensor allocates its storage when it starts.
enum class OpKind : uint16_t {
  // forward: creation and data movement
  arange, ones, triu, eq_scalar, index_rows, embedding, view, copy, stack,
  // forward: arithmetic
  add, sub, mul, mul_scalar, div_scalar, add_scalar, pow_scalar, rsqrt, mean_last,
  mm, addmm, bmm, layer_norm, gelu_tanh, silu, softmax, masked_fill, dropout_noise, native_dropout,
  flash_attention, log_softmax, nll_loss,
  // backward
  backward,     // one autograd node's backward (Op::forward names the op it differentiates)
  sum_to,       // engine's reduction of a broadcast gradient to its input's shape
  accumulate,   // gradient accumulation of a tensor with several consumers (InputBuffer / AccumulateGrad)
  grad_seed,    // loss.backward()'s ones_like(loss)
  // optimizer
  optim_update,     // one in-place parameter/state update kernel
  optim_temp,       // an optimizer temporary (sqrt, division, foreach list)
  // release of the step's gradients (zero_grad(set_to_none=True))
  zero_grad,
  // checkpointing
  offload,        // copy a saved activation to host memory (copy stream)
  prefetch,       // copy it back to the device ahead of backward (copy stream)
  rng_stash,      // torch.utils.checkpoint's torch.get_rng_state(): a uint8 copy of the CPU generator
  // Hugging Face transformers' decoders (lower_hf_llama.cpp)
  neg,            // -x (rotate_half)
  cat,            // torch.cat((a, b), dim=-1)
  cast,           // x.to(dtype) when the dtype changes
  rotary_table,   // the rotary embedding's cos and sin (B, T, head_dim), computed under no_grad
  causal_mask,    // create_causal_mask for eager attention: a (B, 1, T, T) additive mask
  pad,            // F.pad(labels, (0, 1), value=-100)
  tanh,           // torch.tanh (GPT-2's gelu_new written out in Python)
  // Mixture-of-experts decoders (lower_hf_moe.cpp; issue 11: hfrest)
  topk,           // torch.topk(x, k, dim=-1): values and int64 indices
  sum_dim,        // x.sum(dim=params.dim0, keepdim=params.start != 0)
  div_inplace,    // a /= b: autograd saves a clone of a (outputs: a itself, the clone)
  grouped_mm,     // torch.nn.functional.grouped_mm(x, w, offs): one matmul per expert's rows
  moe_index,      // routing bookkeeping without gradient (sort, floor_divide, histc, cumsum, inverse permutation)
  // data parallelism (lower_parallel.cpp): collectives run on the communication stream (2)
  bucket_copy,    // DDP's hook: a gradient copied (divided by the world size) into its bucket
  all_reduce,     // in place over the ranks (DDP's bucket, ZeRO-1's gradients)
  reduce_scatter, // a gradient reduced over the ranks, this rank's shard kept (ZeRO-2)
  all_gather,     // the updated parameter shards gathered back into the parameters (ZeRO)
};
inline constexpr int kNumOpKinds = static_cast<int>(OpKind::all_gather) + 1;
inline constexpr bool is_collective(OpKind k) {
  return k == OpKind::all_reduce || k == OpKind::reduce_scatter || k == OpKind::all_gather;
}
std::string_view to_string(OpKind k);
// Parses an op-kind name as written by to_string; returns false if unknown.
bool parse_op_kind(std::string_view s, OpKind& out);

struct Storage {
  int64_t bytes = 0;                       // allocation size in bytes
  Category category = Category::activation;
  Location location = Location::device;
  OpId producer = kNoOp;                   // op that allocates it; kNoOp = exists before the step
  int32_t layer = -1;                      // block index of the producing op, -1 outside blocks
  TensorId first = kNoTensor;              // the tensor that created it (names it in reports)
  bool keep = false;                       // outlives the step (never freed by the engine)
};

struct Tensor {
  std::string name;
  Shape shape;
  Strides strides;                         // in elements; empty = contiguous
  int64_t offset = 0;                      // in elements, into the storage
  DType dtype = DType::f32;
  StorageId storage{0};
  OpId producer = kNoOp;                   // op that outputs it; kNoOp = exists before the step
  bool is_view = false;                    // aliases another tensor's storage
  bool requires_grad = false;
};

// How a view op relates its output to its input (and so how its backward maps the gradient).
enum class ViewKind : uint8_t { none, reshape, transpose, expand, unsqueeze, split, slice, select };

// Small kind-specific parameters of an op.
// Which part of torch.optim's step an optimizer op is (its inputs are listed per kind).
enum class OptimStep : uint8_t {
  none,
  adam_moments,   // in: param, grad, exp_avg, exp_avg_sq, step. step += 1; AdamW: param *= 1 - lr*wd;
                  //     Adam with wd: grad + wd*param; exp_avg = b1*m + (1-b1)*g; exp_avg_sq = b2*v + (1-b2)*g^2
  adam_sqrt,      // in: exp_avg_sq, step; out: sqrt(v), or sqrt(v)/sqrt(1-b2^t) + eps when `full` (2.x foreach)
  adam_denom,     // in: sqrt, step; out: sqrt / sqrt(1 - b2^t) + eps
  adam_update,    // in: param, exp_avg, denom, step. param -= lr / (1 - b1^t) * exp_avg / denom
  adam_fused,     // in: param, grad, exp_avg, exp_avg_sq, step: the whole update in one kernel
  sgd,            // in: param, grad. param -= lr * grad
  sgd_momentum,   // in: param, grad, momentum_buffer. buf = m*buf + grad; param -= lr * buf
};

// Hyperparameters of an optimizer op (torch.optim's defaults unless configured).
struct OptimParams {
  OptimStep step = OptimStep::none;
  bool full = false;                       // adam_sqrt: produces the whole denominator
  bool decoupled = true;                   // AdamW (decoupled weight decay) vs Adam
  double lr = 1e-3, beta1 = 0.9, beta2 = 0.999, eps = 1e-8, weight_decay = 0, momentum = 0;
};

struct OpParams {
  ViewKind view = ViewKind::none;
  int16_t dim0 = 0, dim1 = 0;              // transpose dims; split/slice/select/unsqueeze dim in dim0
  int64_t start = 0, step = 1;             // slice start and step; split chunk size in start
  double scalar = 0;                       // scalar operand (mul_scalar, dropout p, eps, ...)
  OptimParams optim;                       // optimizer ops
  int64_t group_size = 0;                  // collectives: ranks taking part
};

struct Op {
  OpKind kind = OpKind::view;
  Phase phase = Phase::forward;
  int32_t layer = -1;                      // block index, -1 outside blocks
  std::string name;                        // e.g. "blocks.3.attn.softmax"
  TensorIds inputs;                        // tensors read
  TensorIds outputs;                       // tensors produced (new storage, or views)
  TensorIds saved;                         // forward ops: tensors autograd keeps for this op's backward
  TensorIds holds;                         // kept alive until this op ends without being read
                                           // (a Python reference going out of scope here)
  TensorIds releases;                      // storages explicitly released when this op ends
                                           // (zero_grad releases the gradients)
  int64_t workspace_bytes = 0;             // transient bytes, allocated at start, freed at end
  double flops = 0;                        // floating-point operations
  int64_t bytes_moved = 0;                 // bytes read + written by the kernel(s)
  int32_t kernels = 1;                     // kernel launches (launch overhead in the time model)
  OpId forward = kNoOp;                    // backward/recompute ops: the forward op
  util::SmallVector<int8_t, 8> grad_of;    // backward ops: [grad_outputs] forward input index whose
                                           // gradient each entry is (see grad_outputs)
  TensorIds grad_outputs;                  // backward ops: the gradients produced, including
                                           // pass-throughs that alias an incoming gradient
  int8_t n_grad_inputs = 0;                // backward ops: inputs[0..n) are incoming gradients,
                                           // the rest the forward op's saved tensors
  util::SmallVector<int8_t, 8> grad_in_of; // backward ops: [n_grad_inputs] forward output index of
                                           // each incoming gradient
  int32_t stream = 0;                      // 0 = compute, 1 = copy (offload/prefetch),
                                           // 2 = communication (collectives)
  OpIds after;                             // ops that must end before this one starts (besides
                                           // the producers of its inputs)
  int32_t region = -1;                     // forward ops: recompute region (checkpointing), -1 = none
  bool cached = false;                     // forward ops in a region whose outputs are kept (ops:LIST)
  bool offload = false;                    // forward ops whose saved tensors are offloaded
  bool recompute = false;                  // a forward op run again in backward (Op::forward = original)
  OpParams params;
};

class Graph {
 public:
  StorageId add_storage(Storage s);
  TensorId add_tensor(Tensor t);
  OpId add_op(Op op);

  // Read access, the only access a frozen graph gives.
  const Tensor& tensor(TensorId id) const { return tensors_[index(id)]; }
  const Storage& storage(StorageId id) const { return storages_[index(id)]; }
  const Op& op(OpId id) const { return ops_[index(id)]; }

  // Write access while the graph is built (the builder, autodiff, the schedule reader); a frozen
  // graph refuses it (ACTSIM_ASSERT). Change a frozen graph with rewrite().
  Tensor& mutable_tensor(TensorId id) { return tensors_[index(check_thawed(id))]; }
  Storage& mutable_storage(StorageId id) { return storages_[index(check_thawed(id))]; }
  Op& mutable_op(OpId id) { return ops_[index(check_thawed(id))]; }

  // The explicit rewrite of a frozen graph: `edit(graph)` runs with write access, then the graph
  // is validated and frozen again.
  template <typename F>
  void rewrite(F&& edit) {
    frozen_ = false;
    edit(*this);
    freeze();
  }

  // The explicit rewrite of a frozen graph's sizes and costs alone (storage bytes, workspaces,
  // FLOPs, bytes moved; never ids, shapes or order), without the checks: the batch search's probes
  // rescale one lowering to another batch (Note [Batch search] in study/src/batch_search.cpp), and
  // only the engine reads the result (tensor shapes stay the lowered batch's).
  template <typename F>
  void rewrite_sizes(F&& edit) {
    frozen_ = false;
    edit(*this);
    frozen_ = true;
  }

  const ChunkedVector<Tensor>& tensors() const { return tensors_; }
  const ChunkedVector<Storage>& storages() const { return storages_; }
  const ChunkedVector<Op>& ops() const { return ops_; }
  size_t n_ops() const { return ops_.size(); }

  // Bytes of a tensor's own view (numel * dtype size), not of its storage.
  int64_t view_bytes(TensorId id) const;

  // Checks the invariants: acyclic in execution order (each op reads, holds, saves and releases
  // only tensors produced before it), each tensor produced once by the op listing it, every tensor
  // inside its storage. A violation is our bug: ACTSIM_ASSERT aborts with file:line.
  void validate() const;
  bool is_frozen() const { return frozen_; }
  void freeze() { validate(); frozen_ = true; }
  // Frozen without the checks: for lowerings only the engine's figures are read from (issue 9:
  // LowerOptions::validate), whose lowering code is the same as a checked one's.
  void freeze_unchecked() { frozen_ = true; }

  int32_t n_layers = 0;                    // number of transformer blocks
  int64_t alloc_granularity = 1;           // bytes; a device allocation occupies a multiple of it
                                           // (the runtime profile's; 512 under torch-cuda)
  // Gradient accumulation (Note [Gradient accumulation] in lower.cpp): ops [last_micro_batch,
  // after_micro_batches) are one later micro-batch, standing for micro_batches - 1 of them.
  int64_t micro_batches = 1;
  OpId last_micro_batch = kNoOp, after_micro_batches = kNoOp;

  // The bytes a device allocation of `bytes` occupies in the allocator's count.
  int64_t allocated(int64_t bytes) const {
    return alloc_granularity <= 1 ? bytes : (bytes + alloc_granularity - 1) / alloc_granularity * alloc_granularity;
  }

 private:
  // References stay valid while the graph grows (builders hold them across appends).
  ChunkedVector<Tensor> tensors_;
  ChunkedVector<Storage> storages_;
  ChunkedVector<Op> ops_;
  bool frozen_ = false;

  template <typename Id>
  Id check_thawed(Id id) const {
    if (frozen_) frozen_write();
    return id;
  }
  [[noreturn]] static void frozen_write();
};

}  // namespace actsim::graph
