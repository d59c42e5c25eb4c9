#include "builder.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>

#include "actsim/util/error.hpp"

namespace actsim::graph {

std::optional<Strides> view_strides(const Shape& oldshape, const Strides& oldstride, const Shape& newshape) {
  // Port of at::detail::computeStride (aten/src/ATen/TensorUtils.cpp).
  if (oldshape.empty()) return Strides(newshape.size(), 1);
  const int64_t n = numel(oldshape);
  if (n == 0) {
    if (oldshape == newshape) return oldstride;
    return contiguous_strides(newshape);
  }
  Strides newstride(newshape.size());
  int64_t view_d = static_cast<int64_t>(newshape.size()) - 1;
  int64_t chunk_base_stride = oldstride.back();
  int64_t tensor_numel = 1, view_numel = 1;
  for (int64_t tensor_d = static_cast<int64_t>(oldshape.size()) - 1; tensor_d >= 0; tensor_d--) {
    tensor_numel *= oldshape[tensor_d];
    if (tensor_d == 0 ||
        (oldshape[tensor_d - 1] != 1 && oldstride[tensor_d - 1] != tensor_numel * chunk_base_stride)) {
      while (view_d >= 0 && (view_numel < tensor_numel || newshape[view_d] == 1)) {
        newstride[view_d] = view_numel * chunk_base_stride;
        view_numel *= newshape[view_d];
        view_d--;
      }
      if (view_numel != tensor_numel) return std::nullopt;
      if (tensor_d > 0) {
        chunk_base_stride = oldstride[tensor_d - 1];
        tensor_numel = 1;
        view_numel = 1;
      }
    }
  }
  if (view_d != -1) return std::nullopt;
  return newstride;
}

bool is_contiguous(const Shape& shape, const Strides& strides) {
  int64_t expected = 1;
  for (size_t i = shape.size(); i-- > 0;) {
    if (shape[i] == 1) continue;
    if (strides[i] != expected) return false;
    expected *= shape[i];
  }
  return true;
}

Strides dense_strides_like(const Shape& shape, const Strides& like) {
  std::vector<size_t> order(shape.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  // innermost first: ascending stride, ties keep the later dim inner (as contiguous tensors have)
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) { return like[a] > like[b]; });
  Strides out(shape.size());
  int64_t step = 1;
  for (size_t i = order.size(); i-- > 0;) {
    out[order[i]] = step;
    step *= shape[order[i]];
  }
  return out;
}

namespace {
int norm_dim(int d, size_t rank) { return d < 0 ? d + static_cast<int>(rank) : d; }

Shape broadcast(const Shape& a, const Shape& b) {
  Shape out(std::max(a.size(), b.size()));
  for (size_t i = 0; i < out.size(); ++i) {
    int64_t da = i < out.size() - a.size() ? 1 : a[i - (out.size() - a.size())];
    int64_t db = i < out.size() - b.size() ? 1 : b[i - (out.size() - b.size())];
    ACTSIM_ASSERT(da == db || da == 1 || db == 1, "shapes do not broadcast");
    out[i] = std::max(da, db);
  }
  return out;
}
}  // namespace

TensorId Builder::leaf(const std::string& name, const Shape& shape, DType dt, Category c,
                       bool requires_grad, Location loc) {
  if (replaying_) {
    ACTSIM_ASSERT(next_leaf_ < leaves_.size(), "a replayed forward makes more leaves than the first: " + name);
    const TensorId t = leaves_[next_leaf_++];
    ACTSIM_ASSERT(T(t).name == name && T(t).shape == shape && T(t).dtype == dt,
                  "a replayed forward's leaf differs from the first's: " + name);
    return t;
  }
  StorageId s = g_.add_storage({.bytes = numel(shape) * dtype_size(dt), .category = c, .location = loc,
                                .layer = layer_});
  leaves_.push_back(g_.add_tensor({.name = name, .shape = shape, .dtype = dt, .storage = s, .requires_grad = requires_grad}));
  return leaves_.back();
}

