// Save rules of the runtime profiles. Sources are PyTorch's tools/autograd/derivatives.yaml (which
// tensors each formula reads; sizes, options and scalar types are saved as metadata, not tensors)
// and the kernels named per row. docs/torch-cuda-rules.md has the long form with quotations.
#include "actsim/graph/profile.hpp"

#include <array>
#include <span>
#include <vector>

namespace actsim::graph {
namespace {

constexpr int8_t in0 = 0, in1 = 1, in2 = 2;
constexpr int8_t out0 = kOut + 0, out1 = kOut + 1, out2 = kOut + 2;

// Rules shared by both runtimes (same derivatives.yaml formulas in 1.13 and 2.x).
#define COMMON_RULES                                                                                \
  SaveRule{OpKind::embedding, {{in1, in0}}, 1,                                                      \
           "derivatives.yaml embedding: weight: embedding_backward(grad, indices, ...)"},         \
      SaveRule{OpKind::index_rows, {{in1, in0}}, 1,                                                 \
               "derivatives.yaml index.Tensor: self: index_backward(..., indices, grad)"},          \
      SaveRule{OpKind::mul, {{in1, in0}, {in0, in1}}, 2,                                            \
               "derivatives.yaml mul.Tensor: self: mul_tensor_backward(grad, other, ...), other: " \
               "mul_tensor_backward(grad, self, ...); codegen saves each only if the other needs grad"}, \
      SaveRule{OpKind::pow_scalar, {{in0}}, 1,                                                      \
               "derivatives.yaml pow.Tensor_Scalar: self: pow_backward(grad, self, exponent)"},     \
      SaveRule{OpKind::rsqrt, {{out0}}, 1, "derivatives.yaml rsqrt: self: -0.5 * grad * result.pow(3).conj()"}, \
      SaveRule{OpKind::mm, {{in0, in1}, {in1, in0}}, 2,                                             \
               "derivatives.yaml mm: self: mm_mat1_backward(grad, mat2, ...), mat2: "              \
               "mm_mat2_backward(grad, self, ...)"},                                                 \
      SaveRule{OpKind::addmm, {{in1, in2}, {in2, in1}}, 2,                                          \
               "derivatives.yaml addmm: mat1: mm_mat1_backward(grad, mat2, ...), mat2: "           \
               "mm_mat2_backward(grad, mat1, ...); self: maybe_multiply(grad, beta) saves nothing"}, \
      SaveRule{OpKind::bmm, {{in0, in1}, {in1, in0}}, 2,                                            \
               "derivatives.yaml bmm: self: grad.bmm(mat2.transpose(1, 2).conj()), mat2: "         \
               "self.transpose(1, 2).conj().bmm(grad)"},                                             \
      SaveRule{OpKind::mul_scalar, {{out1, in0}}, 1,                                                \
               "python_arg_parser wraps a Python number as a 0-dim float64 tensor; derivatives.yaml " \
               "mul.Tensor: self: mul_tensor_backward(grad, other, ...) keeps it"},                  \
      SaveRule{OpKind::div_scalar, {{out1, in0}}, 1,                                                \
               "derivatives.yaml div.Tensor: self: div_tensor_self_backward(grad, other, ...) keeps " \
               "the wrapped 0-dim float64 `other`"},                                                 \
      SaveRule{OpKind::gelu_tanh, {{in0}}, 1, "derivatives.yaml gelu: self: gelu_backward(grad, self, approximate)"}, \
      SaveRule{OpKind::silu, {{in0}}, 1, "derivatives.yaml silu: self: GradMode... silu_backward(grad, self)"}, \
      SaveRule{OpKind::tanh, {{out0}}, 1, "derivatives.yaml tanh: self: tanh_backward(grad, result)"}, \
      SaveRule{OpKind::softmax, {{out0}}, 1,                                                        \
               "derivatives.yaml _softmax: self: _softmax_backward_data(grad, result, dim, self.scalar_type())"}, \
      SaveRule{OpKind::log_softmax, {{out0}}, 1,                                                    \
               "derivatives.yaml _log_softmax: self: _log_softmax_backward_data(grad, result, ...)"}, \
      SaveRule{OpKind::masked_fill, {{in1}}, 1,                                                     \
               "derivatives.yaml masked_fill.Scalar: self: grad.masked_fill(mask, 0)"},            \
      SaveRule{OpKind::nll_loss, {{in0}, {in1}, {out1}}, 3,                                         \
               "derivatives.yaml nll_loss_forward: self: nll_loss_backward(grad, self, target, "   \
               "weight, reduction, ignore_index, total_weight)"},                                    \
      SaveRule{OpKind::topk, {{out1}}, 1,                                                           \
               "derivatives.yaml topk: self: value_selecting_reduction_backward_symint(grad, dim, indices, ...)"}, \
      SaveRule{OpKind::div_inplace, {{in1, in0}, {out1, in1}}, 2,                                   \
               "derivatives.yaml div.Tensor: self: div_tensor_self_backward(grad, other, ...), other: " \
               "div_tensor_other_backward(grad, self, other); in place, the original self is a clone"}, \
      SaveRule{OpKind::grouped_mm, {{in0}, {in1}, {in2}}, 3,                                        \
               "derivatives.yaml _grouped_mm: self, mat2: _grouped_mm_backward(grad, self, mat2, offs, ...)"}, \
      SaveRule{OpKind::flash_attention, {{in0}, {in1}, {in2}, {out0}, {out1}}, 5,                   \
               "derivatives.yaml _scaled_dot_product_flash_attention: query, key, value: "         \
               "_scaled_dot_product_flash_attention_backward(grad, query, key, value, output, logsumexp, ...)"}

// PyTorch 1.13 on the CPU (Debian's python3-torch): the torch-cpu profile.
constexpr std::array kCpu113Rules{
    COMMON_RULES,
    // 1.13 CPU: layer_norm_cpu allocates mean/rstd with X->options() (the input dtype).
    SaveRule{OpKind::layer_norm, {{in0}, {in1}, {in2}, {out1}, {out2}}, 5,
             "derivatives.yaml native_layer_norm: native_layer_norm_backward(grad, input, "
             "normalized_shape, result1, result2, weight, bias, ...); aten/src/ATen/native/"
             "layer_norm.cpp layer_norm_cpu: mean/rstd = at::empty({M}, X->options())"},
    // 1.13 CPU dropout: _dropout_impl multiplies by a noise tensor; the mul saves the noise.
    SaveRule{OpKind::dropout_noise, {}, 0,
             "aten/src/ATen/native/Dropout.cpp _dropout_impl: noise = at::empty_like(input); "
             "noise.bernoulli_(1 - p); noise.div_(1 - p); return input * noise"},
    // 1.13's codegen saves `self` for mean.dim (checked: grad_fn._saved_self on Debian's torch).
    SaveRule{OpKind::mean_last, {{in0}}, 1,
             "derivatives.yaml (1.13) mean.dim: self: sum_backward(grad, self.sizes(), dim, keepdim)"
             " / _safe_size(self.sizes(), dim); generated MeanBackward1 keeps self_"},
};

// PyTorch 2.x, CPU and CUDA alike: the save rules are the same derivatives.yaml formulas on every
// device. What differs on CUDA (the dtype of LayerNorm's statistics, which dropout kernel runs)
// is a field of the profile, changed by a named delta below, never a rule.
constexpr std::array kTorch2Rules{
    COMMON_RULES,
    SaveRule{OpKind::layer_norm, {{in0}, {in1}, {in2}, {out1}, {out2}}, 5,
             "derivatives.yaml native_layer_norm: native_layer_norm_backward(grad, input, "
             "normalized_shape, result1, result2, weight, bias, ...); the statistics' dtype: "
             "layer_norm.cpp layer_norm_cpu (param_scalar_type: the input's unless mixed) or "
             "cuda/layer_norm_kernel.cu layer_norm_cuda (acc_type)"},
    SaveRule{OpKind::dropout_noise, {}, 0,
             "aten/src/ATen/native/Dropout.cpp dropout: is_fused_kernel_acceptable is false on the "
             "CPU, so _dropout_impl: noise = at::empty_like(input); noise.bernoulli_(1 - p); "
             "noise.div_(1 - p); return input * noise (the mul saves the noise)"},
    SaveRule{OpKind::native_dropout, {{out1}}, 1,
             "derivatives.yaml native_dropout: input: native_dropout_backward(grad, result1, scale)"
             "; aten/src/ATen/native/cuda/Dropout.cu: mask is kBool"},
    SaveRule{OpKind::mean_last, {}, 0,
             "derivatives.yaml (2.x) mean.dim: self: mean_backward(grad, self.sym_sizes(), dim, "
             "self.sym_numel(), keepdim) -- sizes and numel only"},
};

constexpr RuntimeProfile kTorchCpu{
    .id = ProfileId::torch_cpu,
    .name = "torch-cpu",
    .describes = "PyTorch 1.13 eager on the CPU (Debian 12's python3-torch)",
    .dropout = DropoutImpl::noise_in_model_dtype,
    .layer_norm_stats_fp32 = false,
    .mean_saves_input = true,
    .step_scalar_location = Location::device,
    .default_impl = OptimizerImpl::for_loop,
    .foreach_adam_two_lists = true,
    .has_sdpa = false,
    .has_fused_optimizers = false,
    .bernoulli_int_temp = false,
    .scalar_location = Location::device,
    .onednn_bf16_matmul = true,
    .alloc_granularity = 1,
    .rng_state_location = Location::device,
    .wrapped_numbers_unhooked = false,
    .checkpoint_unpack_releases = false,
    .checkpoint_early_stop = false,
    .rules = kCpu113Rules,
};

constexpr RuntimeProfile kTorch2Cpu{
    .id = ProfileId::torch2_cpu,
    .name = "torch2-cpu",
    .describes = "PyTorch 2.x eager on the CPU (the pinned wheel in .venv)",
    .dropout = DropoutImpl::noise_in_model_dtype,
    .layer_norm_stats_fp32 = false,
    .mean_saves_input = false,
    .step_scalar_location = Location::device,
    .default_impl = OptimizerImpl::for_loop,
    .foreach_adam_two_lists = false,
    .has_sdpa = true,
    .has_fused_optimizers = true,
    .bernoulli_int_temp = false,
    .scalar_location = Location::device,
    .onednn_bf16_matmul = true,
    .alloc_granularity = 1,
    .rng_state_location = Location::device,
    .wrapped_numbers_unhooked = true,
    .checkpoint_unpack_releases = true,
    .checkpoint_early_stop = true,
    .rules = kTorch2Rules,
};

constexpr RuntimeProfile apply(RuntimeProfile p, CudaDelta d) {
  switch (d) {
    case CudaDelta::dropout_bool_mask: p.dropout = DropoutImpl::bool_mask; break;
    case CudaDelta::layer_norm_stats_fp32: p.layer_norm_stats_fp32 = true; break;
    case CudaDelta::host_scalars: p.scalar_location = Location::host; break;
    case CudaDelta::host_step: p.step_scalar_location = Location::host; break;
    case CudaDelta::foreach_default: p.default_impl = OptimizerImpl::foreach; break;
    case CudaDelta::no_onednn: p.onednn_bf16_matmul = false; break;
    case CudaDelta::block_512: p.alloc_granularity = 512; break;
    case CudaDelta::host_rng_state: p.rng_state_location = Location::host; break;
  }
  return p;
}

constexpr RuntimeProfile with_deltas(RuntimeProfile p, std::span<const DeltaInfo> deltas) {
  for (const DeltaInfo& d : deltas) p = apply(p, d.id);
  p.id = ProfileId::torch_cuda;
  p.name = "torch-cuda";
  p.describes = "PyTorch 2.x eager on a CUDA GPU: torch2-cpu plus the CUDA deltas";
  return p;
}

// The CUDA deltas: everything torch-cuda does differently from torch2-cpu. Each cites the PyTorch
// 2.x source it comes from; `confirmed` says whether a real GPU has confirmed it (scripts/gpu-check.sh).
constexpr std::array kDeltas{
    DeltaInfo{CudaDelta::dropout_bool_mask, "dropout_bool_mask",
              "dropout keeps a bool mask (1 B/element) instead of a noise tensor in the model dtype",
              "aten/src/ATen/native/Dropout.cpp dropout(): is_fused_kernel_acceptable(input, p) is true "
              "for CUDA tensors, so native_dropout runs; aten/src/ATen/native/cuda/Dropout.cu "
              "dropout_cuda: mask = at::empty_like(self, self.options().dtype(c10::CppTypeToScalarType<bool>))"},
    DeltaInfo{CudaDelta::layer_norm_stats_fp32, "layer_norm_stats_fp32",
              "LayerNorm's saved mean and rstd are float32 for 16-bit inputs (input dtype on the CPU)",
              "aten/src/ATen/native/cuda/layer_norm_kernel.cu layer_norm_cuda: mean = at::empty({M}, "
              "X->options().dtype(acc_type)) vs aten/src/ATen/native/layer_norm.cpp layer_norm_cpu: "
              "at::empty({M}, X->options().dtype(param_scalar_type(...)))"},
    DeltaInfo{CudaDelta::host_scalars, "host_scalars",
              "Python numbers wrapped as 0-dim float64 tensors (and their casts) stay in host memory: "
              "8 B saved per `x * c` / `x / c`, and the transient cast, leave device memory",
              "torch/csrc/utils/python_arg_parser.cpp (scalar_to_tensor -> a CPU wrapped number); "
              "aten/src/ATen/TensorIterator.cpp compute_types: a CPU scalar is read on the host, no cast "
              "is allocated on the device"},
    DeltaInfo{CudaDelta::host_step, "host_step",
              "Adam(W)'s 0-dim float32 `step` tensors live on the host unless fused or capturable",
              "torch/optim/adam.py Adam._init_group: state['step'] = torch.zeros((), dtype=_get_scalar_dtype"
              "(is_fused=fused), device=p.device) if capturable or fused else torch.tensor(0.0, "
              "dtype=_get_scalar_dtype())"},
    DeltaInfo{CudaDelta::foreach_default, "foreach_default",
              "torch.optim picks the foreach implementation (for-loop on the CPU)",
              "torch/optim/optimizer.py _default_to_fused_or_foreach: foreach = all(p is None or (type(p) in "
              "_foreach_supported_types and p.device.type in fused/foreach supported devices ('cuda', ...)))"},
    DeltaInfo{CudaDelta::no_onednn, "no_onednn",
              "16-bit matmuls run in cuBLAS: no oneDNN scratchpad or reorder copies",
              "aten/src/ATen/native/LinearAlgebra.cpp addmm_impl_cpu_: use_mkldnn_matmul (CPU only) vs "
              "aten/src/ATen/native/cuda/Blas.cpp addmm_out_cuda_impl (cuBLAS)"},
    DeltaInfo{CudaDelta::block_512, "block_512",
              "every allocation occupies a multiple of 512 B (what memory_allocated counts)",
              "c10/cuda/CUDACachingAllocator.cpp: kMinBlockSize = 512; round_size(size) rounds every request "
              "up to a multiple of it, and stats count the rounded block size"},
    DeltaInfo{CudaDelta::host_rng_state, "host_rng_state",
              "each checkpoint call's RNG stash (5056 B, kept until the region's backward; another for the "
              "duration of the recomputation) is host memory, not device memory",
              "torch/utils/checkpoint.py _checkpoint_without_reentrant_generator: fwd_cpu_state = "
              "torch.get_rng_state() (a CPU tensor; CUDA states come from get_device_states as CPU tensors "
              "too), and recompute_fn's torch.random.fork_rng stashes it again"},
};

constexpr RuntimeProfile kTorchCuda = with_deltas(kTorch2Cpu, kDeltas);

// A CPU profile on a machine without AVX-512: oneDNN's bf16 matmul is not used.
constexpr RuntimeProfile on_avx2(RuntimeProfile p) {
  p.onednn_bf16_matmul = false;
  return p;
}
constexpr RuntimeProfile kTorchCpuAvx2 = on_avx2(kTorchCpu);
constexpr RuntimeProfile kTorch2CpuAvx2 = on_avx2(kTorch2Cpu);

// torch.autocast's op lists for the op kinds the lowerings emit (training.autocast). Each row names
// the aten ops of aten/src/ATen/autocast_mode.cpp (lists of the AutocastCPU / AutocastCUDA
// registrations) that the op kind stands for; linear and matmul are the entry points of mm, addmm
// and bmm, and cross_entropy_loss that of log_softmax + nll_loss (the builder applies the policy at
// the entry point; the ops inside run with autocast excluded, as WrapFunction_ does).
// CPU, PyTorch 1.13 (v1.13.0 autocast_mode.cpp, TORCH_LIBRARY_IMPL(aten, AutocastCPU)) and 2.x
// (v2.13.0, the same file) agree on every op kind here; checked on both with tests/torch.
constexpr std::array kAutocastCpu{
    AutocastRule{OpKind::mm, CastPolicy::lower_precision_fp, "mm, matmul, linear"},
    AutocastRule{OpKind::addmm, CastPolicy::lower_precision_fp, "addmm, linear"},
    AutocastRule{OpKind::bmm, CastPolicy::lower_precision_fp, "bmm, matmul"},
    AutocastRule{OpKind::flash_attention, CastPolicy::lower_precision_fp, "scaled_dot_product_attention (2.x)"},
    AutocastRule{OpKind::nll_loss, CastPolicy::fp32, "cross_entropy_loss, nll_loss"},
    AutocastRule{OpKind::stack, CastPolicy::promote, "stack"},
    AutocastRule{OpKind::cat, CastPolicy::promote, "cat"},
};
// CUDA, PyTorch 2.x (v2.13.0 autocast_mode.h AT_FORALL_LOWER_PRECISION_FP, AT_FORALL_FP32,
// AT_FORALL_FP32_SET_OPT_DTYPE, AT_FORALL_PROMOTE, registered by TORCH_LIBRARY_IMPL(aten,
// Autocast)). Not confirmed on a GPU yet.
constexpr std::array kAutocastCuda{
    AutocastRule{OpKind::mm, CastPolicy::lower_precision_fp, "mm, matmul, linear"},
    AutocastRule{OpKind::addmm, CastPolicy::lower_precision_fp, "addmm, linear"},
    AutocastRule{OpKind::bmm, CastPolicy::lower_precision_fp, "bmm, matmul"},
    AutocastRule{OpKind::flash_attention, CastPolicy::lower_precision_fp, "scaled_dot_product_attention"},
    AutocastRule{OpKind::layer_norm, CastPolicy::fp32, "layer_norm, native_layer_norm"},
    AutocastRule{OpKind::rsqrt, CastPolicy::fp32, "rsqrt"},
    AutocastRule{OpKind::pow_scalar, CastPolicy::fp32, "pow.Tensor_Scalar"},
    AutocastRule{OpKind::nll_loss, CastPolicy::fp32, "nll_loss (cross_entropy_loss's log_softmax is "
                                                     "fp32_set_opt_dtype: the same cast of the logits)"},
    AutocastRule{OpKind::softmax, CastPolicy::fp32_set_opt_dtype, "softmax"},
    AutocastRule{OpKind::log_softmax, CastPolicy::fp32_set_opt_dtype, "log_softmax"},
};

}  // namespace

std::span<const AutocastRule> RuntimeProfile::autocast_rules() const {
  if (id == ProfileId::torch_cuda) return kAutocastCuda;
  return kAutocastCpu;
}

CastPolicy RuntimeProfile::autocast_policy(OpKind k) const {
  for (const AutocastRule& r : autocast_rules()) {
    if (r.op == k) return r.policy;
  }
  return CastPolicy::none;
}

bool RuntimeProfile::autocast_supports(DType dt) const {
  // torch/amp/autocast_mode.py (1.13) __enter__: torch.set_autocast_cpu_dtype raises "Currently,
  // AutocastCPU only support Bfloat16 as the autocast_cpu_dtype" for float16.
  return dt != DType::f16 || id != ProfileId::torch_cpu;
}

namespace {

// The first rule of each op kind in a rule table, by kind: rule() runs for every op the builder
// emits, and the tables are a few dozen entries long (issue 9).
struct RuleIndex {
  std::vector<const SaveRule*> by_kind;
  explicit RuleIndex(std::span<const SaveRule> rules) {
    for (const SaveRule& r : rules) {
      const size_t i = static_cast<size_t>(r.op);
      if (i >= by_kind.size()) by_kind.resize(i + 1, nullptr);
      if (by_kind[i] == nullptr) by_kind[i] = &r;
    }
  }
  const SaveRule* find(OpKind k) const {
    const size_t i = static_cast<size_t>(k);
    return i < by_kind.size() ? by_kind[i] : nullptr;
  }
};

}  // namespace

const SaveRule* RuntimeProfile::rule(OpKind k) const {
  // The built-in tables through their index; any other table by a scan (the same first match).
  static const RuleIndex cpu113(kCpu113Rules), torch2(kTorch2Rules);
  if (rules.data() == kCpu113Rules.data() && rules.size() == kCpu113Rules.size()) return cpu113.find(k);
  if (rules.data() == kTorch2Rules.data() && rules.size() == kTorch2Rules.size()) return torch2.find(k);
  for (const SaveRule& r : rules) {
    if (r.op == k) return &r;
  }
  return nullptr;
}

int64_t RuntimeProfile::matmul_workspace(DType dt, int64_t batch, int64_t m, int64_t k, int64_t n,
                                         bool a_col_major) const {
  // torch 1.13 CPU, bfloat16: mkldnn_bf16_gemm is used when batch*m*n*k > 16*16*16
  // (aten/src/ATen/native/mkldnn/Utils.h use_mkldnn_bf16_matmul). Measured with the CPU
  // profiler (tests/torch): oneDNN's scratchpad is roundup(k, 32) * 128 + 768 bytes, and a
  // column-major A is first reordered into a row-major copy of m x roundup(k, 32) bf16 (+128),
  // one batch slice at a time.
  if (!onednn_bf16_matmul || dt != DType::bf16 || batch * m * n * k <= 16 * 16 * 16) return 0;
  const int64_t kp = (k + 31) / 32 * 32;
  int64_t ws = kp * 128 + 768;
  if (a_col_major) ws += m * kp * 2 + 128;
  return ws;
}

const RuntimeProfile& profile(ProfileId id, CpuIsa isa) {
  const bool avx2 = isa == CpuIsa::avx2;
  switch (id) {
    case ProfileId::torch_cpu: return avx2 ? kTorchCpuAvx2 : kTorchCpu;
    case ProfileId::torch2_cpu: return avx2 ? kTorch2CpuAvx2 : kTorch2Cpu;
    default: return kTorchCuda;
  }
}

RuntimeProfile profile_with(std::span<const CudaDelta> deltas) {
  RuntimeProfile p = kTorch2Cpu;
  for (CudaDelta d : deltas) p = apply(p, d);
  return p;
}

std::span<const DeltaInfo> cuda_deltas() { return kDeltas; }

bool parse_profile(std::string_view name, ProfileId& out) {
  if (name == "torch-cuda") out = ProfileId::torch_cuda;
  else if (name == "torch-cpu") out = ProfileId::torch_cpu;
  else if (name == "torch2-cpu") out = ProfileId::torch2_cpu;
  else return false;
  return true;
}

CpuIsa native_cpu_isa() {
  // oneDNN's bf16 matmul needs AVX-512 BW, VL and DQ (aten/src/ATen/native/mkldnn/Utils.h
  // mkldnn_bf16_device_check: cpuinfo_has_x86_avx512bw/vl/dq).
  static const CpuIsa isa = [] {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512dq"))
      return CpuIsa::avx512;
#endif
    return CpuIsa::avx2;
  }();
  return isa;
}

}  // namespace actsim::graph
