// The op contract of docs/kernels.md checked on a schedule's graph before anything runs: arity,
// ranks, shapes and dtypes of every op's inputs and outputs, so that no kernel indexes past a
// tensor it was given (a schedule file is user input; the CPU kernels trust their calls).
#include <fmt/format.h>

#include "actsim/graph/graph.hpp"
#include "actsim/schedule/schedule.hpp"

namespace actsim::schedule {

using graph::DType;
using graph::Graph;
using graph::Op;
using graph::OpKind;
using graph::Shape;
using graph::TensorId;
using graph::ViewKind;

namespace {

struct Checker {
  const Graph& g;
  const Op& op;
  std::string err;

  const Shape& shape(TensorId t) const { return g.tensor(t).shape; }
  DType dtype(TensorId t) const { return g.tensor(t).dtype; }
  std::string show(TensorId t) const {
    return fmt::format("tensor {} ({} {} {})", graph::index(t), g.tensor(t).name, graph::shape_string(shape(t)),
                       graph::to_string(dtype(t)));
  }
  bool fail(std::string msg) {
    if (err.empty()) err = std::move(msg);
    return false;
  }
  bool arity(size_t n_in_min, size_t n_in_max, size_t n_out_min, size_t n_out_max) {
    if (op.inputs.size() < n_in_min || op.inputs.size() > n_in_max) {
      return fail(fmt::format("has {} inputs; a {} op takes {}{}", op.inputs.size(), graph::to_string(op.kind), n_in_min,
                              n_in_max == n_in_min ? "" : fmt::format(" to {}", n_in_max)));
    }
    if (op.outputs.size() < n_out_min || op.outputs.size() > n_out_max) {
      return fail(fmt::format("has {} outputs; a {} op makes {}{}", op.outputs.size(), graph::to_string(op.kind),
                              n_out_min, n_out_max == n_out_min ? "" : fmt::format(" to {}", n_out_max)));
    }
    return true;
  }
  bool same_shape(TensorId a, TensorId b) {
    return shape(a) == shape(b) || fail(fmt::format("{} and {} must have the same shape", show(a), show(b)));
  }
  bool shape_is(TensorId t, const Shape& s) {
    return shape(t) == s || fail(fmt::format("{} must have shape {}", show(t), graph::shape_string(s)));
  }
  bool rank_is(TensorId t, size_t r) {
    return shape(t).size() == r || fail(fmt::format("{} must have rank {}", show(t), r));
  }
  bool rank_at_least(TensorId t, size_t r) {
    return shape(t).size() >= r || fail(fmt::format("{} must have rank {} or more", show(t), r));
  }
  bool floating(TensorId t) {
    return graph::is_floating(dtype(t)) || fail(fmt::format("{} must be a floating-point tensor", show(t)));
  }
  bool dtype_is(TensorId t, DType d) {
    return dtype(t) == d || fail(fmt::format("{} must be {}", show(t), graph::to_string(d)));
  }
  bool numel_eq(TensorId a, TensorId b) {
    return graph::numel(shape(a)) == graph::numel(shape(b)) ||
           fail(fmt::format("{} and {} must have the same number of elements", show(a), show(b)));
  }
  // Whether `small` broadcasts to `big` (right-aligned, each extent equal or 1).
  static bool broadcasts(const Shape& small, const Shape& big) {
    if (small.size() > big.size()) return false;
    const size_t lead = big.size() - small.size();
    for (size_t i = 0; i < small.size(); ++i) {
      if (small[i] != big[lead + i] && small[i] != 1) return false;
    }
    return true;
  }
  static bool broadcast_shape(const Shape& a, const Shape& b, Shape& out) {
    const size_t r = std::max(a.size(), b.size());
    out.assign(r, 1);
    for (size_t i = 0; i < r; ++i) {
      const int64_t x = i < r - a.size() ? 1 : a[i - (r - a.size())];
      const int64_t y = i < r - b.size() ? 1 : b[i - (r - b.size())];
      if (x != y && x != 1 && y != 1) return false;
      out[i] = x == 1 ? y : x;
    }
    return true;
  }
  bool all_floating() {
    for (const auto* list : {&op.inputs, &op.outputs}) {
      for (TensorId t : *list) {
        if (g.tensor(t).dtype == DType::i32 || g.tensor(t).dtype == DType::u8) {
          return fail(fmt::format("{}: {} is not a dtype the kernels compute in", show(t), graph::to_string(dtype(t))));
        }
      }
    }
    return true;
  }
  bool elementwise_out(TensorId x, TensorId out) { return same_shape(x, out) && floating(out); }