TensorId Builder::stash_rng(const std::string& name) {
  StorageId s = g_.add_storage({.bytes = kCpuRngStateBytes, .category = Category::temporary,
                                .location = prof_.rng_state_location, .layer = layer_});
  TensorId t = g_.add_tensor({.name = qualify(name), .shape = {kCpuRngStateBytes}, .dtype = DType::u8, .storage = s});
  // A host-side copy of 5 KiB: no kernel, no time worth modelling.
  emit({.kind = OpKind::rng_stash, .name = name, .outputs = {t}, .kernels = 0});
  return t;
}

void Builder::begin_checkpoint_call(int32_t r) {
  if (rng_stash.count(r)) return;
  if (!ckpt_preserve_rng) {
    rng_stash[r] = kNoTensor;
    return;
  }
  const TensorId t = stash_rng("checkpoint.rng_state");
  if (ckpt_reentrant) g_.mutable_storage(T(t).storage).keep = true;  // CheckpointFunction's ctx.fwd_cpu_state
  rng_stash[r] = t;
}

void Builder::checkpoint_kwargs(std::initializer_list<TensorId> ts) {
  if (region_ < 0) return;
  std::vector<TensorId>& held = ckpt_kwargs[region_];
  for (TensorId t : ts) {
    if (t == kNoTensor || std::find(held.begin(), held.end(), t) != held.end()) continue;
    held.push_back(t);
    if (ckpt_reentrant) g_.mutable_storage(T(t).storage).keep = true;
  }
}

TensorId Builder::fresh(std::string_view name, Shape shape, DType dt, Category c) {
  StorageId s = g_.add_storage({.bytes = numel(shape) * dtype_size(dt), .category = c, .layer = layer_});
  return g_.add_tensor({.name = qualify(name), .shape = std::move(shape), .dtype = dt, .storage = s});
}

TensorId Builder::alias(TensorId base, std::string name, Shape shape, Strides strides, int64_t offset) {
  if (!names_) name.clear();
  Tensor t{.name = std::move(name), .shape = std::move(shape), .strides = std::move(strides), .offset = offset,
           .dtype = T(base).dtype, .storage = T(base).storage, .is_view = true};
  return g_.add_tensor(std::move(t));
}

OpId Builder::emit(Op op) {
  op.layer = layer_;
  op.phase = phase_;
  if (phase_ == Phase::forward) {
    op.region = region_;
    op.offload = offload_;
    if (region_ >= 0 && cached_) {
      for (OpKind k : *cached_) op.cached = op.cached || k == op.kind;
    }
  }
  op.name = qualify(op.name);
  bool any_grad = false;
  for (TensorId t : op.inputs) any_grad = any_grad || T(t).requires_grad;
  if (any_grad) {
    // Outputs that are differentiable (floating point) require grad; statistics and masks too
    // carry the flag in PyTorch only for output 0 of multi-output ops, which is what matters here.
    for (size_t i = 0; i < op.outputs.size(); ++i) {
      Tensor& t = g_.mutable_tensor(op.outputs[i]);
      if (is_floating(t.dtype) && (i == 0 || op.kind == OpKind::view)) t.requires_grad = true;
    }
    if (const SaveRule* r = prof_.rule(op.kind)) {
      op.saved.reserve(op.saved.size() + static_cast<size_t>(r->n_saves));
      for (int i = 0; i < r->n_saves; ++i) {
        const SaveSlot& s = r->saves[i];
        if (s.if_grad_of != kAlways &&
            (s.if_grad_of >= static_cast<int>(op.inputs.size()) || !T(op.inputs[s.if_grad_of]).requires_grad)) {
          continue;
        }
        if (s.slot >= kOut) {
          if (s.slot - kOut < static_cast<int>(op.outputs.size())) op.saved.push_back(op.outputs[s.slot - kOut]);
        } else if (s.slot < static_cast<int>(op.inputs.size())) {
          op.saved.push_back(op.inputs[s.slot]);
        }
      }
    }
  }
  const bool offload_saves = op.offload && !op.saved.empty();
  TensorIds saved = offload_saves ? op.saved : TensorIds{};
  const OpId id = g_.add_op(std::move(op));
  // Offload (save_on_cpu with a copy stream): each newly saved activation is copied to pinned host
  // memory as soon as it exists; the device copy is freed once forward no longer needs it.
  for (TensorId t : saved) {
    const StorageId sid = T(t).storage;
    const Storage& st = g_.storage(sid);
    if (st.category != Category::activation || st.location != Location::device || offloaded.count(index(sid))) continue;
    StorageId hs = g_.add_storage({.bytes = st.bytes, .category = Category::activation, .location = Location::host,
                                   .layer = layer_});
    const Tensor& tt = T(t);
    TensorId h = g_.add_tensor({.name = tt.name + ".host", .shape = tt.shape, .strides = tt.strides,
                                .offset = tt.offset, .dtype = tt.dtype, .storage = hs});
    g_.add_op({.kind = OpKind::offload, .phase = Phase::forward, .layer = layer_, .name = tt.name + ".offload",
               .inputs = {t}, .outputs = {h}, .bytes_moved = st.bytes, .stream = 1});
    offloaded[index(sid)] = {h, layer_};
    offload_order.push_back(index(sid));
  }
  return id;
}

