// CUDA kernels of the backward ops: one case per forward op kind (docs/kernels.md).
#include "cuda_common.cuh"

namespace actsim::backends::cuda {

namespace {

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

}  // namespace

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

}  // namespace actsim::backends::cuda
