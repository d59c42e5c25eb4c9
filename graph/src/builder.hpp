// Private: a tracer that mirrors PyTorch eager, call for call. Each method appends the op(s) that
// the corresponding torch call performs, with strides (so a reshape copies exactly when PyTorch's
// would), and records what autograd saves (the profile's rules). Used by lower.cpp.
#pragma once

#include <climits>
#include <functional>
#include <initializer_list>
#include <optional>
#include <unordered_map>
#include <string>
#include <string_view>
#include <vector>

#include "actsim/graph/config.hpp"
#include "actsim/graph/graph.hpp"
#include "actsim/graph/profile.hpp"

namespace actsim::graph {

// Op::stream of the collectives (0 compute, 1 copy, 2 communication: graph.hpp).
inline constexpr int32_t kCommStream = 2;

// PyTorch's computeStride: strides to view (shape, strides) as new_shape, or nullopt when a view
// is impossible and reshape must copy.
std::optional<Strides> view_strides(const Shape& shape, const Strides& strides, const Shape& new_shape);
bool is_contiguous(const Shape& shape, const Strides& strides);
// Dense strides for `shape` in the dim order of `like` (empty_like's preserve_format).
Strides dense_strides_like(const Shape& shape, const Strides& like);

class Builder {
 public:
  Builder(Graph& g, const RuntimeProfile& p, DType model_dtype) : g_(g), prof_(p), dt_(model_dtype) {}

  // Naming and attribution of the ops that follow.
  void set_layer(int32_t layer) { layer_ = layer; }
  void set_scope(std::string scope) {
    if (names_) scope_ = std::move(scope);
  }
  int32_t layer() const { return layer_; }
  const std::string& scope() const { return scope_; }
  // Unnamed lowering (LowerOptions::names = false): ops and the tensors they make get empty names.
  void set_names(bool on) { names_ = on, scope_.clear(); }
  bool names() const { return names_; }
  void set_phase(Phase p) { phase_ = p; }
  // Checkpointing: ops emitted from now on belong to recompute region `r` (-1 = none); ops of
  // `cached` kinds keep their outputs instead of being recomputed; `offload` marks their saves.
  void set_region(int32_t r, const std::vector<OpKind>* cached = nullptr) { region_ = r, cached_ = cached; }
  void set_offload(bool on) { offload_ = on; }
  DType model_dtype() const { return dt_; }
  Graph& graph() { return g_; }
  const RuntimeProfile& prof() const { return prof_; }

  // Gradient accumulation: a later micro-batch's forward is lowered again by the same family code;
  // while replaying, leaf() hands out the first forward's leaves (parameters, buffers, inputs) in
  // the order they were made instead of making new ones.
  void replay_leaves(bool on) { replaying_ = on, next_leaf_ = 0; }
  bool is_replaying_leaves() const { return replaying_; }

  // Tensors that exist before the step (no producing op).
  TensorId leaf(const std::string& name, const Shape& shape, DType dt, Category c, bool requires_grad,
                Location loc = Location::device);
  // A fresh contiguous tensor in a new storage (output of the op about to be emitted).
  TensorId fresh(std::string_view name, Shape shape, DType dt, Category c = Category::activation);
  // A view of `base` sharing its storage.
  TensorId alias(TensorId base, std::string name, Shape shape, Strides strides, int64_t offset);