void Builder::hold_until_last(TensorId t) {
  ACTSIM_ASSERT(g_.n_ops() > 0, "hold before any op");
  g_.mutable_op(OpId{static_cast<uint32_t>(g_.n_ops() - 1)}).holds.push_back(t);
}

TensorId Builder::view_op(TensorId x, Shape shape, Strides strides, int64_t offset, OpParams params,
                          std::string_view what) {
  TensorId out = alias(x, qualify(what), std::move(shape), std::move(strides), offset);
  emit({.kind = OpKind::view, .name = std::string(what), .inputs = {x}, .outputs = {out}, .kernels = 0,
        .params = params});
  return out;
}

TensorId Builder::view(TensorId x, const Shape& shape) {
  auto st = view_strides(T(x).shape, T(x).strides, shape);
  ACTSIM_ASSERT(st.has_value(), "view of a non-viewable tensor: " + T(x).name);
  return view_op(x, shape, std::move(*st), T(x).offset, {.view = ViewKind::reshape}, "view");
}

TensorId Builder::reshape(TensorId x, const Shape& shape) {
  if (T(x).shape == shape) return x;
  if (auto st = view_strides(T(x).shape, T(x).strides, shape)) {
    return view_op(x, shape, std::move(*st), T(x).offset, {.view = ViewKind::reshape}, "reshape");
  }
  // at::reshape: _unsafe_view(self.clone(at::MemoryFormat::Contiguous), shape)
  TensorId c = contiguous(x);
  return view_op(c, shape, contiguous_strides(shape), 0, {.view = ViewKind::reshape}, "reshape");
}

TensorId Builder::transpose(TensorId x, int d0, int d1) {
  const Tensor& t = T(x);
  d0 = norm_dim(d0, t.shape.size());
  d1 = norm_dim(d1, t.shape.size());
  Shape sh = t.shape;
  Strides st = t.strides;
  std::swap(sh[d0], sh[d1]);
  std::swap(st[d0], st[d1]);
  return view_op(x, std::move(sh), std::move(st), t.offset,
                 {.view = ViewKind::transpose, .dim0 = static_cast<int16_t>(d0), .dim1 = static_cast<int16_t>(d1)},
                 "transpose");
}

