// The CUDA backend's kernel toolkit, shared by its op families (cuda_forward.cu, cuda_backward.cu,
// cuda_optim.cu, cuda_attention.cu; cuda_ops.cu dispatches): strided views, element access,
// launch helpers, reductions, cuBLAS products, the arguments of an op call. Internal to
// backends/cuda; split as the CPU backend is (cpu_forward / cpu_backward / cpu_optim).
//
// Conventions shared by every kernel:
//  - Tensors arrive as strided views (DView): any shape up to rank kMaxRank, element strides,
//    storage dtype read and written through ld/st, arithmetic in fp32 (fp32 and bf16 storage).
//  - Reductions never use atomics: a row is reduced by one block (fixed thread-to-element
//    assignment, then a fixed shuffle tree), a column reduction by fixed row chunks whose partial
//    sums a second kernel adds in chunk order. So a run is bitwise reproducible on one GPU.
//  - Matrix products go to cuBLAS with fp32 compute (CUBLAS_COMPUTE_32F: no TF32, as PyTorch's
//    default allow_tf32 = False for matmul), on the backend's stream, with a fixed workspace.
//
// Everything here is inline or a template: each .cu file compiles its own kernels (no relocatable
// device code). Non-template __global__ kernels live in the one .cu file that launches them.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

#include "actsim/util/error.hpp"
#include "actsim/util/rng.hpp"
#include "cuda_ops.hpp"

namespace actsim::backends::cuda {

using util::rng_keep;
using graph::DType;
using graph::Op;
using graph::OpKind;
using graph::OptimStep;
using graph::Shape;
using graph::TensorId;

inline constexpr int kMaxRank = 6;
inline constexpr int kThreads = 256;        // elementwise and row kernels
inline constexpr int kAttnThreads = 128;    // attention kernels (one query or key row per block)

[[noreturn]] inline void unsupported(const std::string& what) { throw std::runtime_error("cuda backend: " + what); }

// A strided view of one tensor, passed by value to kernels.
struct DView {
  char* p = nullptr;                 // base + offset, in bytes
  DType dt = DType::f32;
  int rank = 0;
  bool contig = true;                // offset of logical element i is i
  int64_t n = 1;                     // elements
  int64_t shape[kMaxRank] = {};
  int64_t st[kMaxRank] = {};         // elements