  // Appends an op (layer, phase and scope filled in), sets requires_grad on its outputs and the
  // tensors it saves from the profile's rule.
  OpId emit(Op op);
  // Offloaded saved activations: device storage -> its host copy, and the block that saved it.
  struct Offloaded {
    TensorId host;
    int32_t layer;
  };
  std::unordered_map<uint32_t, Offloaded> offloaded;
  std::vector<uint32_t> offload_order;     // device storages in the order they were offloaded
  // fsdp (issue 13, ZeRO-3, lower_parallel.cpp): a block's parameters, gathered for its forward
  // (this storage), are gathered again when the backward reaches the block (autodiff.cpp).
  struct Regather {
    StorageId forward;
    int64_t group = 1;
  };
  std::unordered_map<int32_t, Regather> regather;
  // fsdp2 (issue 13, lower_fsdp.cpp): called before each backward node runs (with its layer) and
  // once when the engine's work is done (kFsdpBackwardEnd); the storage pairs it leaves in
  // fsdp_remap are remapped (a unit's parameters gathered again) before the node reads them.
  static constexpr int32_t kFsdpBackwardEnd = INT32_MIN;
  std::function<void(int32_t)> fsdp_node;
  std::vector<std::pair<StorageId, StorageId>> fsdp_remap;
  std::vector<TensorId> block_outputs;     // [n_layers] each block's output (the residual stream)
  // torch.utils.checkpoint(preserve_rng_state=True): each checkpoint call's stash of the CPU RNG
  // state, by recompute region; autograd holds it until the region's backward has run.
  std::unordered_map<int32_t, TensorId> rng_stash;
  // Emits a torch.get_rng_state() copy (kCpuRngStateBytes, where the profile keeps it).
  TensorId stash_rng(const std::string& name);
  // The checkpoint implementation (TrainingConfig::checkpoint_impl, preserve_rng_state).
  bool ckpt_reentrant = false;
  bool ckpt_preserve_rng = true;
  // A checkpoint call begins (region r): its RNG stash when it preserves the RNG state (kNoTensor
  // in rng_stash otherwise). Reentrant keeps it in ctx.fwd_cpu_state, alive with the autograd
  // graph (the training loop's `loss`), past the step; non-reentrant in its frame.
  void begin_checkpoint_call(int32_t r);
  // Tensors the checkpoint call's function object holds besides its arguments: transformers'
  // GradientCheckpointingLayer checkpoints partial(layer.__call__, **kwargs), whose keyword
  // arguments (position_ids, the mask, the rotary tables) live as long as the call: non-reentrant
  // in its frame, until the region's backward has run; reentrant on ctx.run_function, with the
  // autograd graph (past the step, as ctx.fwd_cpu_state). By recompute region.
  std::unordered_map<int32_t, std::vector<TensorId>> ckpt_kwargs;
  void checkpoint_kwargs(std::initializer_list<TensorId> ts);

  // The last op emitted holds `t` (a Python local released when the op's frame returns).
  void hold_until_last(TensorId t);

  // --- torch.autocast (training.autocast; autocast.cpp) ---------------------------------------
  // While set (and in forward), the entry points below cast their floating inputs by the
  // profile's op lists; the ops inside an entry point run with autocast excluded.
  // Entering an autocast region (each micro-batch's forward is one) starts an empty weight-cast cache.
  void set_autocast(DType dt) {
    if (dt != DType::f32) cast_of_.clear(), cast_cache.clear();
    autocast_ = dt;
  }
  DType autocast() const { return autocast_; }
  // x.to(dt) (aten::_to_copy): a new tensor, strides kept when x is non-overlapping and dense;
  // x itself when the dtype is already dt. ToCopyBackward0 saves nothing.
  TensorId cast(TensorId x, DType dt, const std::string& name = "to");
  // The weight-cast cache (autocast_mode.cpp cached_cast): the low-precision copy of each leaf
  // float32 parameter, made once per autocast region and held until the region ends.
  std::vector<TensorId> cast_cache;
  // Casts the entry point's inputs by the policy of `k`; the returned guard excludes autocast for
  // the ops the entry point emits (WrapFunction_'s ExcludeDispatchKeyGuard).
  class Excluded {
   public:
    explicit Excluded(Builder* b) : b_(b) { ++b_->excluded_; }
    ~Excluded() { --b_->excluded_; }
    Excluded(const Excluded&) = delete;
    Excluded& operator=(const Excluded&) = delete;
   private:
    Builder* b_;
  };
  [[nodiscard]] Excluded autocast_args(OpKind k, std::initializer_list<TensorId*> args);

