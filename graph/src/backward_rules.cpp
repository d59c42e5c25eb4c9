// The backward rules, one function per forward op kind (or family of kinds sharing a rule), as
// PyTorch's tools/autograd/derivatives.yaml and FunctionsManual.cpp define them: which gradients a
// node allocates, which are views of or pass-throughs of the incoming gradient, and the transient
// bytes of its kernels. The order in which a rule allocates gradients is PyTorch's (it decides
// tensor ids, and so the simulated allocation order).
#include "backward_rules.hpp"

#include <fmt/format.h>

#include <algorithm>

#include "actsim/util/error.hpp"

namespace actsim::graph {

TensorId new_grad(Builder& b, const std::string& name, const Shape& shape, DType dt, const Strides& strides) {
  TensorId t = b.fresh(name, shape, dt, Category::temporary);
  if (!strides.empty()) b.graph().mutable_tensor(t).strides = strides;
  return t;
}

namespace {

// One node's view of its forward op and incoming gradient, shared by the rules.
struct Node {
  Builder& b;
  const Op& f;
  TensorId g;       // the first incoming gradient
  const Tensor& gt;  // stable while the graph grows (its tensors never move)
  DType dt;

  const Tensor& in(size_t i) const { return b.graph().tensor(f.inputs[i]); }
  bool needs(size_t i) const { return i < f.inputs.size() && in(i).requires_grad; }
  TensorId grad(const std::string& name, const Shape& shape, const Strides& strides = {}) const {
    return new_grad(b, name, shape, dt, strides);
  }
  TensorId fresh_for(size_t i) const { return grad(fmt::format("grad_in{}", i), in(i).shape); }
  TensorId view(const std::string& name, const Shape& shape, const Strides& strides, int64_t off) const {
    return b.alias(g, name, shape, strides, off);
  }
};

// View ops: the gradient is a view of the incoming one where the inverse view exists, else a copy.
void view_backward(const Node& n, BackwardRule& r) {
  const Tensor& x = n.in(0);
  const Tensor& gt = n.gt;
  const OpParams& p = n.f.params;
  r.kernels = 0;
  switch (p.view) {
    case ViewKind::reshape:
      if (auto st = view_strides(gt.shape, gt.strides, x.shape)) {
        r.grads[0] = n.view("grad_reshape", x.shape, *st, gt.offset);
      } else {
        r.grads[0] = n.grad("grad_reshape", x.shape);
        r.kernels = 1;
      }
      return;
    case ViewKind::transpose: {
      Shape sh = gt.shape;
      Strides st = gt.strides;
      std::swap(sh[p.dim0], sh[p.dim1]);
      std::swap(st[p.dim0], st[p.dim1]);
      r.grads[0] = n.view("grad_transpose", sh, st, gt.offset);
      return;
    }
    case ViewKind::expand:
      // sum_to(grad, self.sizes()): the gradient itself when nothing was expanded.
      if (gt.shape == x.shape) {
        r.grads[0] = n.g;
      } else {
        r.grads[0] = n.grad("grad_expand", x.shape);
        r.kernels = 1;
      }
      return;
    case ViewKind::unsqueeze: {
      Shape sh = gt.shape;
      Strides st = gt.strides;
      sh.erase(sh.begin() + p.dim0);
      st.erase(st.begin() + p.dim0);
      r.grads[0] = n.view("grad_squeeze", sh, st, gt.offset);
      return;
    }
    case ViewKind::split:   // split_backward: cat of the chunks' gradients (zeros if missing)
    case ViewKind::slice:   // slice_backward: zeros(input) with the slice copied in
    case ViewKind::select:
      r.grads[0] = n.grad("grad_" + std::string(p.view == ViewKind::split ? "split" : "slice"), x.shape);
      r.kernels = 1;
      return;
    case ViewKind::none: ACTSIM_ASSERT(false, "view op without a view kind");
  }
}

// CloneBackward0 / AddBackward1 pass the gradient through.
void pass_through_backward(const Node& n, BackwardRule& r) {
  r.grads[0] = n.g;
  r.kernels = 0;
}

void add_backward(const Node& n, BackwardRule& r) {
  for (size_t i = 0; i < 2; ++i) {
    if (n.needs(i)) r.grads[i] = n.g;
  }
  r.kernels = 0;
}

void sub_backward(const Node& n, BackwardRule& r) {
  if (n.needs(0)) r.grads[0] = n.g;
  if (n.needs(1)) r.grads[1] = n.grad("grad_neg", n.gt.shape);
}

// mul_tensor_backward: grad * other (broadcast shape; validate_outputs reduces it).
// With mixed dtypes (a bf16 tensor times float32 routing weights: a float32 product) the engine's
// validate_outputs casts an input's gradient to its dtype: the float32 product is transient.
void mul_backward(const Node& n, BackwardRule& r) {
  for (size_t i = 0; i < 2; ++i) {
    if (!n.needs(i)) continue;
    const DType in_dt = n.in(i).dtype;
    if (in_dt != n.dt && is_floating(in_dt)) {
      r.grads[i] = new_grad(n.b, fmt::format("grad_mul{}", i), n.gt.shape, in_dt);
      r.workspace += numel(n.gt.shape) * dtype_size(n.dt);
    } else {
      r.grads[i] = n.grad(fmt::format("grad_mul{}", i), n.gt.shape);
    }
  }
  r.kernels = n.needs(0) + n.needs(1);
}

// mm, addmm, bmm: mm_mat1_backward / mm_mat2_backward, and their matmul workspaces.
void matmul_backward(const Node& n, BackwardRule& r) {
  const Op& f = n.f;
  const Tensor& gt = n.gt;
  const DType dt = n.dt;
  const size_t a = f.kind == OpKind::addmm ? 1 : 0;
  if (f.kind == OpKind::addmm && n.needs(0)) r.grads[0] = n.g;  // bias: reduced by validate_outputs
  for (size_t i = a; i < a + 2; ++i) {
    if (!n.needs(i)) continue;
    const Tensor& x = n.in(i);
    // mm_mat{1,2}_backward: a column-major operand gets a column-major gradient.
    if (f.kind != OpKind::bmm && x.strides[0] == 1 && x.strides[1] == x.shape[0] && x.shape[1] > 1) {
      r.grads[i] = n.grad(fmt::format("grad_mm{}", i - a), x.shape, {1, x.shape[0]});
    } else {
      r.grads[i] = n.fresh_for(i);
    }
  }
  r.kernels = n.needs(a) + n.needs(a + 1);
  // Transient bytes of the two products (16-bit oneDNN scratchpads on the CPU). The engine
  // allocates both gradients at the node's start; PyTorch computes mat2's gradient first, so
  // its scratchpad coexists with one gradient only.
  const RuntimeProfile& prof = n.b.prof();
  const Tensor& x1 = n.in(a);
  const Tensor& x2 = n.in(a + 1);
  const size_t rank = x1.shape.size();
  const int64_t bs = f.kind == OpKind::bmm ? x1.shape[0] : 1;
  const int64_t m = x1.shape[rank - 2], k = x1.shape[rank - 1], nn = x2.shape[rank - 1];
  auto colmaj = [](const Tensor& t) {
    const size_t q = t.shape.size();
    return t.shape[q - 2] > 1 && t.strides[q - 2] == 1 && t.strides[q - 1] == t.shape[q - 2];
  };
  const bool g_contig = is_contiguous(gt.shape, gt.strides);
  int64_t ws1 = 0, ws2 = 0;
  if (n.needs(a)) {  // mat1: grad.mm(mat2.t()) [m x n @ n x k], or mat2.mm(grad.t()).t() if mat1 col-major
    ws1 = (f.kind != OpKind::bmm && colmaj(x1)) ? prof.matmul_workspace(dt, bs, k, nn, m, colmaj(x2))
                                               : prof.matmul_workspace(dt, bs, m, nn, k, !g_contig && colmaj(gt));
  }
  if (n.needs(a + 1)) {  // mat2: grad.t().mm(mat1).t() if mat2 col-major, else mat1.t().mm(grad)
    ws2 = (f.kind != OpKind::bmm && colmaj(x2)) ? prof.matmul_workspace(dt, bs, nn, m, k, g_contig)
                                               : prof.matmul_workspace(dt, bs, k, m, nn, !colmaj(x1));
  }
  const int64_t g1_bytes = n.needs(a) ? numel(x1.shape) * dtype_size(dt) : 0;
  r.workspace = std::max<int64_t>({0, ws2 - g1_bytes, ws1});
}

// layer_norm (input, weight, bias) and flash attention (q, k, v): a fresh gradient per input.
void three_inputs_backward(const Node& n, BackwardRule& r) {
  for (size_t i = 0; i < 3; ++i) {
    if (n.needs(i)) r.grads[i] = n.fresh_for(i);
  }
}

// stack_tensors_backward: grad.unbind(dim) -- strided views of the gradient.
void stack_backward(const Node& n, BackwardRule& r) {
  for (size_t i = 0; i < 2; ++i) {
    if (!n.needs(i)) continue;
    Shape sh = n.gt.shape;
    Strides st = n.gt.strides;
    const int64_t off = n.gt.offset + static_cast<int64_t>(i) * st.back();
    sh.pop_back();
    st.pop_back();
    r.grads[i] = n.view(fmt::format("grad_unbind{}", i), sh, st, off);
  }
  r.kernels = 0;
}

// Ops with one differentiable input (unary, scalar, embedding's weight, the loss): one fresh
// gradient of the input's shape.
void first_input_backward(const Node& n, BackwardRule& r) {
  if (n.needs(0)) r.grads[0] = n.fresh_for(0);
}

// Hugging Face decoders (issue 11). CatBackward0: grad.narrow(dim, offset, size) for each input -- views.
void cat_backward(const Node& n, BackwardRule& r) {
  int64_t off = 0;
  for (size_t i = 0; i < n.f.inputs.size(); ++i) {
    const Shape sh = n.in(i).shape;
    if (n.needs(i)) {
      r.grads[i] = n.view(fmt::format("grad_narrow{}", i), sh, n.gt.strides, n.gt.offset + off * n.gt.strides.back());
    }
    off += sh.back();
  }
  r.kernels = 0;
}

// Mixture of experts (issue 11: hfrest). SumBackward1: grad.unsqueeze(dim) if not keepdim, then
// expand to the input's shape -- a view of the incoming gradient (stride 0 along dim).
void sum_dim_backward(const Node& n, BackwardRule& r) {
  if (!n.needs(0)) return;
  const int dim = n.f.params.dim0;
  Strides st = n.gt.strides.empty() ? contiguous_strides(n.gt.shape) : n.gt.strides;
  if (n.f.params.start == 0) st.insert(st.begin() + dim, 0);
  st[static_cast<size_t>(dim)] = 0;
  const Shape sh = n.in(0).shape;
  r.grads[0] = n.view("grad_sum", sh, st, n.gt.offset);
  r.kernels = 0;
}

// DivBackward0 of `a /= b`: div_tensor_other_backward (-grad * ((self / other) / other): three
// transients, then the product) before div_tensor_self_backward (grad / other); the engine then
// reduces other's gradient to its shape.
void div_backward(const Node& n, BackwardRule& r) {
  const int64_t bytes = numel(n.gt.shape) * dtype_size(n.dt);
  if (n.needs(1)) {
    r.grads[1] = n.grad("grad_div_other", n.gt.shape);
    r.workspace = 3 * bytes;
  }
  if (n.needs(0)) r.grads[0] = n.grad("grad_div_self", n.gt.shape);
  r.kernels = 4 * n.needs(1) + n.needs(0);
}

// GroupedMmBackward0: mat2's gradient first (in mat2's layout, so that the transposed expert weight
// gets a contiguous gradient), then self's.
void grouped_mm_backward(const Node& n, BackwardRule& r) {
  if (n.needs(1)) {
    const Shape sh = n.in(1).shape;  // copies: the graph's tensors move as the gradient is added
    const Strides st = n.in(1).strides;
    r.grads[1] = n.grad("grad_grouped_mm_mat2", sh, st);
  }
  if (n.needs(0)) r.grads[0] = n.fresh_for(0);
  r.kernels = n.needs(0) + n.needs(1);
}

// ToCopyBackward0: grad.to(self's dtype) -- a fresh gradient in the input's dtype.
void cast_backward(const Node& n, BackwardRule& r) {
  if (n.needs(0)) r.grads[0] = new_grad(n.b, "grad_cast", n.in(0).shape, n.in(0).dtype);
}

// issue 13: the backward of DTensor's redistributions and loss_parallel (lower_dtensor.cpp).
// params.scalar carries the op's extra transient bytes in backward (gloo's buffers, the loss's
// temporaries), set by the lowering.
void dtensor_backward(const Node& n, BackwardRule& r) {
  r.workspace = static_cast<int64_t>(n.f.params.scalar);
  switch (n.f.params.start) {
    case kDtFromLocal:  // _FromTorchTensor.backward: Partial -> Replicate, a functional all-reduce (a clone)
      r.grads[0] = n.fresh_for(0);
      r.collective = OpKind::all_reduce;
      return;
    case kDtAllReduce:  // Redistribute.backward of Partial -> Replicate: the Replicate gradient as is
    case kDtLogSoftmax:  // loss_parallel: nll_loss_backward already returned the logits' gradient
      r.grads[0] = n.g;
      r.kernels = 0;
      r.collective = OpKind::backward;
      return;
    case kDtGather:  // Partial -> Shard(1): reduce-scatter
      r.grads[0] = n.fresh_for(0);
      r.collective = OpKind::reduce_scatter;
      return;
    case kDtReduceScatter:  // Shard(1) -> Replicate: all-gather
      r.grads[0] = n.fresh_for(0);
      r.collective = OpKind::all_gather;
      r.bytes = numel(n.in(0).shape) * dtype_size(n.dt);
      return;
    case kDtEmbedding: {  // embedding_dense_backward on the Replicate gradient: zeros [V, h] + index_add
      Shape full = n.in(0).shape;
      full[0] *= n.f.params.group_size;
      if (n.needs(0)) r.grads[0] = new_grad(n.b, "grad_embedding", full, n.in(0).dtype);
      r.collective = OpKind::backward;
      r.kernels = 2;
      return;
    }
    default:  // kDtNllLoss: grad_input = (exp(logp) - one_hot(target)) * grad / total_weight
      r.grads[0] = n.fresh_for(0);
      r.collective = OpKind::backward;
      r.kernels = 12;
      return;
  }
}

// issue 13: the backward of Megatron-LM's tensor-parallel regions (mappings.py), a collective.
void tp_region_backward(const Node& n, BackwardRule& r) {
  r.group_size = n.f.params.group_size;
  r.bytes = n.b.graph().view_bytes(n.g);
  if (n.f.params.start >= kDtFromLocal) return dtensor_backward(n, r);  // issue 13: DTensor
  switch (n.f.params.start) {
    case kTpCopyTo:  // _CopyToModelParallelRegion.backward: all_reduce(grad), in place
      r.grads[0] = n.g;
      r.collective = OpKind::all_reduce;
      return;
    case kTpReduceFrom:  // _ReduceFromModelParallelRegion.backward: the gradient itself
      r.grads[0] = n.g;
      r.kernels = 0;
      return;
    case kTpGatherFromSp:  // _GatherFromSequenceParallelRegion.backward: reduce-scatter into a shard
      r.grads[0] = n.fresh_for(0);
      r.collective = OpKind::reduce_scatter;
      return;
    default:  // _ReduceScatterToSequenceParallelRegion / _ScatterToSequenceParallelRegion: all-gather
      r.grads[0] = n.fresh_for(0);
      r.collective = OpKind::all_gather;
      r.bytes = numel(n.in(0).shape) * dtype_size(n.dt);
      return;
  }
}

}  // namespace

BackwardRule backward_rule(Builder& b, const Op& f, TensorId g) {
  const Tensor& gt = b.graph().tensor(g);  // tensors never move while the graph grows
  const Node n{.b = b, .f = f, .g = g, .gt = gt, .dt = gt.dtype};
  BackwardRule r;
  r.grads.assign(f.inputs.size(), kNoTensor);
  if (is_tp_region(f)) {  // issue 13: tensor parallelism
    tp_region_backward(n, r);
    return r;
  }
  switch (f.kind) {
    case OpKind::view: view_backward(n, r); break;
    case OpKind::copy:
    case OpKind::add_scalar: pass_through_backward(n, r); break;
    case OpKind::add: add_backward(n, r); break;
    case OpKind::sub: sub_backward(n, r); break;
    case OpKind::mul: mul_backward(n, r); break;
    case OpKind::mm:
    case OpKind::addmm:
    case OpKind::bmm: matmul_backward(n, r); break;
    case OpKind::layer_norm:
    case OpKind::flash_attention: three_inputs_backward(n, r); break;
    case OpKind::stack: stack_backward(n, r); break;
    case OpKind::embedding: case OpKind::index_rows:
    case OpKind::mul_scalar: case OpKind::div_scalar: case OpKind::pow_scalar: case OpKind::rsqrt:
    case OpKind::mean_last: case OpKind::gelu_tanh: case OpKind::silu: case OpKind::softmax:
    case OpKind::log_softmax: case OpKind::masked_fill: case OpKind::native_dropout: case OpKind::nll_loss:
      first_input_backward(n, r);
      break;
    case OpKind::neg:   // NegBackward0: grad.neg()
    case OpKind::tanh:  // TanhBackward0: tanh_backward(grad, result)
      first_input_backward(n, r);
      break;
    case OpKind::cat: cat_backward(n, r); break;
    case OpKind::cast: cast_backward(n, r); break;
    case OpKind::topk: first_input_backward(n, r); break;  // TopkBackward0: zeros(self) scattered
    case OpKind::sum_dim: sum_dim_backward(n, r); break;
    case OpKind::div_inplace: div_backward(n, r); break;
    case OpKind::grouped_mm: grouped_mm_backward(n, r); break;
    default:
      ACTSIM_ASSERT(false, fmt::format("no backward for op kind {}", to_string(f.kind)));
  }
  return r;
}

}  // namespace actsim::graph