  __host__ __device__ int64_t off(int64_t i) const {
    if (contig) return i;
    int64_t o = 0;
    for (int d = rank - 1; d >= 0; --d) {
      const int64_t s = shape[d];
      const int64_t q = i / s;
      o += (i - q * s) * st[d];
      i = q;
    }
    return o;
  }
};

inline int64_t esize(DType t) { return graph::dtype_size(t); }

inline void finish(DView& v) {
  v.n = 1;
  int64_t expect = 1;
  v.contig = true;
  for (int d = v.rank - 1; d >= 0; --d) {
    v.n *= v.shape[d];
    if (v.shape[d] != 1 && v.st[d] != expect) v.contig = false;
    expect *= v.shape[d];
  }
}

inline DView view_of(const TensorArg& a) {
  if (a.shape.size() > kMaxRank) unsupported("tensor of rank > 6");
  DView v;
  v.p = static_cast<char*>(a.base) + a.offset * esize(a.dtype);
  v.dt = a.dtype;
  v.rank = static_cast<int>(a.shape.size());
  const graph::Strides st = a.strides.empty() ? graph::contiguous_strides(a.shape) : a.strides;
  for (int d = 0; d < v.rank; ++d) {
    v.shape[d] = a.shape[d];
    v.st[d] = st[d];
  }
  finish(v);
  return v;
}

// `v` broadcast (right-aligned, stride 0 on expanded dims) to `out`.
inline DView bcast(const DView& v, const DView& out) {
  DView b = v;
  b.rank = out.rank;
  const int lead = out.rank - v.rank;
  if (lead < 0) unsupported("broadcast to a lower rank");
  for (int d = 0; d < out.rank; ++d) {
    const int s = d - lead;
    const int64_t dim = s >= 0 ? v.shape[s] : 1;
    b.shape[d] = out.shape[d];
    b.st[d] = (s >= 0 && dim == out.shape[d]) ? v.st[s] : 0;
    if (dim != out.shape[d] && dim != 1) unsupported("shapes do not broadcast");
  }
  finish(b);
  if (b.n != v.n) b.contig = false;
  return b;
}

inline DView transposed(DView v, int a, int b) {
  std::swap(v.shape[a], v.shape[b]);
  std::swap(v.st[a], v.st[b]);
  finish(v);
  return v;
}

// The view without its last dim (rows), and the last dim's size and stride (columns).
struct Rows {
  DView outer;
  int64_t cols = 1, cs = 1;
};
inline Rows rows_of(const DView& v) {
  Rows r;
  r.outer = v;
  if (v.rank == 0) {
    r.outer.rank = 0;
  } else {
    r.cols = v.shape[v.rank - 1];
    r.cs = v.st[v.rank - 1];
    r.outer.rank = v.rank - 1;
  }
  finish(r.outer);
  return r;
}

// ---- element access --------------------------------------------------------------------------

__device__ __forceinline__ float ld(const DView& v, int64_t o) {
  switch (v.dt) {
    case DType::f32: return reinterpret_cast<const float*>(v.p)[o];
    case DType::bf16: return __bfloat162float(reinterpret_cast<const __nv_bfloat16*>(v.p)[o]);
    case DType::f16: return __half2float(reinterpret_cast<const __half*>(v.p)[o]);
    case DType::f64: return static_cast<float>(reinterpret_cast<const double*>(v.p)[o]);
    case DType::i64: return static_cast<float>(reinterpret_cast<const long long*>(v.p)[o]);
    case DType::i32: return static_cast<float>(reinterpret_cast<const int*>(v.p)[o]);
    case DType::b8: case DType::u8: return reinterpret_cast<const unsigned char*>(v.p)[o];
  }
  return 0.f;
}

__device__ __forceinline__ int64_t ldi(const DView& v, int64_t o) {
  switch (v.dt) {
    case DType::i64: return reinterpret_cast<const long long*>(v.p)[o];
    case DType::i32: return reinterpret_cast<const int*>(v.p)[o];
    case DType::b8: case DType::u8: return reinterpret_cast<const unsigned char*>(v.p)[o];
    default: return static_cast<int64_t>(ld(v, o));
  }
}

__device__ __forceinline__ void st(const DView& v, int64_t o, float x) {
  switch (v.dt) {
    case DType::f32: reinterpret_cast<float*>(v.p)[o] = x; break;
    case DType::bf16: reinterpret_cast<__nv_bfloat16*>(v.p)[o] = __float2bfloat16_rn(x); break;
    case DType::f16: reinterpret_cast<__half*>(v.p)[o] = __float2half_rn(x); break;
    case DType::f64: reinterpret_cast<double*>(v.p)[o] = x; break;
    case DType::i64: reinterpret_cast<long long*>(v.p)[o] = static_cast<long long>(x); break;
    case DType::i32: reinterpret_cast<int*>(v.p)[o] = static_cast<int>(x); break;
    case DType::b8: reinterpret_cast<unsigned char*>(v.p)[o] = x != 0.f; break;
    case DType::u8: reinterpret_cast<unsigned char*>(v.p)[o] = static_cast<unsigned char>(x); break;
  }
}

__device__ __forceinline__ void sti(const DView& v, int64_t o, int64_t x) {
  switch (v.dt) {
    case DType::i64: reinterpret_cast<long long*>(v.p)[o] = x; break;
    case DType::i32: reinterpret_cast<int*>(v.p)[o] = static_cast<int>(x); break;
    case DType::b8: reinterpret_cast<unsigned char*>(v.p)[o] = x != 0; break;
    case DType::u8: reinterpret_cast<unsigned char*>(v.p)[o] = static_cast<unsigned char>(x); break;
    default: st(v, o, static_cast<float>(x));
  }
}

// Bit copy of one element (same dtype on both sides).
__device__ __forceinline__ void cp(const DView& d, int64_t od, const DView& s, int64_t os, int esz) {
  switch (esz) {
    case 1: reinterpret_cast<uint8_t*>(d.p)[od] = reinterpret_cast<const uint8_t*>(s.p)[os]; break;
    case 2: reinterpret_cast<uint16_t*>(d.p)[od] = reinterpret_cast<const uint16_t*>(s.p)[os]; break;
    case 4: reinterpret_cast<uint32_t*>(d.p)[od] = reinterpret_cast<const uint32_t*>(s.p)[os]; break;
    default: reinterpret_cast<uint64_t*>(d.p)[od] = reinterpret_cast<const uint64_t*>(s.p)[os]; break;
  }
}

// ---- launch helpers --------------------------------------------------------------------------

template <class F>
__global__ void k_each(int64_t n, F f) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    f(i);
  }
}