TensorId Builder::unsqueeze(TensorId x, int dim) {
  const Tensor& t = T(x);
  dim = norm_dim(dim, t.shape.size() + 1);
  Shape sh = t.shape;
  Strides st = t.strides;
  int64_t s = dim < static_cast<int>(sh.size()) ? sh[dim] * st[dim] : 1;
  sh.insert(sh.begin() + dim, 1);
  st.insert(st.begin() + dim, s);
  return view_op(x, std::move(sh), std::move(st), t.offset, {.view = ViewKind::unsqueeze, .dim0 = static_cast<int16_t>(dim)}, "unsqueeze");
}

TensorId Builder::expand(TensorId x, const Shape& shape) {
  const Tensor& t = T(x);
  ACTSIM_ASSERT(shape.size() == t.shape.size(), "expand rank");
  Strides st = t.strides;
  for (size_t i = 0; i < shape.size(); ++i) {
    if (t.shape[i] != shape[i]) {
      ACTSIM_ASSERT(t.shape[i] == 1, "expand of a non-singleton dim");
      st[i] = 0;
    }
  }
  return view_op(x, shape, std::move(st), t.offset, {.view = ViewKind::expand}, "expand");
}

std::vector<TensorId> Builder::split(TensorId x, int64_t size, int dim) {
  // One autograd node (SplitBackward0) with several outputs.
  const Tensor& t = T(x);
  dim = norm_dim(dim, t.shape.size());
  std::vector<TensorId> outs;
  for (int64_t start = 0; start < t.shape[dim]; start += size) {
    Shape sh = T(x).shape;
    sh[dim] = std::min(size, T(x).shape[dim] - start);
    std::string name = names_ ? qualify(fmt::format("split{}", outs.size())) : std::string();
    outs.push_back(alias(x, std::move(name), std::move(sh), T(x).strides, T(x).offset + start * T(x).strides[dim]));
  }
  emit({.kind = OpKind::view, .name = "split", .inputs = {x}, .outputs = outs, .kernels = 0,
        .params = {.view = ViewKind::split, .dim0 = static_cast<int16_t>(dim), .start = size}});
  return outs;
}

TensorId Builder::slice(TensorId x, int dim, int64_t start, int64_t end, int64_t step) {
  const Tensor& t = T(x);
  dim = norm_dim(dim, t.shape.size());
  end = std::min(end, t.shape[dim]);
  Shape sh = t.shape;
  Strides st = t.strides;
  sh[dim] = (end - start + step - 1) / step;
  st[dim] *= step;
  return view_op(x, std::move(sh), std::move(st), t.offset + start * t.strides[dim],
                 {.view = ViewKind::slice, .dim0 = static_cast<int16_t>(dim), .start = start, .step = step}, "slice");
}

TensorId Builder::contiguous(TensorId x) {
  if (is_contiguous(T(x).shape, T(x).strides)) return x;
  TensorId out = fresh("contiguous", T(x).shape, T(x).dtype);
  emit({.kind = OpKind::copy, .name = "contiguous", .inputs = {x}, .outputs = {out}, .bytes_moved = 2 * bytes(x)});
  return out;
}

TensorId Builder::arange(int64_t n) {
  TensorId out = fresh("arange", {n}, DType::i64);
  emit({.kind = OpKind::arange, .name = "arange", .outputs = {out}, .bytes_moved = bytes(out)});
  return out;
}

TensorId Builder::ones_bool(int64_t rows, int64_t cols) {
  TensorId out = fresh("ones", {rows, cols}, DType::b8);
  emit({.kind = OpKind::ones, .name = "ones", .outputs = {out}, .bytes_moved = bytes(out)});
  return out;
}

TensorId Builder::triu(TensorId x, int64_t diagonal) {
  TensorId out = fresh("triu", T(x).shape, T(x).dtype);
  emit({.kind = OpKind::triu, .name = "triu", .inputs = {x}, .outputs = {out}, .bytes_moved = 2 * bytes(x),
        .params = {.start = diagonal}});
  return out;
}

