// CUDA attention: causal, scale 1/sqrt(hd), optional dropout on the probabilities; forward and
// backward (flash-style, one query or key row per block, log-sum-exp saved).
#include "cuda_common.cuh"

namespace actsim::backends::cuda {

namespace {

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

}  // namespace

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

}  // namespace actsim::backends::cuda