inline void check_launch() { ACTSIM_CUDA_CHECK(cudaGetLastError()); }

// f(i) for every i in [0, n): one thread per element (grid-stride beyond 2^21 blocks).
template <class F>
void each(Context& c, int64_t n, F f) {
  if (n <= 0) return;
  const int64_t blocks = std::min<int64_t>((n + kThreads - 1) / kThreads, int64_t{1} << 21);
  k_each<<<static_cast<unsigned>(blocks), kThreads, 0, c.stream>>>(n, f);
  check_launch();
}

// Sum over the block in a fixed order: per-thread values, a shuffle tree per warp, then warp 0
// adds the warps' sums. Every thread gets the result. `sh` holds 32 floats.
__device__ inline float block_sum(float v, float* sh) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  const int w = threadIdx.x >> 5, l = threadIdx.x & 31;
  __syncthreads();
  if (l == 0) sh[w] = v;
  __syncthreads();
  if (w == 0) {
    v = l < static_cast<int>(blockDim.x >> 5) ? sh[l] : 0.f;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
    if (l == 0) sh[0] = v;
  }
  __syncthreads();
  return sh[0];
}

__device__ inline float block_max(float v, float* sh) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_down_sync(0xffffffffu, v, o));
  const int w = threadIdx.x >> 5, l = threadIdx.x & 31;
  __syncthreads();
  if (l == 0) sh[w] = v;
  __syncthreads();
  if (w == 0) {
    v = l < static_cast<int>(blockDim.x >> 5) ? sh[l] : -INFINITY;
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_down_sync(0xffffffffu, v, o));
    if (l == 0) sh[0] = v;
  }
  __syncthreads();
  return sh[0];
}

// f(row, shared) run by a whole block per row.
template <class F>
__global__ void k_rows(int64_t rows, F f) {
  __shared__ float sh[32];
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) f(r, sh);
}

template <class F>
void per_row(Context& c, int64_t rows, F f) {
  if (rows <= 0) return;
  const int64_t blocks = std::min<int64_t>(rows, int64_t{1} << 20);
  k_rows<<<static_cast<unsigned>(blocks), kThreads, 0, c.stream>>>(rows, f);
  check_launch();
}

// Column sums in two fixed stages: part[chunk][c] = sum of f(r, c) over the chunk's rows in
// order, then fin(c, sum of part[.][c] in chunk order).
template <class F>
__global__ void k_colpart(int64_t rows, int64_t cols, int64_t chunk, float* part, F f) {
  const int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (c >= cols) return;
  const int64_t r0 = blockIdx.y * chunk, r1 = r0 + chunk < rows ? r0 + chunk : rows;
  float acc = 0.f;
  for (int64_t r = r0; r < r1; ++r) acc += f(r, c);
  part[blockIdx.y * cols + c] = acc;
}

template <class G>
__global__ void k_colfin(int64_t cols, int64_t nchunks, const float* part, G g) {
  const int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (c >= cols) return;
  float acc = 0.f;
  for (int64_t k = 0; k < nchunks; ++k) acc += part[k * cols + c];
  g(c, acc);
}