TensorId Builder::eq_scalar(TensorId x, double v) {
  TensorId out = fresh("eq", T(x).shape, DType::b8);
  emit({.kind = OpKind::eq_scalar, .name = "eq", .inputs = {x}, .outputs = {out},
        .flops = static_cast<double>(numel(T(x).shape)), .bytes_moved = bytes(x) + bytes(out),
        .params = {.scalar = v}});
  return out;
}

TensorId Builder::embedding(TensorId weight, TensorId idx) {
  Shape sh = T(idx).shape;
  sh.push_back(T(weight).shape[1]);
  TensorId out = fresh("embedding", sh, T(weight).dtype);
  emit({.kind = OpKind::embedding, .name = "embedding", .inputs = {weight, idx}, .outputs = {out},
        .bytes_moved = 2 * bytes(out) + bytes(idx)});
  return out;
}

TensorId Builder::index_rows(TensorId table, TensorId idx) {
  Shape sh = T(idx).shape;
  sh.push_back(T(table).shape[1]);
  TensorId out = fresh("index", sh, T(table).dtype);
  emit({.kind = OpKind::index_rows, .name = "index", .inputs = {table, idx}, .outputs = {out},
        .bytes_moved = 2 * bytes(out) + bytes(idx)});
  return out;
}

TensorId Builder::binary(OpKind k, TensorId a, TensorId b) {
  Shape sh = broadcast(T(a).shape, T(b).shape);
  // Type promotion (c10::promoteTypes): under autocast a float32 residual meets a bf16 sublayer
  // output. A 0-dim operand of the same category does not decide the dtype.
  DType dt = T(a).dtype;
  if (T(b).dtype != dt && is_floating(dt) && is_floating(T(b).dtype)) {
    if (T(a).shape.empty() != T(b).shape.empty()) dt = T(a).shape.empty() ? T(b).dtype : dt;
    else dt = (dt == DType::f64 || T(b).dtype == DType::f64) ? DType::f64 : DType::f32;
  }
  TensorId out = fresh(std::string(to_string(k)), sh, dt);
  emit({.kind = k, .name = std::string(to_string(k)), .inputs = {a, b}, .outputs = {out},
        .flops = static_cast<double>(numel(sh)), .bytes_moved = bytes(a) + bytes(b) + bytes(out)});
  return out;
}

TensorId Builder::scalar_op(OpKind k, TensorId x, double s) {
  auto ac = autocast_args(k, {&x});
  TensorId out = fresh(std::string(to_string(k)), T(x).shape, T(x).dtype);
  Op op{.kind = k, .name = std::string(to_string(k)), .inputs = {x}, .outputs = {out},
        .flops = static_cast<double>(numel(T(x).shape)), .bytes_moved = bytes(x) + bytes(out),
        .params = {.scalar = s}};
  if (k == OpKind::mul_scalar || k == OpKind::div_scalar || k == OpKind::add_scalar) {
    // `x * 0.125` calls mul.Tensor with the number wrapped as a 0-dim float64 CPU tensor
    // (python_arg_parser); mul and div keep it for backward, add only while it runs.
    StorageId ss = g_.add_storage({.bytes = 8,
                                   .category = k == OpKind::add_scalar ? Category::temporary : Category::activation,
                                   .location = prof_.scalar_location, .layer = layer_});
    op.outputs.push_back(g_.add_tensor({.name = qualify("scalar"), .shape = {}, .dtype = DType::f64, .storage = ss}));
    // ... and TensorIterator casts it to the operand's dtype for the kernel.
    if (prof_.scalar_location == Location::device) op.workspace_bytes = dtype_size(T(x).dtype);
  }
  emit(std::move(op));
  return out;
}

TensorId Builder::unary(OpKind k, TensorId x) {
  auto ac = autocast_args(k, {&x});
  TensorId out = fresh(std::string(to_string(k)), T(x).shape, T(x).dtype);
  double per = (k == OpKind::gelu_tanh) ? 8 : (k == OpKind::softmax || k == OpKind::log_softmax) ? 5 : 4;
  emit({.kind = k, .name = std::string(to_string(k)), .inputs = {x}, .outputs = {out},
        .flops = per * static_cast<double>(numel(T(x).shape)), .bytes_moved = bytes(x) + bytes(out)});
  return out;
}

