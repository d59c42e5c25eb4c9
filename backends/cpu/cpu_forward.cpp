// CPU reference kernels of the forward op kinds (docs/kernels.md, "Forward ops").
#include <fmt/format.h>

#include <cmath>
#include <limits>

#include "cpu_kernels.hpp"
#include "cpu_tensor.hpp"
#include "actsim/util/rng.hpp"

namespace actsim::backends::cpu {

using util::rng_keep;

using graph::OpKind;

template <class A>
void matmul(const TensorArg& a, const TensorArg& b, const TensorArg& out, const TensorArg* bias) {
  const size_t r = a.shape.size();
  if (r != b.shape.size() || r != out.shape.size() || (r != 2 && r != 3)) {
    throw std::runtime_error("cpu backend: matmul operands must both be rank 2 or rank 3");
  }
  const int64_t nb = r == 3 ? a.shape[0] : 1;
  const int64_t m = a.shape[r - 2], k = a.shape[r - 1], n = b.shape[r - 1];
  if (b.shape[r - 2] != k || out.shape[r - 2] != m || out.shape[r - 1] != n || (r == 3 && b.shape[0] != nb)) {
    throw std::runtime_error("cpu backend: matmul shapes do not match");
  }
  const std::vector<A> av = load<A>(a), bv = load<A>(b);
  std::vector<A> ov(static_cast<size_t>(nb * m * n), A(0));
  for (int64_t s = 0; s < nb; ++s) {
    const A* ap = av.data() + s * m * k;
    const A* bp = bv.data() + s * k * n;
    A* op = ov.data() + s * m * n;
    // Column blocks, then i, p, j: each out[i][j] still sums over p in ascending order (fixed,
    // the same result as the plain triple loop), the inner loop runs over contiguous rows, and
    // a block of out stays in cache while p sweeps (lm_head has n = vocab).
    constexpr int64_t kBlock = 256;  // columns: 1 KiB of a float row
    for (int64_t j0 = 0; j0 < n; j0 += kBlock) {
      const int64_t j1 = std::min(n, j0 + kBlock);
      for (int64_t i = 0; i < m; ++i) {
        A* orow = op + i * n;
        for (int64_t p = 0; p < k; ++p) {
          const A av_ip = ap[i * k + p];
          const A* brow = bp + p * n;
          for (int64_t j = j0; j < j1; ++j) orow[j] += av_ip * brow[j];
        }
      }
    }
  }
  if (bias) {
    const std::vector<A> bb = load<A>(broadcast_to(*bias, out.shape));
    for (size_t i = 0; i < ov.size(); ++i) ov[i] += bb[i];
  }
  store(out, ov);
}

namespace {

template <class A, class F>
void unary(const OpCall& c, F f) {
  std::vector<A> x = load<A>(c.inputs.at(0));
  for (A& v : x) v = f(v);
  store(c.outputs.at(0), x);
}

template <class A, class F>
void binary(const OpCall& c, F f) {
  const TensorArg& out = c.outputs.at(0);
  const std::vector<A> a = load<A>(broadcast_to(c.inputs.at(0), out.shape));
  const std::vector<A> b = load<A>(broadcast_to(c.inputs.at(1), out.shape));
  std::vector<A> o(a.size());
  for (size_t i = 0; i < o.size(); ++i) o[i] = f(a[i], b[i]);
  store(out, o);
}

int64_t last_dim(const TensorArg& t) { return t.shape.empty() ? 1 : t.shape.back(); }

template <class A>
void softmax_rows(std::vector<A>& x, int64_t n, bool log) {
  const int64_t rows = n == 0 ? 0 : static_cast<int64_t>(x.size()) / n;
  for (int64_t r = 0; r < rows; ++r) {
    A* p = x.data() + r * n;
    A m = -std::numeric_limits<A>::infinity();
    for (int64_t j = 0; j < n; ++j) m = std::max(m, p[j]);
    A s = 0;
    for (int64_t j = 0; j < n; ++j) s += std::exp(p[j] - m);
    if (log) {
      const A ls = std::log(s);
      for (int64_t j = 0; j < n; ++j) p[j] = p[j] - m - ls;
    } else {
      for (int64_t j = 0; j < n; ++j) p[j] = std::exp(p[j] - m) / s;
    }
  }
}

template <class A>
void layer_norm(const OpCall& c, double eps) {
  const TensorArg& xa = c.inputs.at(0);
  const int64_t n = last_dim(xa);
  std::vector<A> x = load<A>(xa);
  const std::vector<A> w = load<A>(c.inputs.at(1)), b = load<A>(c.inputs.at(2));
  const int64_t rows = n == 0 ? 0 : static_cast<int64_t>(x.size()) / n;
  std::vector<A> mean(rows), rstd(rows);
  for (int64_t r = 0; r < rows; ++r) {
    A* p = x.data() + r * n;
    A s = 0;
    for (int64_t j = 0; j < n; ++j) s += p[j];
    const A mu = s / static_cast<A>(n);
    A v = 0;
    for (int64_t j = 0; j < n; ++j) v += (p[j] - mu) * (p[j] - mu);
    const A rs = A(1) / std::sqrt(v / static_cast<A>(n) + static_cast<A>(eps));
    for (int64_t j = 0; j < n; ++j) p[j] = (p[j] - mu) * rs * w[j] + b[j];
    mean[r] = mu;
    rstd[r] = rs;
  }
  store(c.outputs.at(0), x);
  if (c.outputs.size() > 1) store(c.outputs[1], mean);
  if (c.outputs.size() > 2) store(c.outputs[2], rstd);
}

template <class A>
void flash_attention(const OpCall& c, double p) {
  const TensorArg &qa = c.inputs.at(0), &ka = c.inputs.at(1), &va = c.inputs.at(2);
  if (qa.shape.size() != 4) throw std::runtime_error("cpu backend: flash_attention expects (B, H, T, hd)");
  const int64_t B = qa.shape[0], H = qa.shape[1], T = qa.shape[2], D = qa.shape[3], Tk = ka.shape[2];
  // Grouped key/value heads (enable_gqa): query head h reads key/value head h / (H / Hk).
  const int64_t Hk = ka.shape.at(1);
  if (ka.shape != va.shape || ka.shape[0] != B || ka.shape[3] != D || Hk <= 0 || H % Hk != 0) {
    throw std::runtime_error("cpu backend: flash_attention: key/value shapes do not match the query's");
  }
  const std::vector<A> q = load<A>(qa), k = load<A>(ka), v = load<A>(va);
  std::vector<A> out(q.size(), A(0)), lse(static_cast<size_t>(B * H * T));
  const A scale = static_cast<A>(1.0 / std::sqrt(static_cast<double>(D)));
  const A zscale = static_cast<A>(p > 0 ? 1.0 / (1.0 - p) : 1.0);
  std::vector<A> s(static_cast<size_t>(Tk));
  for (int64_t bh = 0; bh < B * H; ++bh) {
    const A* qb = q.data() + bh * T * D;
    const int64_t kvh = (bh / H) * Hk + (bh % H) / (H / Hk);
    const A* kb = k.data() + kvh * Tk * D;
    const A* vb = v.data() + kvh * Tk * D;
    for (int64_t i = 0; i < T; ++i) {
      const int64_t nj = std::min(i + 1, Tk);  // causal: keys j <= i
      A m = -std::numeric_limits<A>::infinity();
      for (int64_t j = 0; j < nj; ++j) {
        A d = 0;
        for (int64_t e = 0; e < D; ++e) d += qb[i * D + e] * kb[j * D + e];
        s[j] = d * scale;
        m = std::max(m, s[j]);
      }
      A l = 0;
      for (int64_t j = 0; j < nj; ++j) l += std::exp(s[j] - m);
      const A ls = m + std::log(l);
      lse[bh * T + i] = ls;
      A* o = out.data() + (bh * T + i) * D;
      for (int64_t j = 0; j < nj; ++j) {
        A pij = std::exp(s[j] - ls);
        if (p > 0) pij = rng_keep(c.seed, static_cast<uint64_t>((bh * T + i) * Tk + j), p) ? pij * zscale : A(0);
        for (int64_t e = 0; e < D; ++e) o[e] += pij * vb[j * D + e];
      }
    }
  }
  store(c.outputs.at(0), out);
  store(c.outputs.at(1), lse);
}

template <class A>
void nll_loss(const OpCall& c) {
  const TensorArg& la = c.inputs.at(0);
  const int64_t V = last_dim(la);
  const std::vector<A> logp = load<A>(la);
  const std::vector<int64_t> t = load_index(c.inputs.at(1));
  A sum = 0;
  int64_t count = 0;
  for (size_t i = 0; i < t.size(); ++i) {
    if (t[i] < 0) continue;  // ignore_index (-1 in gpt2, -100 by default)
    if (t[i] >= V) throw std::runtime_error(fmt::format("cpu backend: nll_loss target {} out of range [0, {})", t[i], V));
    sum += logp[i * V + t[i]];
    ++count;
  }
  store(c.outputs.at(0), std::vector<A>{-sum / static_cast<A>(count)});
  if (c.outputs.size() > 1) store(c.outputs[1], std::vector<A>{static_cast<A>(count)});
}

template <class A>
void gather_rows(const OpCall& c) {
  const TensorArg& wa = c.inputs.at(0);
  const int64_t V = wa.shape.at(0), d = wa.shape.at(1);
  const std::vector<A> w = load<A>(wa);
  const std::vector<int64_t> idx = load_index(c.inputs.at(1));
  std::vector<A> out(idx.size() * static_cast<size_t>(d));
  for (size_t n = 0; n < idx.size(); ++n) {
    if (idx[n] < 0 || idx[n] >= V) throw std::runtime_error(fmt::format("cpu backend: index {} out of range [0, {})", idx[n], V));
    std::copy(w.begin() + idx[n] * d, w.begin() + (idx[n] + 1) * d, out.begin() + n * d);
  }
  store(c.outputs.at(0), out);
}

// torch.cat((a, b), dim): each input's rows of the dims from `dim` on, in turn, per outer index.
template <class A>
void cat(const OpCall& c, int dim) {
  const TensorArg& out = c.outputs.at(0);
  const auto inner_of = [dim](const Shape& sh) {
    int64_t n = 1;
    for (size_t d = static_cast<size_t>(dim); d < sh.size(); ++d) n *= sh[d];
    return n;
  };
  int64_t outer = 1;
  for (int d = 0; d < dim; ++d) outer *= out.shape.at(static_cast<size_t>(d));
  std::vector<std::vector<A>> parts;
  for (const TensorArg& in : c.inputs) parts.push_back(load<A>(in));
  std::vector<A> o;
  o.reserve(static_cast<size_t>(numel(out)));
  for (int64_t r = 0; r < outer; ++r) {
    for (size_t i = 0; i < parts.size(); ++i) {
      const int64_t n = inner_of(c.inputs[i].shape);
      o.insert(o.end(), parts[i].begin() + r * n, parts[i].begin() + (r + 1) * n);
    }
  }
  store(out, o);
}

// transformers' create_causal_mask for eager attention: (B, 1, T, T), 0 where query q may attend
// key k (k <= q, and q - k < sliding_window when there is one), torch.finfo(dtype).min elsewhere.
template <class A>
void causal_mask(const OpCall& c, int64_t window) {
  const TensorArg& out = c.outputs.at(0);
  const int64_t T = out.shape.back();
  double lowest = std::numeric_limits<float>::lowest();
  if (out.dtype == DType::bf16) lowest = -3.3895313892515355e38;  // torch.finfo(torch.bfloat16).min
  else if (out.dtype == DType::f16) lowest = -65504.0;            // torch.finfo(torch.float16).min
  else if (out.dtype == DType::f64) lowest = std::numeric_limits<double>::lowest();
  std::vector<double> v(static_cast<size_t>(numel(out)));
  for (size_t e = 0; e < v.size(); ++e) {
    const int64_t q = (static_cast<int64_t>(e) / T) % T, k = static_cast<int64_t>(e) % T;
    const bool allowed = k <= q && (window <= 0 || q - k < window);
    v[e] = allowed ? 0.0 : lowest;
  }
  store(out, v);
}

// The rotary embedding's tables (LlamaRotaryEmbedding.forward): freqs = positions x inv_freq in
// fp32, emb = cat(freqs, freqs), cos(emb) and sin(emb) in the model dtype, shape (1, T, rd).
template <class A>
void rotary_table(const OpCall& c) {
  const std::vector<double> inv = load<double>(c.inputs.at(0));
  const std::vector<int64_t> pos = load_index(c.inputs.at(1));
  const TensorArg &co = c.outputs.at(0), &so = c.outputs.at(1);
  const int64_t rd = co.shape.back(), half = rd / 2;
  if (half == 0 || static_cast<int64_t>(inv.size()) != half) throw std::runtime_error("cpu backend: rotary_table: inv_freq does not match the table");
  std::vector<float> cv(static_cast<size_t>(numel(co))), sv(cv.size());
  for (size_t t = 0; t < pos.size(); ++t) {
    for (int64_t j = 0; j < rd; ++j) {
      const float f = static_cast<float>(pos[t]) * static_cast<float>(inv[static_cast<size_t>(j % half)]);
      cv[t * rd + j] = std::cos(f);
      sv[t * rd + j] = std::sin(f);
    }
  }
  store(co, cv);
  store(so, sv);
}

}  // namespace

template <class A>
void run_forward(const OpCall& c, const graph::Op& k) {
  const double s = k.params.scalar;
  switch (k.kind) {
    case OpKind::view:
      return;  // outputs alias the input's storage
    case OpKind::arange: {
      std::vector<int64_t> v(static_cast<size_t>(numel(c.outputs.at(0))));
      for (size_t i = 0; i < v.size(); ++i) v[i] = static_cast<int64_t>(i);
      store_index(c.outputs[0], v);
      return;
    }
    case OpKind::ones:
      store_mask(c.outputs.at(0), std::vector<uint8_t>(static_cast<size_t>(numel(c.outputs[0])), 1));
      return;
    case OpKind::triu: {
      const TensorArg& x = c.inputs.at(0);
      std::vector<double> v = load<double>(x);  // masks and small tables: exact in double
      const int64_t rows = x.shape.at(x.shape.size() - 2), cols = x.shape.back();
      for (size_t e = 0; e < v.size(); ++e) {
        const int64_t i = (static_cast<int64_t>(e) / cols) % rows, j = static_cast<int64_t>(e) % cols;
        if (j - i < k.params.start) v[e] = 0;
      }
      store(c.outputs.at(0), v);
      return;
    }
    case OpKind::eq_scalar: {
      const std::vector<double> v = load<double>(c.inputs.at(0));
      std::vector<uint8_t> m(v.size());
      for (size_t i = 0; i < v.size(); ++i) m[i] = v[i] == s;
      store_mask(c.outputs.at(0), m);
      return;
    }
    case OpKind::embedding:
    case OpKind::index_rows:
      return gather_rows<A>(c);
    case OpKind::copy:
      return store(c.outputs.at(0), load<A>(c.inputs.at(0)));
    case OpKind::stack: {
      const std::vector<A> a = load<A>(c.inputs.at(0)), b = load<A>(c.inputs.at(1));
      std::vector<A> o(2 * a.size());
      for (size_t i = 0; i < a.size(); ++i) o[2 * i] = a[i], o[2 * i + 1] = b[i];
      return store(c.outputs.at(0), o);
    }
    case OpKind::add: return binary<A>(c, [](A a, A b) { return a + b; });
    case OpKind::sub: return binary<A>(c, [](A a, A b) { return a - b; });
    case OpKind::mul: return binary<A>(c, [](A a, A b) { return a * b; });
    case OpKind::mul_scalar:
    case OpKind::div_scalar:
    case OpKind::add_scalar: {
      const A sa = static_cast<A>(s);
      if (k.kind == OpKind::mul_scalar) unary<A>(c, [sa](A x) { return x * sa; });
      else if (k.kind == OpKind::div_scalar) unary<A>(c, [sa](A x) { return x / sa; });
      else unary<A>(c, [sa](A x) { return x + sa; });
      // The wrapped 0-dim float64 Python number.
      if (c.outputs.size() > 1) store(c.outputs[1], std::vector<double>{s});
      return;
    }
    case OpKind::pow_scalar: {
      const A e = static_cast<A>(s);
      if (s == 2.0) return unary<A>(c, [](A x) { return x * x; });
      return unary<A>(c, [e](A x) { return std::pow(x, e); });
    }
    case OpKind::rsqrt: return unary<A>(c, [](A x) { return A(1) / std::sqrt(x); });
    case OpKind::mean_last: {
      const TensorArg& xa = c.inputs.at(0);
      const int64_t n = last_dim(xa);
      const std::vector<A> x = load<A>(xa);
      std::vector<A> o(n == 0 ? 0 : x.size() / static_cast<size_t>(n));
      for (size_t r = 0; r < o.size(); ++r) {
        A acc = 0;
        for (int64_t j = 0; j < n; ++j) acc += x[r * n + j];
        o[r] = acc / static_cast<A>(n);
      }
      return store(c.outputs.at(0), o);
    }
    case OpKind::mm:
    case OpKind::bmm:
      return matmul<A>(c.inputs.at(0), c.inputs.at(1), c.outputs.at(0), nullptr);
    case OpKind::addmm:
      return matmul<A>(c.inputs.at(1), c.inputs.at(2), c.outputs.at(0), &c.inputs.at(0));
    case OpKind::layer_norm: return layer_norm<A>(c, s);
    case OpKind::gelu_tanh:
      return unary<A>(c, [](A x) {
        const A kBeta = static_cast<A>(M_SQRT2 * M_2_SQRTPI * 0.5), kKappa = static_cast<A>(0.044715);
        return A(0.5) * x * (A(1) + std::tanh(kBeta * (x + kKappa * x * x * x)));
      });
    case OpKind::silu: return unary<A>(c, [](A x) { return x / (A(1) + std::exp(-x)); });
    case OpKind::softmax:
    case OpKind::log_softmax: {
      std::vector<A> x = load<A>(c.inputs.at(0));
      softmax_rows(x, last_dim(c.inputs[0]), k.kind == OpKind::log_softmax);
      return store(c.outputs.at(0), x);
    }
    case OpKind::masked_fill: {
      const TensorArg& out = c.outputs.at(0);
      std::vector<A> x = load<A>(c.inputs.at(0));
      const std::vector<uint8_t> m = load_mask(broadcast_to(c.inputs.at(1), out.shape));
      const A fill = static_cast<A>(s);
      for (size_t i = 0; i < x.size(); ++i) {
        if (m[i]) x[i] = fill;
      }
      return store(out, x);
    }
    case OpKind::dropout_noise: {
      const TensorArg& out = c.outputs.at(0);
      const A scale = static_cast<A>(1.0 / (1.0 - s));
      std::vector<A> v(static_cast<size_t>(numel(out)));
      for (size_t i = 0; i < v.size(); ++i) v[i] = rng_keep(c.seed, i, s) ? scale : A(0);
      return store(out, v);
    }
    case OpKind::native_dropout: {
      std::vector<A> x = load<A>(c.inputs.at(0));
      const A scale = static_cast<A>(1.0 / (1.0 - s));
      std::vector<uint8_t> m(x.size());
      for (size_t i = 0; i < x.size(); ++i) {
        m[i] = rng_keep(c.seed, i, s);
        x[i] = m[i] ? x[i] * scale : A(0);
      }
      store(c.outputs.at(0), x);
      if (c.outputs.size() > 1) store_mask(c.outputs[1], m);
      return;
    }
    case OpKind::flash_attention: return flash_attention<A>(c, s);
    case OpKind::nll_loss: return nll_loss<A>(c);
    // Hugging Face transformers' decoders.
    case OpKind::neg: return unary<A>(c, [](A x) { return -x; });
    case OpKind::tanh: return unary<A>(c, [](A x) { return std::tanh(x); });
    case OpKind::cast: return store(c.outputs.at(0), load<A>(c.inputs.at(0)));  // rounds to the output dtype
    case OpKind::cat: return cat<A>(c, k.params.dim0);
    case OpKind::causal_mask: return causal_mask<A>(c, k.params.start);
    case OpKind::rotary_table: return rotary_table<A>(c);
    case OpKind::pad: {  // F.pad(labels, (0, 1), value): one more column of `value` on the last dim
      const TensorArg &in = c.inputs.at(0), &out = c.outputs.at(0);
      const std::vector<int64_t> x = load_index(in);
      const int64_t n = last_dim(in), m = last_dim(out);
      std::vector<int64_t> o(static_cast<size_t>(numel(out)), static_cast<int64_t>(s));
      for (int64_t r = 0; n > 0 && r < static_cast<int64_t>(x.size()) / n; ++r) {
        std::copy(x.begin() + r * n, x.begin() + (r + 1) * n, o.begin() + r * m);
      }
      return store_index(out, o);
    }
    default:
      throw std::runtime_error(fmt::format("cpu backend: {} is not a forward op kind", graph::to_string(k.kind)));
  }
}

template void matmul<float>(const TensorArg&, const TensorArg&, const TensorArg&, const TensorArg*);
template void matmul<double>(const TensorArg&, const TensorArg&, const TensorArg&, const TensorArg*);
template void run_forward<float>(const OpCall&, const graph::Op&);
template void run_forward<double>(const OpCall&, const graph::Op&);

}  // namespace actsim::backends::cpu