template <class F, class G>
void col_reduce(Context& c, int64_t rows, int64_t cols, F f, G g) {
  if (cols <= 0) return;
  const int64_t nchunks = std::clamp<int64_t>((rows + 63) / 64, 1, 1024);
  const int64_t chunk = std::max<int64_t>(1, (rows + nchunks - 1) / nchunks);
  float* part = static_cast<float*>(c.temp(nchunks * cols * 4));
  dim3 grid(static_cast<unsigned>((cols + kThreads - 1) / kThreads), static_cast<unsigned>(nchunks));
  k_colpart<<<grid, kThreads, 0, c.stream>>>(rows, cols, chunk, part, f);
  check_launch();
  k_colfin<<<static_cast<unsigned>((cols + kThreads - 1) / kThreads), kThreads, 0, c.stream>>>(cols, nchunks, part, g);
  check_launch();
}

// ---- generic building blocks -----------------------------------------------------------------

inline void copy_into(Context& c, const DView& dst, const DView& src) {
  if (dst.n != src.n) unsupported("copy between tensors of different sizes");
  const int esz = static_cast<int>(esize(dst.dt));
  if (esize(src.dt) != esz) unsupported("copy between dtypes");
  each(c, dst.n, [=] __device__(int64_t i) { cp(dst, dst.off(i), src, src.off(i), esz); });
}

inline void fill(Context& c, const DView& dst, float v) {
  each(c, dst.n, [=] __device__(int64_t i) { st(dst, dst.off(i), v); });
}

// out = sum of `in` over the dims `out` lacks or has as 1 (at::sum_to), fp32, fixed order.
inline void sum_to(Context& c, const DView& in, const DView& out) {
  const int lead = in.rank - out.rank;
  if (lead < 0) unsupported("sum_to a higher rank");
  DView kept = in, red = in;  // kept: out's index space; red: the reduced index space
  kept.rank = red.rank = in.rank;
  for (int d = 0; d < in.rank; ++d) {
    const int s = d - lead;
    const bool reduced = s < 0 || (out.shape[s] == 1 && in.shape[d] != 1);
    kept.shape[d] = reduced ? 1 : in.shape[d];
    red.shape[d] = reduced ? in.shape[d] : 1;
  }
  finish(kept);
  finish(red);
  kept.contig = red.contig = false;
  col_reduce(
      c, red.n, kept.n, [=] __device__(int64_t r, int64_t k) { return ld(in, kept.off(k) + red.off(r)); },
      [=] __device__(int64_t k, float s) { st(out, out.off(k), s); });
}

// ---- matrix products (cuBLAS) ----------------------------------------------------------------

struct Mat {
  char* p = nullptr;
  DType dt = DType::f32;
  int64_t batch = 1, rows = 0, cols = 0, bs = 0, rs = 0, cs = 0;
};

inline Mat mat_of(const DView& v) {
  Mat m;
  m.p = v.p;
  m.dt = v.dt;
  if (v.rank == 3) {
    m.batch = v.shape[0];
    m.bs = v.shape[0] > 1 ? v.st[0] : 0;
  } else if (v.rank != 2) {
    unsupported("matrix product of rank " + std::to_string(v.rank));
  }
  m.rows = v.shape[v.rank - 2];
  m.cols = v.shape[v.rank - 1];
  m.rs = v.st[v.rank - 2];
  m.cs = v.st[v.rank - 1];
  return m;
}

// Whether cuBLAS can read `m` in place: row-major (unit column stride) or column-major.
inline bool layout(const Mat& m, bool& row_major, int64_t& ld) {
  if ((m.cs == 1 || m.cols == 1) && (m.rows == 1 || m.rs >= m.cols)) {
    row_major = true;
    ld = m.rows == 1 ? std::max<int64_t>(m.cols, 1) : m.rs;
    return true;
  }
  if ((m.rs == 1 || m.rows == 1) && (m.cols == 1 || m.cs >= m.rows)) {
    row_major = false;
    ld = m.cols == 1 ? std::max<int64_t>(m.rows, 1) : m.cs;
    return true;
  }
  return false;
}