TensorId Builder::pow2(TensorId x) { return scalar_op(OpKind::pow_scalar, x, 2.0); }

TensorId Builder::mean_last(TensorId x) {
  Shape sh = T(x).shape;
  sh.back() = 1;
  TensorId out = fresh("mean", sh, T(x).dtype);
  emit({.kind = OpKind::mean_last, .name = "mean", .inputs = {x}, .outputs = {out},
        .flops = static_cast<double>(numel(T(x).shape)), .bytes_moved = bytes(x) + bytes(out)});
  return out;
}

namespace {
bool col_major(const Tensor& t) {
  const size_t r = t.shape.size();
  return t.shape[r - 2] > 1 && t.strides[r - 2] == 1 && t.strides[r - 1] == t.shape[r - 2];
}
}  // namespace

int64_t Builder::matmul_ws(TensorId a, int64_t batch, int64_t m, int64_t k, int64_t n) const {
  return prof_.matmul_workspace(T(a).dtype, batch, m, k, n, col_major(T(a)));
}

TensorId Builder::mm(TensorId a, TensorId b) {
  auto ac = autocast_args(OpKind::mm, {&a, &b});
  const int64_t m = T(a).shape[0], k = T(a).shape[1], n = T(b).shape[1];
  TensorId out = fresh("mm", {m, n}, T(a).dtype);
  emit({.kind = OpKind::mm, .name = "mm", .inputs = {a, b}, .outputs = {out},
        .workspace_bytes = matmul_ws(a, 1, m, k, n),
        .flops = 2.0 * m * n * k, .bytes_moved = bytes(a) + bytes(b) + bytes(out)});
  return out;
}

TensorId Builder::addmm(TensorId bias, TensorId a, TensorId b) {
  auto ac = autocast_args(OpKind::addmm, {&bias, &a, &b});
  const int64_t m = T(a).shape[0], k = T(a).shape[1], n = T(b).shape[1];
  TensorId out = fresh("addmm", {m, n}, T(a).dtype);
  emit({.kind = OpKind::addmm, .name = "addmm", .inputs = {bias, a, b}, .outputs = {out},
        .workspace_bytes = matmul_ws(a, 1, m, k, n),
        .flops = 2.0 * m * n * k + m * n, .bytes_moved = bytes(a) + bytes(b) + bytes(bias) + bytes(out)});
  return out;
}

TensorId Builder::bmm(TensorId a, TensorId b) {
  auto ac = autocast_args(OpKind::bmm, {&a, &b});
  const int64_t bs = T(a).shape[0], m = T(a).shape[1], k = T(a).shape[2], n = T(b).shape[2];
  TensorId out = fresh("bmm", {bs, m, n}, T(a).dtype);
  emit({.kind = OpKind::bmm, .name = "bmm", .inputs = {a, b}, .outputs = {out},
        .workspace_bytes = matmul_ws(a, bs, m, k, n),
        .flops = 2.0 * bs * m * n * k, .bytes_moved = bytes(a) + bytes(b) + bytes(out)});
  return out;
}