  bool matmul(size_t ia, size_t ib, size_t rank) {
    const TensorId a = op.inputs[ia], b = op.inputs[ib], o = op.outputs[0];
    if (!rank_is(a, rank) || !rank_is(b, rank) || !rank_is(o, rank)) return false;
    const Shape &sa = shape(a), &sb = shape(b);
    const size_t m = rank - 2, k = rank - 1;
    if (sa[k] != sb[m]) return fail(fmt::format("{} and {}: inner extents differ", show(a), show(b)));
    Shape so = sa;
    so[k] = sb[k];
    if (rank == 3 && sa[0] != sb[0]) return fail(fmt::format("{} and {}: batch extents differ", show(a), show(b)));
    return shape_is(o, so) && floating(a) && floating(b) && floating(o);
  }

  bool forward(OpKind kind, const graph::OpParams& p) {
    const auto& in = op.inputs;
    const auto& out = op.outputs;
    switch (kind) {
      case OpKind::arange: return arity(0, 0, 1, 1) && rank_is(out[0], 1) && dtype_is(out[0], DType::i64);
      case OpKind::ones: return arity(0, 0, 1, 1) && rank_is(out[0], 2) && dtype_is(out[0], DType::b8);
      case OpKind::triu: return arity(1, 1, 1, 1) && rank_at_least(in[0], 2) && same_shape(in[0], out[0]);
      case OpKind::eq_scalar: return arity(1, 1, 1, 1) && same_shape(in[0], out[0]) && dtype_is(out[0], DType::b8);
      case OpKind::embedding:
      case OpKind::index_rows: {
        if (!arity(2, 2, 1, 1) || !rank_is(in[0], 2) || !floating(in[0]) || !dtype_is(in[1], DType::i64)) return false;
        Shape s = shape(in[1]);
        s.push_back(shape(in[0])[1]);
        return shape_is(out[0], s) && floating(out[0]);
      }
      case OpKind::view: {
        if (!arity(1, 1, 0, 64)) return false;  // a recomputed view may have no outputs left
        const Shape& x = shape(in[0]);
        for (TensorId o : out) {
          if (g.tensor(o).storage != g.tensor(in[0]).storage) return fail(fmt::format("{}: a view must share its input's storage", show(o)));
          if (dtype(o) != dtype(in[0])) return fail(fmt::format("{}: a view keeps its input's dtype", show(o)));
        }
        const size_t r = x.size();
        auto dim_ok = [&](int64_t d) { return d >= 0 && static_cast<size_t>(d) < r; };
        switch (p.view) {
          case ViewKind::none: return fail("a view op needs params.view");
          case ViewKind::reshape:
          case ViewKind::transpose:
          case ViewKind::unsqueeze:
            for (TensorId o : out) {
              if (!numel_eq(in[0], o)) return false;
            }
            return true;
          case ViewKind::expand:
            for (TensorId o : out) {
              if (!broadcasts(x, shape(o))) return fail(fmt::format("{} does not expand {}", show(o), show(in[0])));
            }
            return true;
          case ViewKind::split: {
            if (!dim_ok(p.dim0) || p.start <= 0) return fail("a split view needs 0 <= dim0 < rank and a positive chunk size (start)");
            int64_t total = 0;
            for (TensorId o : out) {
              Shape s = shape(o);
              if (s.size() != r) return fail(fmt::format("{}: a chunk keeps its input's rank", show(o)));
              if (s[p.dim0] > p.start) return fail(fmt::format("{}: a chunk is at most {} long", show(o), p.start));
              total += s[p.dim0];
              s[p.dim0] = x[p.dim0];
              if (s != x) return fail(fmt::format("{}: a chunk of {} differs outside dim {}", show(o), show(in[0]), p.dim0));
            }
            if (total > x[p.dim0] || static_cast<int64_t>(out.size() - 1) * p.start >= std::max<int64_t>(x[p.dim0], 1)) {
              return fail(fmt::format("the chunks overrun {} along dim {}", show(in[0]), p.dim0));
            }
            return true;
          }
          case ViewKind::slice: {
            if (!arity(1, 1, 0, 1)) return false;
            if (out.empty()) return true;
            if (!dim_ok(p.dim0) || p.step <= 0 || p.start < 0) return fail("a slice needs 0 <= dim0 < rank, start >= 0 and step > 0");
            Shape s = shape(out[0]);
            if (s.size() != r) return fail(fmt::format("{}: a slice keeps its input's rank", show(out[0])));
            const int64_t n = s[p.dim0];
            if (n > 0 && (n - 1 > (x[p.dim0] - 1 - p.start) / p.step || p.start >= x[p.dim0])) {
              return fail(fmt::format("{}: the slice overruns {} along dim {}", show(out[0]), show(in[0]), p.dim0));
            }
            s[p.dim0] = x[p.dim0];
            return s == x || fail(fmt::format("{}: a slice of {} differs outside dim {}", show(out[0]), show(in[0]), p.dim0));
          }
          case ViewKind::select: {
            if (!arity(1, 1, 0, 1)) return false;
            if (out.empty()) return true;
            if (!dim_ok(p.dim0) || p.start < 0 || p.start >= x[p.dim0]) return fail("a select needs 0 <= dim0 < rank and 0 <= start < extent");
            Shape s = x;
            s.erase(s.begin() + p.dim0);
            return shape_is(out[0], s);
          }
        }
        return fail("unknown view kind");
      }
      case OpKind::copy: return arity(1, 1, 1, 1) && numel_eq(in[0], out[0]);
      case OpKind::stack: {
        if (!arity(2, 2, 1, 1) || !same_shape(in[0], in[1])) return false;
        Shape s = shape(in[0]);
        s.push_back(2);
        return shape_is(out[0], s);
      }
      case OpKind::add:
      case OpKind::sub:
      case OpKind::mul: {
        if (!arity(2, 2, 1, 1)) return false;
        Shape s;
        if (!broadcast_shape(shape(in[0]), shape(in[1]), s)) return fail(fmt::format("{} and {} do not broadcast", show(in[0]), show(in[1])));
        return shape_is(out[0], s) && floating(in[0]) && floating(in[1]) && floating(out[0]);
      }
      case OpKind::mul_scalar:
      case OpKind::div_scalar:
      case OpKind::add_scalar:
        if (!arity(1, 1, 1, 2) || !elementwise_out(in[0], out[0]) || !floating(in[0])) return false;
        return out.size() == 1 || shape_is(out[1], {});
      case OpKind::pow_scalar:
      case OpKind::rsqrt:
      case OpKind::gelu_tanh:
      case OpKind::silu:
        return arity(1, 1, 1, 1) && floating(in[0]) && elementwise_out(in[0], out[0]);
      case OpKind::softmax:
      case OpKind::log_softmax:
        return arity(1, 1, 1, 1) && rank_at_least(in[0], 1) && floating(in[0]) && elementwise_out(in[0], out[0]);
      case OpKind::mean_last: {
        if (!arity(1, 1, 1, 1) || !rank_at_least(in[0], 1) || !floating(in[0])) return false;
        Shape s = shape(in[0]);
        s.back() = 1;
        return shape_is(out[0], s) && floating(out[0]);
      }
      case OpKind::mm: return arity(2, 2, 1, 1) && matmul(0, 1, 2);
      case OpKind::bmm: return arity(2, 2, 1, 1) && matmul(0, 1, 3);
      case OpKind::addmm:
        if (!arity(3, 3, 1, 1) || !matmul(1, 2, 2) || !floating(in[0])) return false;
        return broadcasts(shape(in[0]), shape(out[0])) ||
               fail(fmt::format("{} does not broadcast to {}", show(in[0]), show(out[0])));
      case OpKind::layer_norm: {
        if (!arity(3, 3, 3, 3) || !rank_at_least(in[0], 1) || !floating(in[0])) return false;
        const Shape& x = shape(in[0]);
        Shape stat = x;
        stat.back() = 1;
        return shape_is(in[1], {x.back()}) && shape_is(in[2], {x.back()}) && elementwise_out(in[0], out[0]) &&
               shape_is(out[1], stat) && shape_is(out[2], stat) && floating(in[1]) && floating(in[2]) &&
               floating(out[1]) && floating(out[2]);
      }
      case OpKind::masked_fill:
        if (!arity(2, 2, 1, 1) || !floating(in[0]) || !dtype_is(in[1], DType::b8)) return false;
        if (!broadcasts(shape(in[1]), shape(in[0]))) return fail(fmt::format("{} does not broadcast to {}", show(in[1]), show(in[0])));
        return elementwise_out(in[0], out[0]);
      case OpKind::dropout_noise: return arity(0, 0, 1, 1) && floating(out[0]);
      case OpKind::native_dropout:
        return arity(1, 1, 2, 2) && floating(in[0]) && elementwise_out(in[0], out[0]) && same_shape(in[0], out[1]) &&
               dtype_is(out[1], DType::b8);
      case OpKind::flash_attention: {
        if (!arity(3, 3, 2, 2) || !rank_is(in[0], 4) || !rank_is(in[1], 4)) return false;
        const Shape& q = shape(in[0]);
        const Shape& k = shape(in[1]);
        // enable_gqa (transformers' sdpa): k and v may have fewer heads, a divisor of q's.
        const bool gqa = k[0] == q[0] && k[2] == q[2] && k[3] == q[3] && k[1] > 0 && q[1] % k[1] == 0;
        if (!gqa) return fail(fmt::format("{} and {}: key heads must divide query heads, other extents equal", show(in[0]), show(in[1])));
        return same_shape(in[1], in[2]) && same_shape(in[0], out[0]) &&
               shape_is(out[1], {q[0], q[1], q[2]}) && floating(in[0]) && floating(in[1]) && floating(in[2]) &&
               floating(out[0]) && floating(out[1]);
      }
      case OpKind::nll_loss:
        return arity(2, 2, 2, 2) && rank_is(in[0], 2) && floating(in[0]) && dtype_is(in[1], DType::i64) &&
               shape_is(in[1], {shape(in[0])[0]}) && shape_is(out[0], {}) && shape_is(out[1], {}) &&
               floating(out[0]) && floating(out[1]);
      // Hugging Face decoders (graph/src/lower_hf_llama.cpp)
      case OpKind::tanh:
      case OpKind::neg: return arity(1, 1, 1, 1) && floating(in[0]) && elementwise_out(in[0], out[0]);
      case OpKind::cast: return arity(1, 1, 1, 1) && floating(in[0]) && floating(out[0]) && same_shape(in[0], out[0]);
      case OpKind::cat: {
        if (!arity(2, 2, 1, 1) || !rank_at_least(in[0], 1) || !floating(in[0]) || !floating(in[1])) return false;
        Shape a = shape(in[0]), b = shape(in[1]);
        if (a.size() != b.size()) return fail(fmt::format("{} and {} must have the same rank", show(in[0]), show(in[1])));
        const int64_t n = a.back() + b.back();
        a.back() = b.back() = 0;
        if (a != b) return fail(fmt::format("{} and {} differ beyond the last dim", show(in[0]), show(in[1])));
        a.back() = n;
        return shape_is(out[0], a);
      }
      case OpKind::rotary_table: {
        if (!arity(2, 2, 2, 2) || !rank_is(in[0], 1) || !rank_is(in[1], 1) || !dtype_is(in[1], DType::i64)) return false;
        const Shape s{1, shape(in[1])[0], 2 * shape(in[0])[0]};
        return shape_is(out[0], s) && shape_is(out[1], s) && floating(out[0]) && floating(out[1]);
      }
      case OpKind::causal_mask: {
        if (!arity(1, 1, 1, 1) || !rank_is(in[0], 1) || !dtype_is(in[0], DType::i64) || !rank_is(out[0], 4)) return false;
        const int64_t t = shape(in[0])[0];
        return shape_is(out[0], {shape(out[0])[0], 1, t, t}) && floating(out[0]);
      }
      case OpKind::pad: {
        if (!arity(1, 1, 1, 1) || !rank_is(in[0], 2) || !dtype_is(in[0], DType::i64) || !dtype_is(out[0], DType::i64)) return false;
        return shape_is(out[0], {shape(in[0])[0], shape(in[0])[1] + 1});
      }
      // Mixture-of-experts decoders (graph/src/lower_hf_moe.cpp)
      case OpKind::topk:
        return arity(1, 1, 2, 2) && floating(in[0]) && same_shape(out[0], out[1]) && floating(out[0]) &&
               dtype_is(out[1], DType::i64);
      case OpKind::sum_dim: return arity(1, 1, 1, 1) && floating(in[0]) && floating(out[0]);
      case OpKind::div_inplace:
        return arity(2, 2, 2, 2) && floating(in[0]) && floating(in[1]) && same_shape(in[0], out[0]) &&
               same_shape(in[0], out[1]);
      case OpKind::grouped_mm: {
        if (!arity(3, 3, 1, 1) || !rank_is(in[0], 2) || !rank_is(in[1], 3) || !rank_is(in[2], 1)) return false;
        return shape_is(out[0], {shape(in[0])[0], shape(in[1])[2]}) && floating(out[0]);
      }
      case OpKind::moe_index: return arity(1, 1, 1, 2);
      default: return fail("is not a forward op kind");
    }
  }