inline DView dview_of(const Mat& m) {
  DView v;
  v.p = m.p;
  v.dt = m.dt;
  v.rank = 3;
  v.shape[0] = m.batch;
  v.shape[1] = m.rows;
  v.shape[2] = m.cols;
  v.st[0] = m.bs;
  v.st[1] = m.rs;
  v.st[2] = m.cs;
  finish(v);
  return v;
}

// A contiguous copy of `m` in scratch (operands cuBLAS cannot read in place).
inline Mat packed(Context& c, const Mat& m, bool copy) {
  Mat t = m;
  t.p = static_cast<char*>(c.temp(m.batch * m.rows * m.cols * esize(m.dt)));
  t.rs = m.cols;
  t.cs = 1;
  t.bs = m.rows * m.cols;
  if (copy) copy_into(c, dview_of(t), dview_of(m));
  return t;
}

inline cudaDataType cuda_type(DType t) {
  switch (t) {
    case DType::f32: return CUDA_R_32F;
    case DType::bf16: return CUDA_R_16BF;
    case DType::f16: return CUDA_R_16F;
    default: unsupported("matrix product in " + std::string(graph::to_string(t)));
  }
}

// C[b] = A[b] (m x k) @ B[b] (k x n) + beta * C[b], fp32 accumulation.
inline void gemm(Context& c, Mat A, Mat B, Mat C, float beta) {
  if (A.dt != B.dt || A.dt != C.dt) unsupported("matrix product of mixed dtypes");
  const int64_t m = C.rows, n = C.cols, k = A.cols;
  if (A.rows != m || B.cols != n || B.rows != k) unsupported("matrix product shapes");
  const int64_t batch = C.batch;
  if (m == 0 || n == 0) return;
  if (k == 0) {  // empty sum: C = beta * C
    const DView cv = dview_of(C);
    each(c, cv.n, [=] __device__(int64_t i) { st(cv, cv.off(i), beta == 0.f ? 0.f : beta * ld(cv, cv.off(i))); });
    return;
  }
  bool ar, br, cr;
  int64_t lda, ldb, ldc;
  if (!layout(A, ar, lda)) A = packed(c, A, true), layout(A, ar, lda);
  if (!layout(B, br, ldb)) B = packed(c, B, true), layout(B, br, ldb);
  Mat out = C;
  const bool pack_c = !layout(C, cr, ldc);
  if (pack_c) C = packed(c, C, beta != 0.f), layout(C, cr, ldc);
  const cudaDataType t = cuda_type(C.dt);
  const float alpha = 1.f;
  if (A.batch == 1) A.bs = 0;
  if (B.batch == 1) B.bs = 0;
  if (cr) {
    // Row-major C is column-major C^T = B^T A^T.
    ACTSIM_CUBLAS_CHECK(cublasGemmStridedBatchedEx(
        c.cublas, br ? CUBLAS_OP_N : CUBLAS_OP_T, ar ? CUBLAS_OP_N : CUBLAS_OP_T, static_cast<int>(n),
        static_cast<int>(m), static_cast<int>(k), &alpha, B.p, t, static_cast<int>(ldb), B.bs, A.p, t,
        static_cast<int>(lda), A.bs, &beta, C.p, t, static_cast<int>(ldc), C.bs, static_cast<int>(batch),
        CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
  } else {
    ACTSIM_CUBLAS_CHECK(cublasGemmStridedBatchedEx(
        c.cublas, ar ? CUBLAS_OP_T : CUBLAS_OP_N, br ? CUBLAS_OP_T : CUBLAS_OP_N, static_cast<int>(m),
        static_cast<int>(n), static_cast<int>(k), &alpha, A.p, t, static_cast<int>(lda), A.bs, B.p, t,
        static_cast<int>(ldb), B.bs, &beta, C.p, t, static_cast<int>(ldc), C.bs, static_cast<int>(batch),
        CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
  }
  if (pack_c) copy_into(c, dview_of(out), dview_of(C));
}

inline Mat tmat(const DView& v) {  // the matrix transpose of a 2-D or batched 3-D view
  return mat_of(transposed(v, v.rank - 2, v.rank - 1));
}

struct Args {
  const OpCall& call;
  const graph::Graph& g;
  const Op& op;   // the op called (backward, optimizer, ...)
  const Op& f;    // the op whose semantics run: itself, or the forward op of a backward op

  DView in(size_t i) const { return view_of(call.inputs.at(i)); }
  DView out(size_t i) const { return view_of(call.outputs.at(i)); }

  // Backward ops: incoming gradient of forward output j, if any.
  const TensorArg* gin(int j) const {
    for (int k = 0; k < op.n_grad_inputs; ++k) {
      if (op.grad_in_of.at(k) == j) return &call.inputs.at(k);
    }
    return nullptr;
  }
  // Backward ops: the saved tensor `t` among the inputs after the incoming gradients.
  const TensorArg* saved(TensorId t) const {
    for (size_t k = op.n_grad_inputs; k < op.inputs.size(); ++k) {
      if (op.inputs[k] == t) return &call.inputs.at(k);
    }
    return nullptr;
  }
  DView saved_in(size_t i) const { return need(saved(f.inputs.at(i)), "forward input", i); }
  DView saved_out(size_t j) const { return need(saved(f.outputs.at(j)), "forward output", j); }
  DView need(const TensorArg* a, const char* what, size_t i) const {
    if (!a) unsupported(std::string(graph::to_string(f.kind)) + " backward: " + what + " " + std::to_string(i) + " not saved");
    return view_of(*a);
  }
  // Backward ops: the gradient of forward input i to compute, or null when there is none or it
  // aliases an incoming gradient (a pass-through or a view: nothing to write).
  const TensorArg* gout(int i) const {
    for (size_t m = 0; m < op.grad_of.size(); ++m) {
      if (op.grad_of[m] != i) continue;
      const TensorId t = op.grad_outputs.at(m);
      if (g.tensor(t).is_view) return nullptr;
      for (int k = 0; k < op.n_grad_inputs; ++k) {
        if (op.inputs[k] == t) return nullptr;
      }
      return &call.grad_outputs.at(m);
    }
    return nullptr;
  }
};

__device__ __forceinline__ float gelu_tanh(float x) {
  const float kBeta = 0.7978845608028654f, kKappa = 0.044715f;
  return 0.5f * x * (1.f + tanhf(kBeta * (x + kKappa * x * x * x)));
}
__device__ __forceinline__ float gelu_tanh_grad(float x) {
  const float kBeta = 0.7978845608028654f, kKappa = 0.044715f;
  const float x2 = x * x, inner = kBeta * (x + kKappa * x2 * x), t = tanhf(inner);
  const float left = 0.5f * x, right = 1.f + t;
  return 0.5f * right + left * (1.f - t * t) * kBeta * (1.f + 3.f * kKappa * x2);
}
__device__ __forceinline__ float sigmoid(float x) { return 1.f / (1.f + expf(-x)); }

// ---- the op families (one .cu file each) ----------------------------------------------------

// Forward op kinds (recompute ops too: they keep their forward kind, Op::recompute = true).
void run_forward(Context& c, const Args& a);
// OpKind::backward: `a.op` is the backward op, `a.f` the op it differentiates.
void run_backward(Context& c, const Args& a);
// optim_update / optim_temp.
void run_optim(Context& c, const Args& a);
// Causal attention with scale 1/sqrt(hd) and optional dropout on the probabilities.
void attention_fwd(Context& c, const DView& q, const DView& k, const DView& v, const DView& o, const DView& lse,
                   double p, uint64_t seed);
void attention_bwd(Context& c, const DView& q, const DView& k, const DView& v, const DView& o, const DView& lse,
                   const DView& dout, const DView* dq, const DView* dk, const DView* dv, double p, uint64_t seed);

}  // namespace actsim::backends::cuda