TensorId Builder::matmul(TensorId a, TensorId b) {
  auto ac = autocast_args(OpKind::mm, {&a, &b});  // aten::matmul is on the lists with mm and bmm
  const Shape sa = T(a).shape, sb = T(b).shape;
  if (sa.size() >= 3 && sb.size() == 2) {
    // at::native::matmul, dim1 >= 3 && dim2 == 2: fold the batch into the rows of one mm.
    Shape out_shape(sa.begin(), sa.end() - 1);
    out_shape.push_back(sb[1]);
    TensorId folded = reshape(a, {numel(sa) / sa.back(), sa.back()});
    TensorId prod = mm(folded, b);
    return view_op(prod, out_shape, contiguous_strides(out_shape), 0, {.view = ViewKind::reshape}, "unsafe_view");
  }
  ACTSIM_ASSERT(sa.size() == sb.size() && sa.size() >= 3, "matmul ranks");
  // Batched: expand both to the common batch shape, reshape to 3-D (copying when the layout
  // cannot be viewed), bmm, and _unsafe_view back.
  const size_t r = sa.size();
  Shape batch(sa.begin(), sa.end() - 2);
  int64_t nb = numel(batch);
  Shape ea = batch, eb = batch;
  ea.insert(ea.end(), {sa[r - 2], sa[r - 1]});
  eb.insert(eb.end(), {sb[r - 2], sb[r - 1]});
  TensorId a3 = reshape(expand(a, ea), {nb, sa[r - 2], sa[r - 1]});
  TensorId b3 = reshape(expand(b, eb), {nb, sb[r - 2], sb[r - 1]});
  TensorId prod = bmm(a3, b3);
  Shape out_shape = batch;
  out_shape.insert(out_shape.end(), {sa[r - 2], sb[r - 1]});
  return view_op(prod, out_shape, contiguous_strides(out_shape), 0, {.view = ViewKind::reshape}, "unsafe_view");
}

TensorId Builder::linear(TensorId x, TensorId w, std::optional<TensorId> b) {
  TensorId bias = b.value_or(kNoTensor);
  auto ac = b ? autocast_args(OpKind::addmm, {&x, &w, &bias}) : autocast_args(OpKind::mm, {&x, &w});
  if (b) b = bias;
  TensorId wt = transpose(w, 0, 1);
  const Shape sx = T(x).shape;
  if (b && sx.size() == 3 && is_contiguous(sx, T(x).strides)) {
    // _flatten_3d_linear: addmm on the flattened input, viewed back.
    TensorId flat = view(x, {sx[0] * sx[1], sx[2]});
    TensorId y = addmm(*b, flat, wt);
    return view(y, {sx[0], sx[1], T(w).shape[0]});
  }
  TensorId y = matmul(x, wt);
  ACTSIM_ASSERT(!b, "linear with bias on a non-contiguous input is not lowered");
  return y;
}

TensorId Builder::layer_norm(TensorId x, TensorId w, TensorId b) {
  auto ac = autocast_args(OpKind::layer_norm, {&x, &w, &b});
  Shape stat = T(x).shape;
  stat.back() = 1;
  DType sdt = (prof_.layer_norm_stats_fp32 && T(x).dtype != DType::f64) ? DType::f32 : T(x).dtype;
  TensorId out = fresh("layer_norm", T(x).shape, T(x).dtype);
  TensorId mean = fresh("layer_norm.mean", stat, sdt);
  TensorId rstd = fresh("layer_norm.rstd", stat, sdt);
  emit({.kind = OpKind::layer_norm, .name = "layer_norm", .inputs = {x, w, b}, .outputs = {out, mean, rstd},
        .flops = 8.0 * numel(T(x).shape), .bytes_moved = 2 * bytes(x) + bytes(mean) + bytes(rstd),
        .params = {.scalar = 1e-5}});
  return out;
}

TensorId Builder::masked_fill(TensorId x, TensorId mask) {
  TensorId out = fresh("masked_fill", T(x).shape, T(x).dtype);
  emit({.kind = OpKind::masked_fill, .name = "masked_fill", .inputs = {x, mask}, .outputs = {out},
        .flops = static_cast<double>(numel(T(x).shape)), .bytes_moved = 2 * bytes(x) + bytes(mask),
        .params = {.scalar = -INFINITY}});
  return out;
}