  bool backward() {
    const Op& f = g.op(op.forward);
    if (f.kind == OpKind::backward || f.phase != graph::Phase::forward) {
      return fail(fmt::format("its forward op {} ({}) is not a forward op", graph::index(op.forward), f.name));
    }
    const size_t n_in = static_cast<size_t>(op.n_grad_inputs);
    if (op.inputs.size() != n_in + f.saved.size()) {
      return fail(fmt::format("has {} inputs; it takes {} incoming gradients and the {} tensors op {} saves",
                              op.inputs.size(), n_in, f.saved.size(), graph::index(op.forward)));
    }
    for (size_t k = 0; k < n_in; ++k) {
      if (!same_shape(op.inputs[k], f.outputs[static_cast<size_t>(op.grad_in_of[k])]) || !floating(op.inputs[k])) return false;
    }
    for (size_t k = 0; k < f.saved.size(); ++k) {
      const TensorId t = op.inputs[n_in + k];
      if (!same_shape(t, f.saved[k])) return false;
      if (dtype(t) != dtype(f.saved[k])) return fail(fmt::format("{} and {} must have the same dtype", show(t), show(f.saved[k])));
    }
    for (size_t k = 0; k < op.grad_outputs.size(); ++k) {
      const TensorId gx = op.grad_outputs[k], x = f.inputs[static_cast<size_t>(op.grad_of[k])];
      const bool ok = shape(gx) == shape(x) || (!f.outputs.empty() && shape(gx) == shape(f.outputs[0]));
      if (!ok) return fail(fmt::format("{} is not the gradient of {}", show(gx), show(x)));
      if (!floating(gx)) return false;
    }
    // The view backward writes chunks of the gradient at offsets from the forward's params: the
    // forward view's own contract bounds them (checked on the forward op).
    return true;
  }

