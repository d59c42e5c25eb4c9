// CUDA kernels for every op kind the lowering, autodiff and optimizer emit (docs/cuda.md lists
// them with their numerics). One translation unit on purpose: nvcc is slow, and CI has two cores.
//
// Conventions shared by every kernel here:
//  - Tensors arrive as strided views (DView): any shape up to rank kMaxRank, element strides,
//    storage dtype read and written through ld/st, arithmetic in fp32 (fp32 and bf16 storage).
//  - Reductions never use atomics: a row is reduced by one block (fixed thread-to-element
//    assignment, then a fixed shuffle tree), a column reduction by fixed row chunks whose partial
//    sums a second kernel adds in chunk order. So a run is bitwise reproducible on one GPU.
//  - Matrix products go to cuBLAS with fp32 compute (CUBLAS_COMPUTE_32F: no TF32, as PyTorch's
//    default allow_tf32 = False for matmul), on the backend's stream, with a fixed workspace.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <string>

#include "actsim/util/error.hpp"
#include "cuda_ops.hpp"
#include "actsim/util/rng.hpp"

namespace actsim::backends::cuda {
using util::rng_keep;
namespace {

using graph::DType;
using graph::Op;
using graph::OpKind;
using graph::OptimStep;
using graph::Shape;
using graph::TensorId;

constexpr int kMaxRank = 6;
constexpr int kThreads = 256;        // elementwise and row kernels
constexpr int kAttnThreads = 128;    // attention kernels (one query or key row per block)

[[noreturn]] void unsupported(const std::string& what) { throw std::runtime_error("cuda backend: " + what); }

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

int64_t esize(DType t) { return graph::dtype_size(t); }

void finish(DView& v) {
  v.n = 1;
  int64_t expect = 1;
  v.contig = true;
  for (int d = v.rank - 1; d >= 0; --d) {
    v.n *= v.shape[d];
    if (v.shape[d] != 1 && v.st[d] != expect) v.contig = false;
    expect *= v.shape[d];
  }
}

DView view_of(const TensorArg& a) {
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
DView bcast(const DView& v, const DView& out) {
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

DView transposed(DView v, int a, int b) {
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
Rows rows_of(const DView& v) {
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

void check_launch() { ACTSIM_CUDA_CHECK(cudaGetLastError()); }

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
__device__ float block_sum(float v, float* sh) {
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

__device__ float block_max(float v, float* sh) {
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

void copy_into(Context& c, const DView& dst, const DView& src) {
  if (dst.n != src.n) unsupported("copy between tensors of different sizes");
  const int esz = static_cast<int>(esize(dst.dt));
  if (esize(src.dt) != esz) unsupported("copy between dtypes");
  each(c, dst.n, [=] __device__(int64_t i) { cp(dst, dst.off(i), src, src.off(i), esz); });
}

void fill(Context& c, const DView& dst, float v) {
  each(c, dst.n, [=] __device__(int64_t i) { st(dst, dst.off(i), v); });
}

// out = sum of `in` over the dims `out` lacks or has as 1 (at::sum_to), fp32, fixed order.
void sum_to(Context& c, const DView& in, const DView& out) {
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

Mat mat_of(const DView& v) {
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
bool layout(const Mat& m, bool& row_major, int64_t& ld) {
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

DView dview_of(const Mat& m) {
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
Mat packed(Context& c, const Mat& m, bool copy) {
  Mat t = m;
  t.p = static_cast<char*>(c.temp(m.batch * m.rows * m.cols * esize(m.dt)));
  t.rs = m.cols;
  t.cs = 1;
  t.bs = m.rows * m.cols;
  if (copy) copy_into(c, dview_of(t), dview_of(m));
  return t;
}

cudaDataType cuda_type(DType t) {
  switch (t) {
    case DType::f32: return CUDA_R_32F;
    case DType::bf16: return CUDA_R_16BF;
    case DType::f16: return CUDA_R_16F;
    default: unsupported("matrix product in " + std::string(graph::to_string(t)));
  }
}

// C[b] = A[b] (m x k) @ B[b] (k x n) + beta * C[b], fp32 accumulation.
void gemm(Context& c, Mat A, Mat B, Mat C, float beta) {
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

Mat tmat(const DView& v) {  // the matrix transpose of a 2-D or batched 3-D view
  return mat_of(transposed(v, v.rank - 2, v.rank - 1));
}

// ---- attention (causal, scale 1/sqrt(hd), optional dropout on the probabilities) -------------

struct A4 {
  char* p = nullptr;
  DType dt = DType::f32;
  int64_t s[4] = {};
};
A4 a4(const DView& v) {
  if (v.rank != 4) unsupported("attention operand of rank " + std::to_string(v.rank));
  A4 a;
  a.p = v.p;
  a.dt = v.dt;
  for (int d = 0; d < 4; ++d) a.s[d] = v.st[d];
  return a;
}
__device__ __forceinline__ float lda4(const A4& a, int64_t b, int64_t h, int64_t t, int64_t d) {
  DView v;
  v.p = a.p;
  v.dt = a.dt;
  return ld(v, b * a.s[0] + h * a.s[1] + t * a.s[2] + d * a.s[3]);
}
__device__ __forceinline__ void sta4(const A4& a, int64_t b, int64_t h, int64_t t, int64_t d, float x) {
  DView v;
  v.p = a.p;
  v.dt = a.dt;
  st(v, b * a.s[0] + h * a.s[1] + t * a.s[2] + d * a.s[3], x);
}

struct AttnShape {
  int64_t B, H, T, hd;
  float scale;       // 1/sqrt(hd)
  float p;           // dropout probability
  float keep_scale;  // 1/(1-p)
  uint64_t seed;
  DView lse;         // [B, H, T] fp32
};

// Dropout factor of probability (b, h, i, j): counter index ((b*H + h)*T + i)*T + j.
__device__ __forceinline__ float attn_drop(const AttnShape& s, int64_t bh, int64_t i, int64_t j) {
  if (s.p <= 0.f) return 1.f;
  const uint64_t idx = (static_cast<uint64_t>(bh) * s.T + i) * s.T + j;
  return rng_keep(s.seed, idx, s.p) ? s.keep_scale : 0.f;
}

// One block per query row (b, h, i): scores for keys 0..i in shared memory, max, sum, lse, then
// out[d] = sum_j p_j * drop_j * v[j, d] in key order.
__global__ void k_attn_fwd(A4 q, A4 k, A4 v, A4 o, AttnShape s) {
  extern __shared__ float sm[];
  float* sc = sm;             // [T]
  float* qs = sm + s.T;       // [hd]
  __shared__ float red[32];
  const int64_t row = blockIdx.x, i = row % s.T, bh = row / s.T, h = bh % s.H, b = bh / s.H;
  for (int64_t d = threadIdx.x; d < s.hd; d += blockDim.x) qs[d] = lda4(q, b, h, i, d);
  __syncthreads();
  float mx = -INFINITY;
  for (int64_t j = threadIdx.x; j <= i; j += blockDim.x) {
    float dot = 0.f;
    for (int64_t d = 0; d < s.hd; ++d) dot += qs[d] * lda4(k, b, h, j, d);
    sc[j] = dot * s.scale;
    mx = fmaxf(mx, sc[j]);
  }
  mx = block_max(mx, red);
  float sum = 0.f;
  for (int64_t j = threadIdx.x; j <= i; j += blockDim.x) {
    const float e = expf(sc[j] - mx);
    sc[j] = e;
    sum += e;
  }
  sum = block_sum(sum, red);
  if (threadIdx.x == 0) st(s.lse, s.lse.off(bh * s.T + i), mx + logf(sum));
  __syncthreads();
  for (int64_t d = threadIdx.x; d < s.hd; d += blockDim.x) {
    float acc = 0.f;
    for (int64_t j = 0; j <= i; ++j) acc += (sc[j] / sum) * attn_drop(s, bh, i, j) * lda4(v, b, h, j, d);
    sta4(o, b, h, i, d, acc);
  }
}

// D[row] = dO[row] . O[row]
__global__ void k_attn_delta(A4 dout, A4 o, AttnShape s, float* D) {
  __shared__ float red[32];
  const int64_t row = blockIdx.x, i = row % s.T, bh = row / s.T, h = bh % s.H, b = bh / s.H;
  float acc = 0.f;
  for (int64_t d = threadIdx.x; d < s.hd; d += blockDim.x) acc += lda4(dout, b, h, i, d) * lda4(o, b, h, i, d);
  acc = block_sum(acc, red);
  if (threadIdx.x == 0) D[row] = acc;
}

// dQ for query row i: ds_j = p_j (drop_j dO.v_j - D_i); dq = scale sum_j ds_j k_j.
__global__ void k_attn_dq(A4 q, A4 k, A4 v, A4 dout, A4 dq, AttnShape s, const float* D) {
  extern __shared__ float sm[];
  float* ds = sm;             // [T]
  float* qs = sm + s.T;       // [hd]
  float* gs = qs + s.hd;      // [hd]
  const int64_t row = blockIdx.x, i = row % s.T, bh = row / s.T, h = bh % s.H, b = bh / s.H;
  for (int64_t d = threadIdx.x; d < s.hd; d += blockDim.x) {
    qs[d] = lda4(q, b, h, i, d);
    gs[d] = lda4(dout, b, h, i, d);
  }
  __syncthreads();
  const float lse = ld(s.lse, s.lse.off(row)), Di = D[row];
  for (int64_t j = threadIdx.x; j <= i; j += blockDim.x) {
    float dot = 0.f, dp = 0.f;
    for (int64_t d = 0; d < s.hd; ++d) {
      dot += qs[d] * lda4(k, b, h, j, d);
      dp += gs[d] * lda4(v, b, h, j, d);
    }
    const float p = expf(dot * s.scale - lse);
    ds[j] = p * (attn_drop(s, bh, i, j) * dp - Di);
  }
  __syncthreads();
  for (int64_t d = threadIdx.x; d < s.hd; d += blockDim.x) {
    float acc = 0.f;
    for (int64_t j = 0; j <= i; ++j) acc += ds[j] * lda4(k, b, h, j, d);
    sta4(dq, b, h, i, d, acc * s.scale);
  }
}

// dK, dV for key row j over queries i >= j: dk = scale sum_i ds_ij q_i, dv = sum_i p_ij drop_ij dO_i.
__global__ void k_attn_dkv(A4 q, A4 k, A4 v, A4 dout, A4 dk, A4 dv, AttnShape s, const float* D) {
  extern __shared__ float sm[];
  float* ds = sm;             // [T]
  float* pd = sm + s.T;       // [T]
  float* ks = pd + s.T;       // [hd]
  float* vs = ks + s.hd;      // [hd]
  const int64_t row = blockIdx.x, j = row % s.T, bh = row / s.T, h = bh % s.H, b = bh / s.H;
  for (int64_t d = threadIdx.x; d < s.hd; d += blockDim.x) {
    ks[d] = lda4(k, b, h, j, d);
    vs[d] = lda4(v, b, h, j, d);
  }
  __syncthreads();
  for (int64_t i = j + threadIdx.x; i < s.T; i += blockDim.x) {
    float dot = 0.f, dp = 0.f;
    for (int64_t d = 0; d < s.hd; ++d) {
      dot += lda4(q, b, h, i, d) * ks[d];
      dp += lda4(dout, b, h, i, d) * vs[d];
    }
    const int64_t qi = bh * s.T + i;
    const float p = expf(dot * s.scale - ld(s.lse, s.lse.off(qi)));
    const float z = attn_drop(s, bh, i, j);
    ds[i - j] = p * (z * dp - D[qi]);
    pd[i - j] = p * z;
  }
  __syncthreads();
  for (int64_t d = threadIdx.x; d < s.hd; d += blockDim.x) {
    float ak = 0.f, av = 0.f;
    for (int64_t i = j; i < s.T; ++i) {
      ak += ds[i - j] * lda4(q, b, h, i, d);
      av += pd[i - j] * lda4(dout, b, h, i, d);
    }
    sta4(dk, b, h, j, d, ak * s.scale);
    sta4(dv, b, h, j, d, av);
  }
}

void set_smem(const void* fn, size_t bytes) {
  ACTSIM_CUDA_CHECK(cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
}

AttnShape attn_shape(const DView& q, const DView& lse, double p, uint64_t seed) {
  AttnShape s{.B = q.shape[0], .H = q.shape[1], .T = q.shape[2], .hd = q.shape[3],
              .scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(q.shape[3]))),
              .p = static_cast<float>(p), .keep_scale = p > 0 ? static_cast<float>(1.0 / (1.0 - p)) : 1.f,
              .seed = seed, .lse = lse};
  if ((2 * s.T + 2 * s.hd) * 4 > 200 * 1024) unsupported("attention with seq_len * 8 bytes over 200 KiB of shared memory");
  return s;
}

void attention_fwd(Context& c, const DView& q, const DView& k, const DView& v, const DView& o, const DView& lse,
                   double p, uint64_t seed) {
  const AttnShape s = attn_shape(q, lse, p, seed);
  const size_t smem = (s.T + s.hd) * 4;
  set_smem(reinterpret_cast<const void*>(&k_attn_fwd), smem);
  k_attn_fwd<<<static_cast<unsigned>(s.B * s.H * s.T), kAttnThreads, smem, c.stream>>>(a4(q), a4(k), a4(v), a4(o), s);
  check_launch();
}

void attention_bwd(Context& c, const DView& q, const DView& k, const DView& v, const DView& o, const DView& lse,
                   const DView& dout, const DView* dq, const DView* dk, const DView* dv, double p, uint64_t seed) {
  const AttnShape s = attn_shape(q, lse, p, seed);
  const unsigned rows = static_cast<unsigned>(s.B * s.H * s.T);
  float* D = static_cast<float*>(c.temp(s.B * s.H * s.T * 4));
  k_attn_delta<<<rows, kAttnThreads, 0, c.stream>>>(a4(dout), a4(o), s, D);
  check_launch();
  if (dq) {
    const size_t smem = (s.T + 2 * s.hd) * 4;
    set_smem(reinterpret_cast<const void*>(&k_attn_dq), smem);
    k_attn_dq<<<rows, kAttnThreads, smem, c.stream>>>(a4(q), a4(k), a4(v), a4(dout), a4(*dq), s, D);
    check_launch();
  }
  if (dk || dv) {
    // Both come out of one pass; a gradient nobody asked for goes to scratch.
    auto scratch = [&](const DView& like) {
      DView t = like;
      t.p = static_cast<char*>(c.temp(like.n * esize(like.dt)));
      int64_t acc = 1;
      for (int d = 3; d >= 0; --d) t.st[d] = acc, acc *= like.shape[d];
      finish(t);
      return t;
    };
    const DView kk = dk ? *dk : scratch(k), vv = dv ? *dv : scratch(v);
    const size_t smem = (2 * s.T + 2 * s.hd) * 4;
    set_smem(reinterpret_cast<const void*>(&k_attn_dkv), smem);
    k_attn_dkv<<<rows, kAttnThreads, smem, c.stream>>>(a4(q), a4(k), a4(v), a4(dout), a4(kk), a4(vv), s, D);
    check_launch();
  }
}

// ---- embedding backward: deterministic scatter-add by sorting (index, position) pairs -------

__global__ void k_bitonic(unsigned long long* a, int64_t j, int64_t k, int64_t n) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= n) return;
  const int64_t l = i ^ j;
  if (l > i) {
    const bool up = (i & k) == 0;
    const unsigned long long x = a[i], y = a[l];
    if ((x > y) == up) {
      a[i] = y;
      a[l] = x;
    }
  }
}

__device__ int64_t lower_bound(const unsigned long long* a, int64_t n, unsigned long long key) {
  int64_t lo = 0, hi = n;
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (a[mid] < key) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

// dW[row, :] = sum of dOut[n, :] over positions n with idx[n] == row, in position order.
void embedding_bwd(Context& c, const DView& idx, const DView& dout, const DView& dw) {
  const int64_t N = idx.n, V = dw.shape[0];
  int64_t P = 1;
  while (P < N) P <<= 1;
  auto* keys = static_cast<unsigned long long*>(c.temp(P * 8));
  each(c, P, [=] __device__(int64_t i) {
    keys[i] = i < N ? (static_cast<unsigned long long>(ldi(idx, idx.off(i))) << 32) | static_cast<unsigned long long>(i)
                    : ~0ull;
  });
  const unsigned blocks = static_cast<unsigned>((P + kThreads - 1) / kThreads);
  for (int64_t k = 2; k <= P; k <<= 1) {
    for (int64_t j = k >> 1; j > 0; j >>= 1) {
      k_bitonic<<<blocks, kThreads, 0, c.stream>>>(keys, j, k, P);
      check_launch();
    }
  }
  const Rows g = rows_of(dout), w = rows_of(dw);
  per_row(c, V, [=] __device__(int64_t row, float*) {
    const int64_t lo = lower_bound(keys, N, static_cast<unsigned long long>(row) << 32);
    const int64_t hi = lower_bound(keys, N, static_cast<unsigned long long>(row + 1) << 32);
    for (int64_t col = threadIdx.x; col < w.cols; col += blockDim.x) {
      float acc = 0.f;
      for (int64_t s = lo; s < hi; ++s) {
        const int64_t n = static_cast<int64_t>(keys[s] & 0xffffffffull);
        acc += ld(dout, g.outer.off(n) + col * g.cs);
      }
      st(dw, w.outer.off(row) + col * w.cs, acc);
    }
  });
}

// ---- op groups -------------------------------------------------------------------------------

struct Args {
  const OpCall& call;
  const graph::Graph& g;
  const Op& op;   // the op called (backward, optimizer, ...)
  const Op& f;    // the op whose semantics run: itself, or the forward op of a recompute/backward

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

void layer_norm_fwd(Context& c, const DView& x, const DView& w, const DView& b, const DView& y, const DView& mean,
                    const DView& rstd, float eps) {
  const Rows xr = rows_of(x), yr = rows_of(y);
  per_row(c, xr.outer.n, [=] __device__(int64_t r, float* sh) {
    const int64_t xo = xr.outer.off(r), yo = yr.outer.off(r), n = xr.cols;
    float s = 0.f;
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) s += ld(x, xo + j * xr.cs);
    const float mu = block_sum(s, sh) / n;
    float v = 0.f;
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
      const float d = ld(x, xo + j * xr.cs) - mu;
      v += d * d;
    }
    const float rs = 1.f / sqrtf(block_sum(v, sh) / n + eps);
    if (threadIdx.x == 0) {
      st(mean, mean.off(r), mu);
      st(rstd, rstd.off(r), rs);
    }
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
      const float xh = (ld(x, xo + j * xr.cs) - mu) * rs;
      st(y, yo + j * yr.cs, xh * ld(w, w.off(j)) + ld(b, b.off(j)));
    }
  });
}

void layer_norm_bwd(Context& c, const Args& a) {
  const DView x = a.saved_in(0), w = a.saved_in(1), mean = a.saved_out(1), rstd = a.saved_out(2);
  const DView dy = view_of(*a.gin(0));
  const Rows xr = rows_of(x), gr = rows_of(dy);
  const int64_t rows = xr.outer.n, n = xr.cols;
  if (const TensorArg* t = a.gout(0)) {
    const DView dx = view_of(*t);
    const Rows dr = rows_of(dx);
    per_row(c, rows, [=] __device__(int64_t r, float* sh) {
      const int64_t xo = xr.outer.off(r), go = gr.outer.off(r), dxo = dr.outer.off(r);
      const float mu = ld(mean, mean.off(r)), rs = ld(rstd, rstd.off(r));
      float s1 = 0.f, s2 = 0.f;
      for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
        const float wdy = ld(w, w.off(j)) * ld(dy, go + j * gr.cs);
        s1 += wdy;
        s2 += wdy * (ld(x, xo + j * xr.cs) - mu) * rs;
      }
      s1 = block_sum(s1, sh);
      s2 = block_sum(s2, sh);
      for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
        const float wdy = ld(w, w.off(j)) * ld(dy, go + j * gr.cs);
        const float xh = (ld(x, xo + j * xr.cs) - mu) * rs;
        st(dx, dxo + j * dr.cs, rs * (wdy - s1 / n - xh * s2 / n));
      }
    });
  }
  if (const TensorArg* t = a.gout(1)) {
    const DView dw = view_of(*t);
    col_reduce(
        c, rows, n,
        [=] __device__(int64_t r, int64_t j) {
          const float xh = (ld(x, xr.outer.off(r) + j * xr.cs) - ld(mean, mean.off(r))) * ld(rstd, rstd.off(r));
          return ld(dy, gr.outer.off(r) + j * gr.cs) * xh;
        },
        [=] __device__(int64_t j, float s) { st(dw, dw.off(j), s); });
  }
  if (const TensorArg* t = a.gout(2)) {
    const DView db = view_of(*t);
    col_reduce(
        c, rows, n, [=] __device__(int64_t r, int64_t j) { return ld(dy, gr.outer.off(r) + j * gr.cs); },
        [=] __device__(int64_t j, float s) { st(db, db.off(j), s); });
  }
}

void softmax_fwd(Context& c, const DView& x, const DView& y, bool log) {
  const Rows xr = rows_of(x), yr = rows_of(y);
  per_row(c, xr.outer.n, [=] __device__(int64_t r, float* sh) {
    const int64_t xo = xr.outer.off(r), yo = yr.outer.off(r), n = xr.cols;
    float mx = -INFINITY;
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) mx = fmaxf(mx, ld(x, xo + j * xr.cs));
    mx = block_max(mx, sh);
    float s = 0.f;
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) s += expf(ld(x, xo + j * xr.cs) - mx);
    s = block_sum(s, sh);
    const float ls = logf(s);
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
      const float v = ld(x, xo + j * xr.cs) - mx;
      st(y, yo + j * yr.cs, log ? v - ls : expf(v) / s);
    }
  });
}

void softmax_bwd(Context& c, const DView& y, const DView& dy, const DView& dx, bool log) {
  const Rows yr = rows_of(y), gr = rows_of(dy), dr = rows_of(dx);
  per_row(c, yr.outer.n, [=] __device__(int64_t r, float* sh) {
    const int64_t yo = yr.outer.off(r), go = gr.outer.off(r), xo = dr.outer.off(r), n = yr.cols;
    float s = 0.f;
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
      const float g = ld(dy, go + j * gr.cs);
      s += log ? g : g * ld(y, yo + j * yr.cs);
    }
    s = block_sum(s, sh);
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
      const float g = ld(dy, go + j * gr.cs), yy = ld(y, yo + j * yr.cs);
      st(dx, xo + j * dr.cs, log ? g - expf(yy) * s : yy * (g - s));
    }
  });
}

void nll_fwd(Context& c, const DView& logp, const DView& target, const DView& loss, const DView& total) {
  const Rows lr = rows_of(logp);
  // One block: the whole sum in a fixed order.
  k_rows<<<1, 1024, 0, c.stream>>>(1, [=] __device__(int64_t, float* sh) {
    float s = 0.f, cnt = 0.f;
    for (int64_t i = threadIdx.x; i < lr.outer.n; i += blockDim.x) {
      const int64_t t = ldi(target, target.off(i));
      if (t < 0) continue;  // ignored targets (gpt2's ignore_index=-1, llama's -100)
      s += ld(logp, lr.outer.off(i) + t * lr.cs);
      cnt += 1.f;
    }
    s = block_sum(s, sh);
    cnt = block_sum(cnt, sh);
    if (threadIdx.x == 0) {
      st(loss, 0, -s / cnt);
      st(total, 0, cnt);
    }
  });
  check_launch();
}

// Fills dx for the backward op of a forward op (f) from the incoming gradient(s) and the saved tensors.
void run_backward(Context& c, const Args& a) {
  const Op& f = a.f;
  auto dy = [&]() { return view_of(*a.gin(0)); };
  switch (f.kind) {
    case OpKind::view: {
      const TensorArg* t = a.gout(0);
      if (!t) return;
      const DView dx = view_of(*t);
      switch (f.params.view) {
        case graph::ViewKind::reshape: copy_into(c, dx, dy()); return;
        case graph::ViewKind::expand: sum_to(c, dy(), dx); return;
        case graph::ViewKind::split:
        case graph::ViewKind::slice: {
          fill(c, dx, 0.f);
          const int d = f.params.dim0;
          for (size_t j = 0; j < f.outputs.size(); ++j) {
            const TensorArg* gj = a.gin(static_cast<int>(j));
            if (!gj) continue;
            const DView src = view_of(*gj);
            DView part = dx;
            const int64_t start = f.params.view == graph::ViewKind::split ? static_cast<int64_t>(j) * f.params.start
                                                                          : f.params.start;
            const int64_t step = f.params.view == graph::ViewKind::split ? 1 : f.params.step;
            part.p += start * dx.st[d] * esize(dx.dt);
            part.shape[d] = src.shape[d];
            part.st[d] *= step;
            finish(part);
            copy_into(c, part, src);
          }
          return;
        }
        default: unsupported("backward of view kind " + std::to_string(static_cast<int>(f.params.view)));
      }
    }
    case OpKind::copy: case OpKind::add_scalar: case OpKind::add: case OpKind::stack: return;  // pass-throughs, views
    case OpKind::sub:
      if (const TensorArg* t = a.gout(1)) {
        const DView dx = view_of(*t), g = bcast(dy(), dx);
        each(c, dx.n, [=] __device__(int64_t i) { st(dx, dx.off(i), -ld(g, g.off(i))); });
      }
      return;
    case OpKind::mul:
      for (int i = 0; i < 2; ++i) {
        const TensorArg* t = a.gout(i);
        if (!t) continue;
        const DView dx = view_of(*t), g = bcast(dy(), dx), o = bcast(a.saved_in(1 - i), dx);
        each(c, dx.n, [=] __device__(int64_t k) { st(dx, dx.off(k), ld(g, g.off(k)) * ld(o, o.off(k))); });
      }
      return;
    case OpKind::mul_scalar: case OpKind::div_scalar: {
      const TensorArg* t = a.gout(0);
      if (!t) return;
      const DView dx = view_of(*t), g = bcast(dy(), dx), s = a.saved_out(1);
      const bool div = f.kind == OpKind::div_scalar;
      each(c, dx.n, [=] __device__(int64_t i) {
        const float sv = ld(s, 0), gv = ld(g, g.off(i));
        st(dx, dx.off(i), div ? gv / sv : gv * sv);
      });
      return;
    }
    case OpKind::pow_scalar: {
      const TensorArg* t = a.gout(0);
      if (!t) return;
      const DView dx = view_of(*t), g = bcast(dy(), dx), x = a.saved_in(0);
      const float e = static_cast<float>(f.params.scalar);
      each(c, dx.n, [=] __device__(int64_t i) {
        const float xv = ld(x, x.off(i));
        const float d = e == 2.f ? 2.f * xv : e * powf(xv, e - 1.f);
        st(dx, dx.off(i), ld(g, g.off(i)) * d);
      });
      return;
    }
    case OpKind::rsqrt: {
      const TensorArg* t = a.gout(0);
      if (!t) return;
      const DView dx = view_of(*t), g = bcast(dy(), dx), y = a.saved_out(0);
      each(c, dx.n, [=] __device__(int64_t i) {
        const float yv = ld(y, y.off(i));
        st(dx, dx.off(i), -0.5f * ld(g, g.off(i)) * yv * yv * yv);
      });
      return;
    }
    case OpKind::mean_last: {
      const TensorArg* t = a.gout(0);
      if (!t) return;
      const DView dx = view_of(*t), g = bcast(dy(), dx);
      const float n = static_cast<float>(dx.rank ? dx.shape[dx.rank - 1] : 1);
      each(c, dx.n, [=] __device__(int64_t i) { st(dx, dx.off(i), ld(g, g.off(i)) / n); });
      return;
    }
    case OpKind::gelu_tanh: case OpKind::silu: {
      const TensorArg* t = a.gout(0);
      if (!t) return;
      const DView dx = view_of(*t), g = bcast(dy(), dx), x = a.saved_in(0);
      const bool gelu = f.kind == OpKind::gelu_tanh;
      each(c, dx.n, [=] __device__(int64_t i) {
        const float xv = ld(x, x.off(i));
        float d;
        if (gelu) {
          d = gelu_tanh_grad(xv);
        } else {
          const float s = sigmoid(xv);
          d = s * (1.f + xv * (1.f - s));
        }
        st(dx, dx.off(i), ld(g, g.off(i)) * d);
      });
      return;
    }
    case OpKind::softmax: case OpKind::log_softmax:
      if (const TensorArg* t = a.gout(0)) softmax_bwd(c, a.saved_out(0), dy(), view_of(*t), f.kind == OpKind::log_softmax);
      return;
    case OpKind::masked_fill: {
      const TensorArg* t = a.gout(0);
      if (!t) return;
      const DView dx = view_of(*t), g = bcast(dy(), dx), m = bcast(a.saved_in(1), dx);
      each(c, dx.n, [=] __device__(int64_t i) { st(dx, dx.off(i), ldi(m, m.off(i)) ? 0.f : ld(g, g.off(i))); });
      return;
    }
    case OpKind::native_dropout: {
      const TensorArg* t = a.gout(0);
      if (!t) return;
      const DView dx = view_of(*t), g = bcast(dy(), dx), m = a.saved_out(1);
      const float scale = static_cast<float>(1.0 / (1.0 - f.params.scalar));
      each(c, dx.n, [=] __device__(int64_t i) {
        st(dx, dx.off(i), ld(g, g.off(i)) * (ldi(m, m.off(i)) ? scale : 0.f));
      });
      return;
    }
    case OpKind::nll_loss: {
      const TensorArg* t = a.gout(0);
      if (!t) return;
      const DView dx = view_of(*t), target = a.saved_in(1), total = a.saved_out(1), g = dy();
      const Rows xr = rows_of(dx);
      each(c, dx.n, [=] __device__(int64_t i) {
        const int64_t r = i / xr.cols, col = i - r * xr.cols;
        const int64_t tg = ldi(target, target.off(r));
        const float v = (tg == col) ? -ld(g, g.off(0)) / ld(total, total.off(0)) : 0.f;
        st(dx, xr.outer.off(r) + col * xr.cs, v);
      });
      return;
    }
    case OpKind::embedding: case OpKind::index_rows:
      if (const TensorArg* t = a.gout(0)) embedding_bwd(c, a.saved_in(1), dy(), view_of(*t));
      return;
    case OpKind::mm: case OpKind::addmm: case OpKind::bmm: {
      const int base = f.kind == OpKind::addmm ? 1 : 0;
      const DView g = dy();
      if (const TensorArg* t = a.gout(base)) gemm(c, mat_of(g), tmat(a.saved_in(base + 1)), mat_of(view_of(*t)), 0.f);
      if (const TensorArg* t = a.gout(base + 1)) gemm(c, tmat(a.saved_in(base)), mat_of(g), mat_of(view_of(*t)), 0.f);
      return;  // addmm's bias gradient passes through (reduced by a sum_to op)
    }
    case OpKind::layer_norm: layer_norm_bwd(c, a); return;
    case OpKind::flash_attention: {
      const TensorArg *tq = a.gout(0), *tk = a.gout(1), *tv = a.gout(2);
      if (!tq && !tk && !tv) return;
      DView dq, dk, dv;
      if (tq) dq = view_of(*tq);
      if (tk) dk = view_of(*tk);
      if (tv) dv = view_of(*tv);
      attention_bwd(c, a.saved_in(0), a.saved_in(1), a.saved_in(2), a.saved_out(0), a.saved_out(1), dy(),
                    tq ? &dq : nullptr, tk ? &dk : nullptr, tv ? &dv : nullptr, f.params.scalar, a.call.seed);
      return;
    }
    default: unsupported("backward of " + std::string(graph::to_string(f.kind)));
  }
}

// step += 1, in its own launch so that the update kernel after it reads the new value everywhere.
void bump_step(Context& c, const DView& step) {
  each(c, 1, [=] __device__(int64_t) { st(step, 0, ld(step, 0) + 1.f); });
}

// Optimizer ops: in-place updates (inputs per graph::OptimStep) and temporaries.
void run_optim(Context& c, const Args& a) {
  const graph::OptimParams hp = a.op.params.optim;
  const double b1 = hp.beta1, b2 = hp.beta2, lr = hp.lr, wd = hp.weight_decay, eps = hp.eps;
  const bool decoupled = hp.decoupled;
  switch (hp.step) {
    case OptimStep::adam_moments: case OptimStep::adam_fused: {
      const DView p = a.in(0), g = a.in(1), m = a.in(2), v = a.in(3), step = a.in(4);
      bump_step(c, step);
      const bool fused = hp.step == OptimStep::adam_fused;
      each(c, p.n, [=] __device__(int64_t i) {
        float pv = ld(p, p.off(i)), gv = ld(g, g.off(i));
        if (wd != 0) {
          if (decoupled) pv = pv * static_cast<float>(1.0 - lr * wd);
          else gv = gv + static_cast<float>(wd) * pv;
        }
        const float mv = static_cast<float>(b1) * ld(m, m.off(i)) + static_cast<float>(1.0 - b1) * gv;
        const float vv = ld(v, v.off(i)) * static_cast<float>(b2) + static_cast<float>(1.0 - b2) * gv * gv;
        st(m, m.off(i), mv);
        st(v, v.off(i), vv);
        if (fused) {
          const double t = ld(step, 0);
          const float bc2s = static_cast<float>(sqrt(1.0 - pow(b2, t)));
          const float step_size = static_cast<float>(lr / (1.0 - pow(b1, t)));
          pv = pv - step_size * mv / (sqrtf(vv) / bc2s + static_cast<float>(eps));
        }
        st(p, p.off(i), pv);
      });
      return;
    }
    case OptimStep::adam_sqrt: {
      const DView v = a.in(0), step = a.in(1), o = a.out(0);
      const bool full = a.op.params.optim.full;
      each(c, o.n, [=] __device__(int64_t i) {
        float s = sqrtf(ld(v, v.off(i)));
        if (full) s = s / static_cast<float>(sqrt(1.0 - pow(b2, static_cast<double>(ld(step, 0))))) + static_cast<float>(eps);
        st(o, o.off(i), s);
      });
      return;
    }
    case OptimStep::adam_denom: {  // no output: in place on the input (2.x foreach's _foreach_div_/add_)
      const DView s = a.in(0), step = a.in(1), o = a.call.outputs.empty() ? a.in(0) : a.out(0);
      each(c, o.n, [=] __device__(int64_t i) {
        const float bc2s = static_cast<float>(sqrt(1.0 - pow(b2, static_cast<double>(ld(step, 0)))));
        st(o, o.off(i), ld(s, s.off(i)) / bc2s + static_cast<float>(eps));
      });
      return;
    }
    case OptimStep::adam_update: {
      const DView p = a.in(0), m = a.in(1), d = a.in(2), step = a.in(3);
      each(c, p.n, [=] __device__(int64_t i) {
        const float step_size = static_cast<float>(lr / (1.0 - pow(b1, static_cast<double>(ld(step, 0)))));
        st(p, p.off(i), ld(p, p.off(i)) + (-step_size) * ld(m, m.off(i)) / ld(d, d.off(i)));
      });
      return;
    }
    case OptimStep::sgd: {
      const DView p = a.in(0), g = a.in(1);
      each(c, p.n, [=] __device__(int64_t i) {
        const float pv = ld(p, p.off(i)), gv = ld(g, g.off(i)) + static_cast<float>(wd) * pv;
        st(p, p.off(i), pv + static_cast<float>(-lr) * gv);
      });
      return;
    }
    case OptimStep::sgd_momentum: {
      const DView p = a.in(0), g = a.in(1), buf = a.in(2);
      const float mom = static_cast<float>(hp.momentum);
      each(c, p.n, [=] __device__(int64_t i) {
        const float pv = ld(p, p.off(i)), gv = ld(g, g.off(i)) + static_cast<float>(wd) * pv;
        const float bv = ld(buf, buf.off(i)) * mom + gv;
        st(buf, buf.off(i), bv);
        st(p, p.off(i), pv + static_cast<float>(-lr) * bv);
      });
      return;
    }
    case OptimStep::none: unsupported("optimizer op without a step kind");
  }
}

void write_scalar(Context& c, const OpCall& call, double s) {
  // mul/div/add by a Python number also output the wrapped 0-dim float64 (saved for backward).
  if (call.outputs.size() < 2) return;
  const DView o = view_of(call.outputs[1]);
  each(c, 1, [=] __device__(int64_t) {
    if (o.dt == DType::f64) *reinterpret_cast<double*>(o.p) = s;  // keep the double exactly
    else st(o, 0, static_cast<float>(s));
  });
}

void run_forward(Context& c, const Args& a) {
  const OpCall& call = a.call;
  const Op& f = a.f;
  switch (f.kind) {
    case OpKind::view: case OpKind::zero_grad: case OpKind::rng_stash: return;
    case OpKind::arange: {
      const DView o = a.out(0);
      each(c, o.n, [=] __device__(int64_t i) { sti(o, o.off(i), i); });
      return;
    }
    case OpKind::ones: fill(c, a.out(0), 1.f); return;
    case OpKind::grad_seed: fill(c, a.out(0), 1.f); return;
    case OpKind::triu: {
      const DView x = a.in(0), o = a.out(0);
      const int64_t diag = f.params.start, cols = o.shape[o.rank - 1], rows = o.shape[o.rank - 2];
      each(c, o.n, [=] __device__(int64_t i) {
        const int64_t j = i % cols, r = (i / cols) % rows;
        st(o, o.off(i), j - r >= diag ? ld(x, x.off(i)) : 0.f);
      });
      return;
    }
    case OpKind::eq_scalar: {
      const DView x = a.in(0), o = a.out(0);
      const float v = static_cast<float>(f.params.scalar);
      each(c, o.n, [=] __device__(int64_t i) { st(o, o.off(i), ld(x, x.off(i)) == v ? 1.f : 0.f); });
      return;
    }
    case OpKind::embedding: case OpKind::index_rows: {
      const DView t = a.in(0), idx = a.in(1), o = a.out(0);
      const Rows orr = rows_of(o);
      const int64_t d = orr.cols, ts0 = t.st[0], ts1 = t.st[1];
      const int esz = static_cast<int>(esize(o.dt));
      each(c, o.n, [=] __device__(int64_t i) {
        const int64_t n = i / d, col = i - n * d;
        const int64_t row = ldi(idx, idx.off(n));
        cp(o, orr.outer.off(n) + col * orr.cs, t, row * ts0 + col * ts1, esz);
      });
      return;
    }
    case OpKind::copy: copy_into(c, a.out(0), a.in(0)); return;
    case OpKind::stack: {
      const DView x0 = a.in(0), x1 = a.in(1), o = a.out(0);
      const int esz = static_cast<int>(esize(o.dt));
      each(c, o.n, [=] __device__(int64_t i) {
        const int64_t n = i >> 1;
        if (i & 1) cp(o, o.off(i), x1, x1.off(n), esz);
        else cp(o, o.off(i), x0, x0.off(n), esz);
      });
      return;
    }
    case OpKind::add: case OpKind::sub: case OpKind::mul: case OpKind::accumulate: {
      // accumulate: out = buf + grad, or buf += grad in place when it has no outputs.
      const DView o = call.outputs.empty() ? a.in(0) : a.out(0);
      const DView x = bcast(a.in(0), o), y = bcast(a.in(1), o);
      const int k = f.kind == OpKind::sub ? 1 : f.kind == OpKind::mul ? 2 : 0;
      each(c, o.n, [=] __device__(int64_t i) {
        const float u = ld(x, x.off(i)), v = ld(y, y.off(i));
        st(o, o.off(i), k == 0 ? u + v : k == 1 ? u - v : u * v);
      });
      return;
    }
    case OpKind::mul_scalar: case OpKind::div_scalar: case OpKind::add_scalar: case OpKind::pow_scalar: {
      const DView x = a.in(0), o = a.out(0);
      const double s = f.params.scalar;
      const float sf = static_cast<float>(s);
      const int k = f.kind == OpKind::mul_scalar ? 0 : f.kind == OpKind::div_scalar ? 1 : f.kind == OpKind::add_scalar ? 2 : 3;
      each(c, o.n, [=] __device__(int64_t i) {
        const float u = ld(x, x.off(i));
        st(o, o.off(i), k == 0 ? u * sf : k == 1 ? u / sf : k == 2 ? u + sf : (sf == 2.f ? u * u : powf(u, sf)));
      });
      if (f.kind != OpKind::pow_scalar) write_scalar(c, call, s);
      return;
    }
    case OpKind::rsqrt: {
      const DView x = a.in(0), o = a.out(0);
      each(c, o.n, [=] __device__(int64_t i) { st(o, o.off(i), 1.f / sqrtf(ld(x, x.off(i)))); });
      return;
    }
    case OpKind::gelu_tanh: case OpKind::silu: {
      const DView x = a.in(0), o = a.out(0);
      const bool gelu = f.kind == OpKind::gelu_tanh;
      each(c, o.n, [=] __device__(int64_t i) {
        const float u = ld(x, x.off(i));
        st(o, o.off(i), gelu ? gelu_tanh(u) : u / (1.f + expf(-u)));
      });
      return;
    }
    case OpKind::mean_last: {
      const DView x = a.in(0), o = a.out(0);
      const Rows xr = rows_of(x);
      per_row(c, xr.outer.n, [=] __device__(int64_t r, float* sh) {
        float s = 0.f;
        const int64_t xo = xr.outer.off(r);
        for (int64_t j = threadIdx.x; j < xr.cols; j += blockDim.x) s += ld(x, xo + j * xr.cs);
        s = block_sum(s, sh);
        if (threadIdx.x == 0) st(o, o.off(r), s / xr.cols);
      });
      return;
    }
    case OpKind::mm: gemm(c, mat_of(a.in(0)), mat_of(a.in(1)), mat_of(a.out(0)), 0.f); return;
    case OpKind::bmm: gemm(c, mat_of(a.in(0)), mat_of(a.in(1)), mat_of(a.out(0)), 0.f); return;
    case OpKind::addmm: {
      const DView o = a.out(0), b = bcast(a.in(0), o);
      const int esz = static_cast<int>(esize(o.dt));
      each(c, o.n, [=] __device__(int64_t i) { cp(o, o.off(i), b, b.off(i), esz); });
      gemm(c, mat_of(a.in(1)), mat_of(a.in(2)), mat_of(o), 1.f);
      return;
    }
    case OpKind::layer_norm:
      layer_norm_fwd(c, a.in(0), a.in(1), a.in(2), a.out(0), a.out(1), a.out(2), static_cast<float>(f.params.scalar));
      return;
    case OpKind::softmax: softmax_fwd(c, a.in(0), a.out(0), false); return;
    case OpKind::log_softmax: softmax_fwd(c, a.in(0), a.out(0), true); return;
    case OpKind::masked_fill: {
      const DView o = a.out(0), x = bcast(a.in(0), o), m = bcast(a.in(1), o);
      const float v = static_cast<float>(f.params.scalar);
      each(c, o.n, [=] __device__(int64_t i) { st(o, o.off(i), ldi(m, m.off(i)) ? v : ld(x, x.off(i))); });
      return;
    }
    case OpKind::dropout_noise: {
      const DView o = a.out(0);
      const double p = f.params.scalar;
      const float scale = static_cast<float>(1.0 / (1.0 - p));
      const uint64_t seed = call.seed;
      each(c, o.n, [=] __device__(int64_t i) { st(o, o.off(i), rng_keep(seed, i, p) ? scale : 0.f); });
      return;
    }
    case OpKind::native_dropout: {
      const DView x = a.in(0), o = a.out(0), m = a.out(1);
      const double p = f.params.scalar;
      const float scale = static_cast<float>(1.0 / (1.0 - p));
      const uint64_t seed = call.seed;
      each(c, o.n, [=] __device__(int64_t i) {
        const bool keep = rng_keep(seed, i, p);
        st(m, m.off(i), keep ? 1.f : 0.f);
        st(o, o.off(i), keep ? ld(x, x.off(i)) * scale : 0.f);
      });
      return;
    }
    case OpKind::flash_attention:
      attention_fwd(c, a.in(0), a.in(1), a.in(2), a.out(0), a.out(1), f.params.scalar, call.seed);
      return;
    case OpKind::nll_loss: nll_fwd(c, a.in(0), a.in(1), a.out(0), a.out(1)); return;
    case OpKind::sum_to: sum_to(c, a.in(0), a.out(0)); return;
    default: unsupported("op kind " + std::string(graph::to_string(f.kind)));
  }
}

bool has_f64_data(const OpCall& call) {
  // fp64 is the CPU backend's checking dtype; here only 0-dim wrapped scalars may be fp64.
  auto big64 = [](const TensorArg& t) { return t.dtype == DType::f64 && graph::numel(t.shape) > 1; };
  for (const auto* v : {&call.inputs, &call.outputs, &call.grad_outputs}) {
    for (const TensorArg& t : *v) {
      if (big64(t)) return true;
    }
  }
  return false;
}

}  // namespace

void run_op(Context& c, const OpCall& call) {
  ACTSIM_ASSERT(call.graph != nullptr, "OpCall without a graph");
  const graph::Graph& g = *call.graph;
  const Op& op = g.op(call.op);
  if (has_f64_data(call)) unsupported("fp64 tensors (use --backend cpu for fp64 checks)");
  switch (op.kind) {
    case OpKind::backward: run_backward(c, Args{call, g, op, g.op(op.forward)}); break;
    case OpKind::recompute: run_forward(c, Args{call, g, op, g.op(op.forward)}); break;
    case OpKind::optim_update: case OpKind::optim_temp: run_optim(c, Args{call, g, op, op}); break;
    default: run_forward(c, Args{call, g, op, op}); break;
  }
}

}  // namespace actsim::backends::cuda
