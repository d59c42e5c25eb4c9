// actsim::graph::RuntimeProfile — what a PyTorch runtime saves for backward, as data.
//
//   const RuntimeProfile& p = profile(ProfileId::torch_cpu);
//   for (const SaveRule& r : p.rules) ...      // which inputs/outputs each op kind keeps
//   p.dropout == DropoutImpl::noise_in_model_dtype
//
// A save rule lists the slots an op kind keeps (input k, output k), each possibly conditional on
// another input requiring grad (autograd codegen saves `other` for mul only when `self` needs a
// gradient). Each rule cites the PyTorch source it is derived from. Three profiles:
//   torch2-cpu  PyTorch 2.x on the CPU, checked to the byte against the pinned wheel (tests/torch);
//   torch-cuda  torch2-cpu plus the named CUDA deltas of cuda_deltas() (the default);
//   torch-cpu   Debian's PyTorch 1.13 on the CPU, checked to the byte against it (tests/torch).
#pragma once

#include <span>
#include <string_view>

#include "actsim/graph/config.hpp"
#include "actsim/graph/graph.hpp"

namespace actsim::graph {

inline constexpr int8_t kOut = 8;        // slot kOut + j is output j; slots 0..7 are inputs
inline constexpr int8_t kAlways = -1;

struct SaveSlot {
  int8_t slot;                           // input index, or kOut + output index
  int8_t if_grad_of = kAlways;           // saved only if this input requires grad
};

struct SaveRule {
  OpKind op;
  SaveSlot saves[6];
  int8_t n_saves;
  std::string_view source;               // where in PyTorch the rule comes from
};

enum class DropoutImpl : uint8_t {
  noise_in_model_dtype,                  // CPU _dropout_impl: empty_like + bernoulli_ + div_, then mul
  bool_mask,                             // CUDA native_dropout: output and a bool mask
};

// What torch-cuda does differently from torch2-cpu: the profile torch-cuda is torch2-cpu with every
// delta of cuda_deltas() applied, and nothing else (tests/test_profiles.cpp proves it).
enum class CudaDelta : uint8_t {
  dropout_bool_mask,                     // native_dropout's bool mask instead of the CPU's noise
  layer_norm_stats_fp32,                 // LayerNorm mean/rstd in float32 for 16-bit inputs
  host_scalars,                          // wrapped Python numbers (0-dim f64) and casts on the host
  host_step,                             // Adam(W) 'step' tensors on the host (non-fused)
  foreach_default,                       // torch.optim's default implementation is foreach
  no_onednn,                             // no oneDNN scratchpads for 16-bit matmuls
  block_512,                             // allocations rounded up to 512 B blocks
  host_rng_state,                        // checkpoint's RNG stash (a CPU tensor) in host memory
};

// torch.get_rng_state(): the CPU generator's mt19937 state as a uint8 tensor (numel 5056).
inline constexpr int64_t kCpuRngStateBytes = 5056;

struct DeltaInfo {
  CudaDelta id;
  std::string_view name;                 // "dropout_bool_mask"
  std::string_view changes;              // which bytes it changes, in words
  std::string_view source;               // PyTorch 2.x file and function
};

// torch.autocast's cast policies (aten/src/ATen/autocast_mode.h CastPolicy) for the op kinds the
// lowerings emit, per device type and PyTorch version (autocast_mode.cpp's KERNEL_CPU / KERNEL_CUDA
// lists); an op kind with no entry runs in whatever dtype its inputs have (type promotion).
enum class CastPolicy : uint8_t {
  none,
  lower_precision_fp,                    // floating inputs cast to the autocast dtype (matmuls)
  fp32,                                  // floating inputs cast to float32 (losses; CUDA's norms)
  fp32_set_opt_dtype,                    // called with dtype=float32: the input is cast to float32
  promote,                               // floating inputs cast to their widest dtype (stack, cat)
};
struct AutocastRule {
  OpKind op;
  CastPolicy policy;
  std::string_view aten;                 // the aten op(s) listed in autocast_mode.cpp
};

struct RuntimeProfile {
  ProfileId id;
  std::string_view name;                 // "torch-cuda"
  std::string_view describes;            // the runtime it models
  DropoutImpl dropout;
  bool layer_norm_stats_fp32;            // mean/rstd kept in fp32 for 16-bit inputs
  bool mean_saves_input;                 // mean.dim keeps its input for backward
  Location step_scalar_location;         // optimizer 'step' 0-dim tensors (non-fused)
  OptimizerImpl default_impl;            // what torch.optim picks with foreach=None
  bool foreach_adam_two_lists;           // foreach Adam(W) holds sqrt and denom lists at once
  bool has_sdpa;                         // scaled_dot_product_attention exists
  bool has_fused_optimizers;             // optimizer_impl = fused exists (2.x: CUDA and CPU)
  bool bernoulli_int_temp;               // bernoulli_(p) allocates an int32 temporary (MKL)
  Location scalar_location;              // Python numbers wrapped as 0-dim CPU tensors: host memory
                                         // on CUDA, the allocator the CPU profile counts on CPU
  bool onednn_bf16_matmul;               // 16-bit CPU matmuls run through oneDNN with a scratchpad
  int64_t alloc_granularity;             // bytes; every allocation occupies a multiple of it
  Location rng_state_location;           // torch.get_rng_state() (checkpoint's preserve_rng_state)
  bool wrapped_numbers_unhooked;         // saved wrapped numbers skip saved-tensor hooks (2.x), so
                                         // a checkpointed region keeps them past its forward
  bool checkpoint_unpack_releases;       // a recomputed saved tensor dies with its node's apply (2.x)
  bool checkpoint_early_stop;            // non-reentrant recomputation stops after the last op whose
                                         // output backward needs (2.x); 1.13 reruns the whole function
  // Transient device bytes while an op takes a Python number: the wrapped 0-dim float64 and its
  // cast to the operand dtype (CPU: both go through the allocator; CUDA: host scalars, none).
  int64_t scalar_temp_bytes(DType operand) const {
    return scalar_location == Location::device ? 8 + dtype_size(operand) : 0;
  }
  std::span<const SaveRule> rules;

  const SaveRule* rule(OpKind k) const;
  // torch.autocast (training.autocast): the op lists of this profile's device type and version.
  std::span<const AutocastRule> autocast_rules() const;
  CastPolicy autocast_policy(OpKind k) const;
  bool autocast_supports(DType dt) const;  // 1.13's CPU autocast accepts bf16 only
  // Transient bytes one (batched) matrix product A (M x K) @ B (K x N) allocates while it runs.
  int64_t matmul_workspace(DType dt, int64_t batch, int64_t m, int64_t k, int64_t n, bool a_col_major) const;
};

// `isa` matters only to the CPU profiles (oneDNN's 16-bit matmul needs AVX-512).
const RuntimeProfile& profile(ProfileId id, CpuIsa isa = CpuIsa::avx512);
// torch2-cpu with the given CUDA deltas applied (all of them: the rules of torch-cuda).
RuntimeProfile profile_with(std::span<const CudaDelta> deltas);
// The CUDA deltas, in the order they are applied.
std::span<const DeltaInfo> cuda_deltas();
// The ISA of the machine actsim runs on (cpuid).
CpuIsa native_cpu_isa();
// Returns false if the name is unknown.
bool parse_profile(std::string_view name, ProfileId& out);

}  // namespace actsim::graph
