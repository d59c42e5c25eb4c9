// torch.autocast as the lowering meets it (training.autocast): the casts an op's autocast wrapper
// makes before the op runs (aten/src/ATen/autocast_mode.h WrapFunction_ and cached_cast), by the
// profile's op lists (profile.cpp kAutocastCpu / kAutocastCuda). Used by the builder's entry points.
#include <algorithm>

#include "builder.hpp"

namespace actsim::graph {
namespace {

// TensorImpl::is_non_overlapping_and_dense: the strides are a permutation of dense strides.
bool non_overlapping_and_dense(const Shape& shape, const Strides& strides) {
  std::vector<size_t> dims;
  for (size_t d = 0; d < shape.size(); ++d) {
    if (shape[d] != 1) dims.push_back(d);
  }
  std::stable_sort(dims.begin(), dims.end(), [&](size_t a, size_t b) { return strides[a] < strides[b]; });
  int64_t expected = 1;
  for (size_t d : dims) {
    if (strides[d] != expected) return false;
    expected *= shape[d];
  }
  return true;
}

// at::promoteTypes for the floating dtypes autocast meets: f64 > f32 > {bf16, f16}; bf16 with f16
// gives f32.
DType promote(DType a, DType b) {
  if (a == b) return a;
  if (a == DType::f64 || b == DType::f64) return DType::f64;
  return DType::f32;
}

}  // namespace

TensorId Builder::cast(TensorId x, DType dt, const std::string& name) {
  if (T(x).dtype == dt) return x;
  const Shape shape = T(x).shape;
  TensorId out = fresh(name, shape, dt);
  // _to_copy with preserve_format: empty_strided with the input's strides when it is
  // non-overlapping and dense, else a contiguous tensor.
  if (non_overlapping_and_dense(shape, T(x).strides)) g_.mutable_tensor(out).strides = T(x).strides;
  emit({.kind = OpKind::cast, .name = name, .inputs = {x}, .outputs = {out}, .bytes_moved = bytes(x) + bytes(out)});
  return out;
}

Builder::Excluded Builder::autocast_args(OpKind k, std::initializer_list<TensorId*> args) {
  const bool on = autocast_ != DType::f32 && excluded_ == 0 && phase_ == Phase::forward;
  const CastPolicy policy = on ? prof_.autocast_policy(k) : CastPolicy::none;
  if (policy == CastPolicy::promote) {
    DType to = DType::f32;
    bool first = true;
    for (TensorId* a : args) {
      if (!is_floating(T(*a).dtype)) continue;
      to = first ? T(*a).dtype : promote(to, T(*a).dtype);
      first = false;
    }
    for (TensorId* a : args) {
      if (is_floating(T(*a).dtype)) *a = cast(*a, to, "autocast.to");
    }
  } else if (policy == CastPolicy::lower_precision_fp) {
    for (TensorId* a : args) {
      const Tensor& t = T(*a);
      if (!is_floating(t.dtype) || t.dtype == autocast_ || t.dtype == DType::f64) continue;
      // cached_cast: a leaf float32 parameter's cast is cached until the autocast region ends.
      const bool cacheable = t.dtype == DType::f32 && t.requires_grad && t.producer == kNoOp && !t.is_view &&
                             g_.storage(t.storage).category == Category::parameter;
      if (cacheable) {
        auto it = cast_of_.find(index(*a));
        if (it == cast_of_.end()) {
          TensorId c = cast(*a, autocast_, "autocast.weight_cast");
          it = cast_of_.emplace(index(*a), c).first;
          cast_cache.push_back(c);
        }
        *a = it->second;
      } else {
        *a = cast(*a, autocast_, "autocast.to");
      }
    }
  } else if (policy == CastPolicy::fp32 || policy == CastPolicy::fp32_set_opt_dtype) {
    // fp32_set_opt_dtype calls the op with dtype=float32, which converts its (first) input the
    // same way: one float32 copy that the op reads and autograd does not keep.
    for (TensorId* a : args) {
      const Tensor& t = T(*a);
      if (is_floating(t.dtype) && (t.dtype == DType::bf16 || t.dtype == DType::f16)) *a = cast(*a, DType::f32, "autocast.to");
    }
  }
  return Excluded(this);
}

}  // namespace actsim::graph
