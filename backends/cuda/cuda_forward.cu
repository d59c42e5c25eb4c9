// CUDA kernels of the forward op kinds (and of recompute ops, which run their forward op).
#include "cuda_common.cuh"

namespace actsim::backends::cuda {

namespace {

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
void write_scalar(Context& c, const OpCall& call, double s) {
  // mul/div/add by a Python number also output the wrapped 0-dim float64 (saved for backward).
  if (call.outputs.size() < 2) return;
  const DView o = view_of(call.outputs[1]);
  each(c, 1, [=] __device__(int64_t) {
    if (o.dt == DType::f64) *reinterpret_cast<double*>(o.p) = s;  // keep the double exactly
    else st(o, 0, static_cast<float>(s));
  });
}

}  // namespace

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

}  // namespace actsim::backends::cuda