  bool optimizer() {
    // Every tensor has the parameter's elements, except the 0-dim step.
    const TensorId* param = nullptr;
    for (const auto* list : {&op.inputs, &op.outputs}) {
      for (const TensorId& t : *list) {
        if (!floating(t)) return false;
        if (shape(t).empty()) continue;
        if (!param) param = &t;
        else if (!numel_eq(*param, t)) return false;
      }
    }
    if (op.kind == OpKind::optim_temp && op.outputs.size() != 1) return fail("an optim_temp op makes one output");
    if (op.kind == OpKind::optim_update && !op.outputs.empty()) return fail("an optim_update op updates in place (no outputs)");
    return true;
  }

  bool check() {
    if (op.kind == OpKind::rng_stash) {  // a uint8 copy of the CPU generator's state, nothing read
      return arity(0, 0, 1, 1) &&
             (dtype(op.outputs[0]) == graph::DType::u8 || fail(fmt::format("{} must be uint8", show(op.outputs[0]))));
    }
    if (!all_floating()) return false;
    switch (op.kind) {
      case OpKind::backward: return backward();
      case OpKind::sum_to:
        if (!arity(1, 1, 1, 1)) return false;
        return broadcasts(shape(op.outputs[0]), shape(op.inputs[0])) ||
               fail(fmt::format("{} does not reduce to {}", show(op.inputs[0]), show(op.outputs[0])));
      case OpKind::accumulate:
        return arity(2, 2, 0, 1) && numel_eq(op.inputs[0], op.inputs[1]) &&
               (op.outputs.empty() || numel_eq(op.inputs[0], op.outputs[0]));
      case OpKind::grad_seed: return arity(0, 0, 1, 1) && floating(op.outputs[0]);
      case OpKind::zero_grad: return arity(0, 0, 0, 0);
      case OpKind::optim_update:
      case OpKind::optim_temp: return optimizer();
      case OpKind::offload:
      case OpKind::prefetch:
        if (!arity(1, 1, 1, 1)) return false;
        return g.storage(g.tensor(op.inputs[0]).storage).bytes == g.storage(g.tensor(op.outputs[0]).storage).bytes ||
               fail(fmt::format("{} and {}: the copy's storage must be as large as the original's", show(op.inputs[0]),
                                show(op.outputs[0])));
      default: return forward(op.kind, op.params);
    }
  }
};

}  // namespace

std::string op_contract_error(const Graph& g, graph::OpId id) {
  Checker c{g, g.op(id), {}};
  if (c.check()) return {};
  return c.err.empty() ? "breaks its kind's contract (docs/kernels.md)" : c.err;
}

}  // namespace actsim::schedule
