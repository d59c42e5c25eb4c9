// CPU reference kernels of the backward ops and of sum_to (docs/kernels.md, "Backward ops").
#include <fmt/format.h>

#include <cmath>

#include "cpu_kernels.hpp"
#include "cpu_tensor.hpp"
#include "actsim/util/rng.hpp"

namespace actsim::backends::cpu {

using util::rng_keep;

using graph::OpKind;
using graph::TensorId;
using graph::ViewKind;

template <class A>
std::vector<A> sum_to(const std::vector<A>& g, const Shape& gshape, const Shape& rshape) {
  if (rshape.size() > gshape.size()) throw std::runtime_error("cpu backend: sum_to to a higher rank");
  // Walk g in logical order; the matching element of r has stride 0 along the summed dims.
  const size_t lead = gshape.size() - rshape.size();
  const Strides rc = graph::contiguous_strides(rshape);
  Strides st(gshape.size(), 0);
  for (size_t i = 0; i < rshape.size(); ++i) {
    if (rshape[i] == gshape[lead + i]) st[lead + i] = rc[i];
    else if (rshape[i] != 1) throw std::runtime_error("cpu backend: sum_to shapes do not match");
  }
  std::vector<A> r(static_cast<size_t>(graph::numel(rshape)), A(0));
  size_t i = 0;
  for_each_offset(gshape, st, 0, [&](int64_t o) { r[o] += g[i++]; });
  return r;
}

namespace {

// The tensors of one backward call, looked up by their role in the forward op.
struct Bwd {
  const OpCall& c;
  const graph::Graph& g;
  const graph::Op& op;  // the backward op
  const graph::Op& f;   // the forward op