  // --- views (no memory) -------------------------------------------------------------------
  TensorId view(TensorId x, const Shape& shape);              // asserts viewable
  TensorId reshape(TensorId x, const Shape& shape);           // view, or contiguous copy + view
  TensorId transpose(TensorId x, int d0, int d1);
  TensorId unsqueeze(TensorId x, int dim);
  TensorId expand(TensorId x, const Shape& shape);
  std::vector<TensorId> split(TensorId x, int64_t size, int dim);
  TensorId slice(TensorId x, int dim, int64_t start, int64_t end, int64_t step);
  TensorId contiguous(TensorId x);                             // x itself if already contiguous

  // --- ops ----------------------------------------------------------------------------------
  TensorId arange(int64_t n);
  TensorId ones_bool(int64_t rows, int64_t cols);
  TensorId triu(TensorId x, int64_t diagonal);
  TensorId eq_scalar(TensorId x, double v);
  TensorId embedding(TensorId weight, TensorId idx);
  TensorId index_rows(TensorId table, TensorId idx);
  TensorId binary(OpKind k, TensorId a, TensorId b);          // add, sub, mul (broadcasting)
  TensorId scalar_op(OpKind k, TensorId x, double s);         // mul_scalar, div_scalar, add_scalar
  TensorId unary(OpKind k, TensorId x);                       // gelu_tanh, silu, rsqrt, softmax, log_softmax
  TensorId pow2(TensorId x);
  TensorId mean_last(TensorId x);                             // mean(-1, keepdim=True)
  TensorId mm(TensorId a, TensorId b);
  TensorId addmm(TensorId bias, TensorId a, TensorId b);
  TensorId bmm(TensorId a, TensorId b);
  TensorId matmul(TensorId a, TensorId b);                    // at::matmul's decomposition
  TensorId linear(TensorId x, TensorId w, std::optional<TensorId> b);
  TensorId layer_norm(TensorId x, TensorId w, TensorId b);
  TensorId masked_fill(TensorId x, TensorId mask);
  TensorId dropout(TensorId x, double p);
  TensorId stack_last(TensorId a, TensorId b);                // torch.stack((a, b), dim=-1)
  TensorId flash_attention(TensorId q, TensorId k, TensorId v, double p);
  TensorId cross_entropy(TensorId logits2d, TensorId target1d);  // log_softmax + nll_loss

 private:
  std::string qualify(std::string_view n) const {
    if (!names_) return {};
    std::string out;
    out.reserve(scope_.size() + 1 + n.size());
    if (!scope_.empty()) out.append(scope_).push_back('.');
    out.append(n);
    return out;
  }
  TensorId view_op(TensorId x, Shape shape, Strides strides, int64_t offset, OpParams params, std::string_view what);
  int64_t bytes(TensorId t) const { return g_.view_bytes(t); }
  int64_t matmul_ws(TensorId a, int64_t batch, int64_t m, int64_t k, int64_t n) const;
  const Tensor& T(TensorId t) const { return g_.tensor(t); }

  Graph& g_;
  const RuntimeProfile& prof_;
  DType dt_;
  int32_t layer_ = -1;
  std::string scope_;
  Phase phase_ = Phase::forward;
  int32_t region_ = -1;
  const std::vector<OpKind>* cached_ = nullptr;
  bool offload_ = false;
  bool names_ = true;
  std::vector<TensorId> leaves_;  // every leaf made, in order (gradient accumulation's replay)
  size_t next_leaf_ = 0;
  bool replaying_ = false;
  DType autocast_ = DType::f32;          // f32 = autocast off
  int excluded_ = 0;                     // > 0 inside an autocast entry point
  std::unordered_map<uint32_t, TensorId> cast_of_;  // the cache: parameter tensor -> its cast
};

}  // namespace actsim::graph