TensorId Builder::dropout(TensorId x, double p) {
  if (p == 0.0) return x;  // _dropout_impl / F.dropout return the input itself for p == 0
  if (prof_.dropout == DropoutImpl::noise_in_model_dtype) {
    TensorId noise = fresh("dropout.noise", T(x).shape, T(x).dtype);
    emit({.kind = OpKind::dropout_noise, .name = "dropout_noise", .outputs = {noise},
          .workspace_bytes = prof_.bernoulli_int_temp ? numel(T(x).shape) * 4 : 0,
          .flops = 2.0 * numel(T(x).shape), .bytes_moved = 2 * bytes(noise), .kernels = 3,
          .params = {.scalar = p}});
    return binary(OpKind::mul, x, noise);
  }
  TensorId out = fresh("dropout", T(x).shape, T(x).dtype);
  TensorId mask = fresh("dropout.mask", T(x).shape, DType::b8);
  emit({.kind = OpKind::native_dropout, .name = "dropout", .inputs = {x}, .outputs = {out, mask},
        .flops = 2.0 * numel(T(x).shape), .bytes_moved = 2 * bytes(x) + bytes(mask), .params = {.scalar = p}});
  return out;
}

TensorId Builder::stack_last(TensorId a, TensorId b) {
  auto ac = autocast_args(OpKind::stack, {&a, &b});
  Shape sh = T(a).shape;
  sh.push_back(2);
  TensorId out = fresh("stack", sh, T(a).dtype);
  emit({.kind = OpKind::stack, .name = "stack", .inputs = {a, b}, .outputs = {out},
        .bytes_moved = 2 * bytes(out), .params = {.dim0 = static_cast<int16_t>(sh.size() - 1)}});
  return out;
}

TensorId Builder::flash_attention(TensorId q, TensorId k, TensorId v, double p) {
  auto ac = autocast_args(OpKind::flash_attention, {&q, &k, &v});
  // FlashAttention-2 / SDPA flash backend: out (B, h, T, hd) and an fp32 log-sum-exp (B, h, T);
  // no T x T tensor exists. Dropout state is a philox seed/offset pair, not a mask.
  const Shape& sq = T(q).shape;
  TensorId out = fresh("sdpa", sq, T(q).dtype);
  // The output is allocated like the query (empty_like keeps its dim order): when q is a transposed
  // view of a (B, T, h, hd) projection, as in gpt2, so is the output, and the model's
  // out.transpose(1, 2).contiguous() copies nothing (checked on PyTorch 2.x: CPU flash kernel).
  g_.mutable_tensor(out).strides = dense_strides_like(sq, T(q).strides);
  TensorId lse = fresh("sdpa.logsumexp", {sq[0], sq[1], sq[2]}, DType::f32);
  const double flops = 4.0 * sq[0] * sq[1] * sq[2] * sq[2] * sq[3] / 2;  // causal: half the scores
  emit({.kind = OpKind::flash_attention, .name = "scaled_dot_product_attention", .inputs = {q, k, v},
        .outputs = {out, lse}, .flops = flops,
        .bytes_moved = bytes(q) + bytes(k) + bytes(v) + bytes(out) + bytes(lse), .params = {.scalar = p}});
  return out;
}

TensorId Builder::cross_entropy(TensorId logits2d, TensorId target1d) {
  // cross_entropy_loss on the CPU lists (fp32), log_softmax's fp32_set_opt_dtype on CUDA's: one
  // float32 copy of 16-bit logits either way.
  auto ac = autocast_args(OpKind::nll_loss, {&logits2d});
  TensorId logp = unary(OpKind::log_softmax, logits2d);
  TensorId loss = fresh("loss", {}, T(logits2d).dtype);
  TensorId total_weight = fresh("nll_loss.total_weight", {}, T(logits2d).dtype);
  emit({.kind = OpKind::nll_loss, .name = "nll_loss", .inputs = {logp, target1d}, .outputs = {loss, total_weight},
        .flops = static_cast<double>(numel(T(target1d).shape)), .bytes_moved = bytes(target1d) * 2});
  return loss;
}

}  // namespace actsim::graph