  // Incoming gradient of forward output j, or nullptr (zero).
  const TensorArg* grad_in(size_t j) const {
    for (int k = 0; k < op.n_grad_inputs; ++k) {
      if (static_cast<size_t>(op.grad_in_of[k]) == j) return &c.inputs.at(k);
    }
    return nullptr;
  }
  const TensorArg* saved(TensorId t) const {
    for (size_t k = 0; k < f.saved.size(); ++k) {
      if (f.saved[k] == t) return &c.inputs.at(op.n_grad_inputs + k);
    }
    return nullptr;
  }
  const TensorArg* saved_in(size_t i) const { return i < f.inputs.size() ? saved(f.inputs[i]) : nullptr; }
  const TensorArg* saved_out(size_t j) const { return j < f.outputs.size() ? saved(f.outputs[j]) : nullptr; }
  const TensorArg& need_in(size_t i) const {
    if (const TensorArg* t = saved_in(i)) return *t;
    throw std::runtime_error(fmt::format("cpu backend: backward of {} needs its saved input {}", f.name, i));
  }
  const TensorArg& need_out(size_t j) const {
    if (const TensorArg* t = saved_out(j)) return *t;
    throw std::runtime_error(fmt::format("cpu backend: backward of {} needs its saved output {}", f.name, j));
  }
  // The gradient buffer of forward input i to write, or nullptr when there is none or it is a
  // view / pass-through of an incoming gradient (nothing to compute).
  const TensorArg* out(size_t i) const {
    for (size_t k = 0; k < op.grad_outputs.size(); ++k) {
      if (static_cast<size_t>(op.grad_of[k]) != i) continue;
      const TensorId t = op.grad_outputs[k];
      if (g.tensor(t).is_view) return nullptr;
      for (TensorId in : op.inputs) {
        if (in == t) return nullptr;
      }
      return &c.grad_outputs.at(k);
    }
    return nullptr;
  }
  const TensorArg& g0() const {
    if (const TensorArg* t = grad_in(0)) return *t;
    throw std::runtime_error(fmt::format("cpu backend: backward of {} has no gradient for output 0", f.name));
  }
};

int64_t last_dim(const TensorArg& t) { return t.shape.empty() ? 1 : t.shape.back(); }

template <class A>
std::vector<A> zeros(const TensorArg& t) {
  return std::vector<A>(static_cast<size_t>(numel(t)), A(0));
}

template <class A>
void view_backward(const Bwd& b) {
  const TensorArg* dx = b.out(0);
  if (!dx) return;
  const graph::OpParams& p = b.f.params;
  switch (p.view) {
    case ViewKind::reshape:
    case ViewKind::transpose:
    case ViewKind::unsqueeze:
      // A copy (reshape of a gradient that cannot be viewed): same elements in logical order.
      return store(*dx, load<A>(b.g0()));
    case ViewKind::expand: {
      const TensorArg& g = b.g0();
      return store(*dx, sum_to(load<A>(g), g.shape, dx->shape));
    }
    case ViewKind::split: {
      store(*dx, zeros<A>(*dx));
      for (int k = 0; k < b.op.n_grad_inputs; ++k) {
        const TensorArg& gk = b.c.inputs.at(k);
        TensorArg sub = *dx;
        sub.shape[p.dim0] = gk.shape.at(p.dim0);
        sub.offset += b.op.grad_in_of[k] * p.start * dx->strides[p.dim0];
        store(sub, load<A>(gk));
      }
      return;
    }
    case ViewKind::slice:
    case ViewKind::select: {
      const TensorArg& g = b.g0();
      store(*dx, zeros<A>(*dx));
      TensorArg sub = *dx;
      if (p.view == ViewKind::select) {
        sub.shape.erase(sub.shape.begin() + p.dim0);
        sub.strides.erase(sub.strides.begin() + p.dim0);
        sub.offset += p.start * dx->strides[p.dim0];
      } else {
        sub.shape[p.dim0] = g.shape.at(p.dim0);
        sub.strides[p.dim0] *= p.step;
        sub.offset += p.start * dx->strides[p.dim0];
      }
      return store(sub, load<A>(g));
    }
    case ViewKind::none: break;
  }
  throw std::runtime_error("cpu backend: view backward without a view kind: " + b.f.name);
}

template <class A>
void layer_norm_backward(const Bwd& b) {
  const TensorArg& ga = b.g0();
  const TensorArg& xa = b.need_in(0);
  const int64_t n = last_dim(xa);
  const std::vector<A> g = load<A>(ga), x = load<A>(xa);
  const std::vector<A> mean = load<A>(b.need_out(1)), rstd = load<A>(b.need_out(2));
  std::vector<A> w(static_cast<size_t>(n), A(1));
  if (const TensorArg* wa = b.saved_in(1)) w = load<A>(*wa);
  const int64_t rows = n == 0 ? 0 : static_cast<int64_t>(x.size()) / n;
  std::vector<A> dx(x.size()), dw(static_cast<size_t>(n), A(0)), db(static_cast<size_t>(n), A(0));
  std::vector<A> xhat(static_cast<size_t>(n)), gxhat(static_cast<size_t>(n));
  for (int64_t r = 0; r < rows; ++r) {
    A s1 = 0, s2 = 0;
    for (int64_t j = 0; j < n; ++j) {
      xhat[j] = (x[r * n + j] - mean[r]) * rstd[r];
      gxhat[j] = g[r * n + j] * w[j];
      s1 += gxhat[j];
      s2 += gxhat[j] * xhat[j];
      dw[j] += g[r * n + j] * xhat[j];
      db[j] += g[r * n + j];
    }
    const A m1 = s1 / static_cast<A>(n), m2 = s2 / static_cast<A>(n);
    for (int64_t j = 0; j < n; ++j) dx[r * n + j] = rstd[r] * (gxhat[j] - m1 - xhat[j] * m2);
  }
  if (const TensorArg* o = b.out(0)) store(*o, dx);
  if (const TensorArg* o = b.out(1)) store(*o, dw);
  if (const TensorArg* o = b.out(2)) store(*o, db);
}

template <class A>
void flash_attention_backward(const Bwd& b) {
  const TensorArg &qa = b.need_in(0), &ka = b.need_in(1), &va = b.need_in(2);
  const int64_t B = qa.shape[0], H = qa.shape[1], T = qa.shape[2], D = qa.shape[3], Tk = ka.shape[2];
  const int64_t Hk = ka.shape.at(1);  // grouped key/value heads: dk and dv sum over each group
  const double p = b.f.params.scalar;
  const std::vector<A> q = load<A>(qa), k = load<A>(ka), v = load<A>(va);
  const std::vector<A> o = load<A>(b.need_out(0)), lse = load<A>(b.need_out(1)), dO = load<A>(b.g0());
  std::vector<A> dq(q.size(), A(0)), dk(k.size(), A(0)), dv(v.size(), A(0));
  const A scale = static_cast<A>(1.0 / std::sqrt(static_cast<double>(D)));
  const A zscale = static_cast<A>(p > 0 ? 1.0 / (1.0 - p) : 1.0);
  for (int64_t bh = 0; bh < B * H; ++bh) {
    const A* qb = q.data() + bh * T * D;
    const int64_t kvh = (bh / H) * Hk + (bh % H) / (H / Hk);
    const A* kb = k.data() + kvh * Tk * D;
    const A* vb = v.data() + kvh * Tk * D;
    const A* ob = o.data() + bh * T * D;
    const A* gb = dO.data() + bh * T * D;
    A* dqb = dq.data() + bh * T * D;
    A* dkb = dk.data() + kvh * Tk * D;
    A* dvb = dv.data() + kvh * Tk * D;
    for (int64_t i = 0; i < T; ++i) {
      const int64_t nj = std::min(i + 1, Tk);
      A di = 0;
      for (int64_t e = 0; e < D; ++e) di += gb[i * D + e] * ob[i * D + e];
      for (int64_t j = 0; j < nj; ++j) {
        A s = 0;
        for (int64_t e = 0; e < D; ++e) s += qb[i * D + e] * kb[j * D + e];
        const A pij = std::exp(s * scale - lse[bh * T + i]);
        A z = 1;
        if (p > 0) z = rng_keep(b.c.seed, static_cast<uint64_t>((bh * T + i) * Tk + j), p) ? zscale : A(0);
        A dp = 0;
        for (int64_t e = 0; e < D; ++e) dp += gb[i * D + e] * vb[j * D + e];
        const A pz = pij * z;
        for (int64_t e = 0; e < D; ++e) dvb[j * D + e] += pz * gb[i * D + e];
        const A ds = pij * (dp * z - di) * scale;
        for (int64_t e = 0; e < D; ++e) {
          dqb[i * D + e] += ds * kb[j * D + e];
          dkb[j * D + e] += ds * qb[i * D + e];
        }
      }
    }
  }
  if (const TensorArg* t = b.out(0)) store(*t, dq);
  if (const TensorArg* t = b.out(1)) store(*t, dk);
  if (const TensorArg* t = b.out(2)) store(*t, dv);
}

// Scalar operand of mul_scalar / div_scalar: the saved wrapped 0-dim float64 tensor, so that a
// poisoned scalar shows in the result; params.scalar when the profile saved nothing.
template <class A>
A saved_scalar(const Bwd& b) {
  if (const TensorArg* t = b.saved_out(1)) return load<A>(*t).at(0);
  return static_cast<A>(b.f.params.scalar);
}

template <class A, class F>
void elementwise_dx(const Bwd& b, F f) {
  const TensorArg* dx = b.out(0);
  if (!dx) return;
  std::vector<A> g = load<A>(b.g0());
  f(g);
  store(*dx, g);
}

}  // namespace

template <class A>
void run_backward(const OpCall& c, const graph::Op& op) {
  const graph::Graph& gr = *c.graph;
  const graph::Op& f = gr.op(op.forward);
  const Bwd b{c, gr, op, f};
  switch (f.kind) {
    case OpKind::view: return view_backward<A>(b);
    case OpKind::copy:
    case OpKind::add_scalar:
    case OpKind::add:
      // Pass-throughs; written only if the graph gave them their own buffer.
      for (size_t i = 0; i < f.inputs.size(); ++i) {
        if (const TensorArg* dx = b.out(i)) store(*dx, load<A>(b.g0()));
      }
      return;
    case OpKind::sub:
      if (const TensorArg* dx = b.out(0)) store(*dx, load<A>(b.g0()));
      if (const TensorArg* dy = b.out(1)) {
        std::vector<A> g = load<A>(b.g0());
        for (A& v : g) v = -v;
        store(*dy, g);
      }
      return;
    case OpKind::mul: {
      const TensorArg& ga = b.g0();
      for (size_t i = 0; i < 2; ++i) {
        const TensorArg* dx = b.out(i);
        if (!dx) continue;
        std::vector<A> g = load<A>(ga);
        const std::vector<A> other = load<A>(broadcast_to(b.need_in(1 - i), ga.shape));
        for (size_t e = 0; e < g.size(); ++e) g[e] *= other[e];
        store(*dx, g);
      }
      return;
    }
    case OpKind::mul_scalar: {
      const A s = saved_scalar<A>(b);
      return elementwise_dx<A>(b, [s](std::vector<A>& g) { for (A& v : g) v *= s; });
    }
    case OpKind::div_scalar: {
      const A s = saved_scalar<A>(b);
      return elementwise_dx<A>(b, [s](std::vector<A>& g) { for (A& v : g) v /= s; });
    }
    case OpKind::pow_scalar: {
      if (!b.out(0)) return;
      const std::vector<A> x = load<A>(b.need_in(0));
      const double e = f.params.scalar;
      return elementwise_dx<A>(b, [&](std::vector<A>& g) {
        for (size_t i = 0; i < g.size(); ++i) {
          g[i] = e == 2.0 ? g[i] * (A(2) * x[i]) : g[i] * static_cast<A>(e) * std::pow(x[i], static_cast<A>(e - 1));
        }
      });
    }
    case OpKind::rsqrt: {
      if (!b.out(0)) return;
      const std::vector<A> y = load<A>(b.need_out(0));
      return elementwise_dx<A>(b, [&](std::vector<A>& g) {
        for (size_t i = 0; i < g.size(); ++i) g[i] = A(-0.5) * g[i] * y[i] * y[i] * y[i];
      });
    }
    case OpKind::mean_last: {
      const TensorArg* dx = b.out(0);
      if (!dx) return;
      const std::vector<A> g = load<A>(b.g0());
      const int64_t n = last_dim(*dx);
      std::vector<A> o(static_cast<size_t>(numel(*dx)));
      for (size_t i = 0; i < o.size(); ++i) o[i] = g[i / static_cast<size_t>(n)] / static_cast<A>(n);
      return store(*dx, o);
    }
    case OpKind::mm:
    case OpKind::addmm:
    case OpKind::bmm: {
      const size_t a = f.kind == OpKind::addmm ? 1 : 0;
      const TensorArg& g = b.g0();
      const size_t r = g.shape.size();
      if (const TensorArg* dbias = b.out(0); dbias && f.kind == OpKind::addmm) {
        store(*dbias, sum_to(load<A>(g), g.shape, dbias->shape));
      }
      if (const TensorArg* d1 = b.out(a)) matmul<A>(g, transposed(b.need_in(a + 1), r - 2, r - 1), *d1, nullptr);
      if (const TensorArg* d2 = b.out(a + 1)) matmul<A>(transposed(b.need_in(a), r - 2, r - 1), g, *d2, nullptr);
      return;
    }
    case OpKind::layer_norm: return layer_norm_backward<A>(b);
    case OpKind::gelu_tanh: {
      if (!b.out(0)) return;
      const std::vector<A> x = load<A>(b.need_in(0));
      return elementwise_dx<A>(b, [&](std::vector<A>& g) {
        const A kBeta = static_cast<A>(M_SQRT2 * M_2_SQRTPI * 0.5), kKappa = static_cast<A>(0.044715);
        for (size_t i = 0; i < g.size(); ++i) {
          const A xi = x[i], x_sq = xi * xi, x_cube = x_sq * xi;
          const A t = std::tanh(kBeta * (xi + kKappa * x_cube));
          const A left = A(0.5) * xi, right = A(1) + t;
          const A left_d = A(0.5) * right;
          const A right_d = left * (A(1) - t * t) * kBeta * (A(1) + A(3) * kKappa * x_sq);
          g[i] = g[i] * (left_d + right_d);
        }
      });
    }
    case OpKind::silu: {
      if (!b.out(0)) return;
      const std::vector<A> x = load<A>(b.need_in(0));
      return elementwise_dx<A>(b, [&](std::vector<A>& g) {
        for (size_t i = 0; i < g.size(); ++i) {
          const A s = A(1) / (A(1) + std::exp(-x[i]));
          g[i] = g[i] * s * (A(1) + x[i] * (A(1) - s));
        }
      });
    }
    case OpKind::softmax:
    case OpKind::log_softmax: {
      const TensorArg* dx = b.out(0);
      if (!dx) return;
      const std::vector<A> y = load<A>(b.need_out(0));
      std::vector<A> g = load<A>(b.g0());
      const int64_t n = last_dim(*dx);
      const int64_t rows = n == 0 ? 0 : static_cast<int64_t>(g.size()) / n;
      const bool log = f.kind == OpKind::log_softmax;
      for (int64_t r = 0; r < rows; ++r) {
        A* gp = g.data() + r * n;
        const A* yp = y.data() + r * n;
        A s = 0;
        for (int64_t j = 0; j < n; ++j) s += log ? gp[j] : gp[j] * yp[j];
        for (int64_t j = 0; j < n; ++j) gp[j] = log ? gp[j] - std::exp(yp[j]) * s : yp[j] * (gp[j] - s);
      }
      return store(*dx, g);
    }
    case OpKind::masked_fill: {
      if (!b.out(0)) return;
      const std::vector<uint8_t> m = load_mask(broadcast_to(b.need_in(1), b.g0().shape));
      return elementwise_dx<A>(b, [&](std::vector<A>& g) {
        for (size_t i = 0; i < g.size(); ++i) {
          if (m[i]) g[i] = 0;
        }
      });
    }
    case OpKind::native_dropout: {
      if (!b.out(0)) return;
      const std::vector<uint8_t> m = load_mask(b.need_out(1));
      const A scale = static_cast<A>(1.0 / (1.0 - f.params.scalar));
      return elementwise_dx<A>(b, [&](std::vector<A>& g) {
        for (size_t i = 0; i < g.size(); ++i) g[i] = m[i] ? g[i] * scale : A(0);
      });
    }
    case OpKind::embedding:
    case OpKind::index_rows: {
      const TensorArg* dw = b.out(0);
      if (!dw) return;
      const int64_t V = dw->shape.at(0), d = dw->shape.at(1);
      const std::vector<int64_t> idx = load_index(b.need_in(1));
      const std::vector<A> g = load<A>(b.g0());
      std::vector<A> o(static_cast<size_t>(V * d), A(0));
      for (size_t n = 0; n < idx.size(); ++n) {
        if (idx[n] < 0 || idx[n] >= V) throw std::runtime_error(fmt::format("cpu backend: index {} out of range", idx[n]));
        for (int64_t e = 0; e < d; ++e) o[idx[n] * d + e] += g[n * d + e];
      }
      return store(*dw, o);
    }
    case OpKind::stack: {
      // Views of the gradient, unless given their own buffers.
      const TensorArg& g = b.g0();
      for (size_t i = 0; i < 2; ++i) {
        if (const TensorArg* dx = b.out(i)) {
          TensorArg sub = g;
          sub.offset += static_cast<int64_t>(i) * sub.strides.back();
          sub.shape.pop_back();
          sub.strides.pop_back();
          store(*dx, load<A>(sub));
        }
      }
      return;
    }
    case OpKind::flash_attention: return flash_attention_backward<A>(b);
    // Hugging Face transformers' decoders.
    case OpKind::neg:  // NegBackward0: -grad
      return elementwise_dx<A>(b, [](std::vector<A>& g) { for (A& v : g) v = -v; });
    case OpKind::tanh: {  // TanhBackward0: grad * (1 - y^2)
      if (!b.out(0)) return;
      const std::vector<A> y = load<A>(b.need_out(0));
      return elementwise_dx<A>(b, [&](std::vector<A>& g) {
        for (size_t i = 0; i < g.size(); ++i) g[i] *= A(1) - y[i] * y[i];
      });
    }
    case OpKind::cast:  // ToCopyBackward0: the gradient in the input's dtype (store rounds)
      return elementwise_dx<A>(b, [](std::vector<A>&) {});
    case OpKind::cat: {  // CatBackward0: narrows of the gradient (views unless given buffers)
      const TensorArg& g = b.g0();
      const size_t dim = static_cast<size_t>(f.params.dim0);
      int64_t off = 0;
      for (size_t i = 0; i < f.inputs.size(); ++i) {
        const int64_t n = gr.tensor(f.inputs[i]).shape.at(dim);
        if (const TensorArg* dx = b.out(i)) {
          TensorArg sub = g;
          sub.shape[dim] = n;
          sub.offset += off * sub.strides[dim];
          store(*dx, load<A>(sub));
        }
        off += n;
      }
      return;
    }
    case OpKind::nll_loss: {
      const TensorArg* dx = b.out(0);
      if (!dx) return;
      const int64_t V = last_dim(*dx);
      const std::vector<int64_t> t = load_index(b.need_in(1));
      const A g = load<A>(b.g0()).at(0);
      const A tw = load<A>(b.need_out(1)).at(0);
      std::vector<A> o(static_cast<size_t>(numel(*dx)), A(0));
      for (size_t i = 0; i < t.size(); ++i) {
        if (t[i] < 0) continue;
        if (t[i] >= V) throw std::runtime_error(fmt::format("cpu backend: nll_loss target {} out of range", t[i]));
        o[i * V + t[i]] = -g / tw;
      }
      return store(*dx, o);
    }
    default:
      throw std::runtime_error(fmt::format("cpu backend: no backward kernel for {} ({})", graph::to_string(f.kind), f.name));
  }
}

template std::vector<float> sum_to<float>(const std::vector<float>&, const Shape&, const Shape&);
template std::vector<double> sum_to<double>(const std::vector<double>&, const Shape&, const Shape&);
template void run_backward<float>(const OpCall&, const graph::Op&);
template void run_backward<double>(const OpCall&, const graph::Op&);

}  // namespace actsim::backends::cpu
