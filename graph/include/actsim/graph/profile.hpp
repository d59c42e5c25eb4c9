// actsim::graph::RuntimeProfile — what a PyTorch runtime saves for backward, as data.
//
//   const RuntimeProfile& p = profile(ProfileId::torch_cpu);
//   for (const SaveRule& r : p.rules) ...      // which inputs/outputs each op kind keeps
//   p.dropout == DropoutImpl::noise_in_model_dtype
//
// A save rule lists the slots an op kind keeps (input k, output k), each possibly conditional on
// another input requiring grad (autograd codegen saves `other` for mul only when `self` needs a
// gradient). Each rule cites the PyTorch source it is derived from; torch-cpu rules are checked
// to the byte against Debian's torch 1.13 by tests/torch.
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
  bool bernoulli_int_temp;               // bernoulli_(p) allocates an int32 temporary (MKL)
  Location scalar_location;              // Python numbers wrapped as 0-dim CPU tensors: host memory
                                         // on CUDA, the allocator the CPU profile counts on CPU
  bool onednn_bf16_matmul;
  // Transient device bytes while an op takes a Python number: the wrapped 0-dim float64 and its
  // cast to the operand dtype (CPU: both go through the allocator; CUDA: host scalars, none).
  int64_t scalar_temp_bytes(DType operand) const {
    return scalar_location == Location::device ? 8 + dtype_size(operand) : 0;
  }               // 16-bit CPU matmuls run through oneDNN with a scratchpad
  std::span<const SaveRule> rules;

  const SaveRule* rule(OpKind k) const;
  // Transient bytes one (batched) matrix product A (M x K) @ B (K x N) allocates while it runs.
  int64_t matmul_workspace(DType dt, int64_t batch, int64_t m, int64_t k, int64_t n, bool a_col_major) const;
};

const RuntimeProfile& profile(ProfileId id);
// Returns false if the name is unknown.
bool parse_profile(std::string_view name, ProfileId& out);

}  // namespace actsim::graph
