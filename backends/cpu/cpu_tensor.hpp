// Private to the CPU backend: strided loads and stores between backend buffers and contiguous
// vectors in the compute type (float for f32/bf16/f16, double for f64), plus the small helpers
// every CPU kernel uses. A kernel loads all its inputs first, computes on contiguous arrays in
// logical (row-major) order, and stores once, rounding to the destination dtype: so an output may
// alias an input, and the numerics are "compute in acc, round once" as docs/kernels.md states.
//
//   std::vector<float> x = cpu::load<float>(call.inputs[0]);     // logical order, any strides
//   for (float& v : x) v = v * 2;
//   cpu::store(call.outputs[0], x);                               // rounds to the output's dtype
#pragma once

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "actsim/backends/backend.hpp"
#include "actsim/util/bf16.hpp"

namespace actsim::backends::cpu {

using graph::DType;
using graph::Shape;
using graph::Strides;

// IEEE half <-> float, round to nearest even (the algorithm of c10/util/Half.h, from FP16).
inline float bits_to_f32(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline uint32_t f32_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}
inline float from_f16(uint16_t h) {
  const uint32_t w = static_cast<uint32_t>(h) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const float normalized = bits_to_f32((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const float denormalized = bits_to_f32((two_w >> 17) | (126u << 23)) - 0.5f;
  const uint32_t r = sign | (two_w < (1u << 27) ? f32_to_bits(denormalized) : f32_to_bits(normalized));
  return bits_to_f32(r);
}
inline uint16_t to_f16(float f) {
  float base = (__builtin_fabsf(f) * 0x1.0p+112f) * 0x1.0p-110f;
  const uint32_t w = f32_to_bits(f);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  if (bias < 0x71000000u) bias = 0x71000000u;
  base = bits_to_f32((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = f32_to_bits(base);
  const uint32_t nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
  return static_cast<uint16_t>((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}

inline int64_t numel(const TensorArg& t) { return graph::numel(t.shape); }

// Calls f(storage_offset) for every element of (shape, strides, offset) in logical order.
template <class F>
void for_each_offset(const Shape& shape, const Strides& strides, int64_t offset, F&& f) {
  const int r = static_cast<int>(shape.size());
  if (r == 0) {
    f(offset);
    return;
  }
  for (int64_t e : shape) {
    if (e == 0) return;
  }
  std::vector<int64_t> idx(r, 0);
  const int64_t inner = shape[r - 1], inner_stride = strides[r - 1];
  int64_t off = offset;
  while (true) {
    for (int64_t j = 0; j < inner; ++j) f(off + j * inner_stride);
    int d = r - 2;
    for (; d >= 0; --d) {
      off += strides[d];
      if (++idx[d] < shape[d]) break;
      off -= shape[d] * strides[d];
      idx[d] = 0;
    }
    if (d < 0) return;
  }
}

[[noreturn]] inline void unsupported_dtype(DType t, const char* what) {
  throw std::runtime_error(std::string("cpu backend: unsupported dtype ") + std::string(graph::to_string(t)) +
                           " for " + what);
}

// The tensor's elements in logical order, converted to A (float or double).
template <class A>
std::vector<A> load(const TensorArg& t) {
  std::vector<A> out(static_cast<size_t>(numel(t)));
  size_t i = 0;
  auto go = [&](auto* p, auto conv) { for_each_offset(t.shape, t.strides, t.offset, [&](int64_t o) { out[i++] = conv(p[o]); }); };
  switch (t.dtype) {
    case DType::f32: go(static_cast<const float*>(t.base), [](float v) { return static_cast<A>(v); }); break;
    case DType::f64: go(static_cast<const double*>(t.base), [](double v) { return static_cast<A>(v); }); break;
    case DType::bf16: go(static_cast<const uint16_t*>(t.base), [](uint16_t v) { return static_cast<A>(util::from_bf16(v)); }); break;
    case DType::f16: go(static_cast<const uint16_t*>(t.base), [](uint16_t v) { return static_cast<A>(from_f16(v)); }); break;
    case DType::i64: go(static_cast<const int64_t*>(t.base), [](int64_t v) { return static_cast<A>(v); }); break;
    case DType::i32: go(static_cast<const int32_t*>(t.base), [](int32_t v) { return static_cast<A>(v); }); break;
    case DType::b8: case DType::u8: go(static_cast<const uint8_t*>(t.base), [](uint8_t v) { return static_cast<A>(v); }); break;
  }
  return out;
}

// Writes `v` (logical order) into the tensor, rounding to its dtype.
template <class A>
void store(const TensorArg& t, const std::vector<A>& v) {
  if (static_cast<int64_t>(v.size()) != numel(t)) throw std::runtime_error("cpu backend: store size mismatch");
  size_t i = 0;
  auto go = [&](auto* p, auto conv) { for_each_offset(t.shape, t.strides, t.offset, [&](int64_t o) { p[o] = conv(v[i++]); }); };
  switch (t.dtype) {
    case DType::f32: go(static_cast<float*>(t.base), [](A x) { return static_cast<float>(x); }); break;
    case DType::f64: go(static_cast<double*>(t.base), [](A x) { return static_cast<double>(x); }); break;
    case DType::bf16: go(static_cast<uint16_t*>(t.base), [](A x) { return util::to_bf16(static_cast<float>(x)); }); break;
    case DType::f16: go(static_cast<uint16_t*>(t.base), [](A x) { return to_f16(static_cast<float>(x)); }); break;
    case DType::i64: go(static_cast<int64_t*>(t.base), [](A x) { return static_cast<int64_t>(x); }); break;
    case DType::i32: go(static_cast<int32_t*>(t.base), [](A x) { return static_cast<int32_t>(x); }); break;
    case DType::b8: case DType::u8: go(static_cast<uint8_t*>(t.base), [](A x) { return static_cast<uint8_t>(x != A(0)); }); break;
  }
}

// Index tensors (i64, i32) in logical order.
inline std::vector<int64_t> load_index(const TensorArg& t) {
  std::vector<int64_t> out(static_cast<size_t>(numel(t)));
  size_t i = 0;
  if (t.dtype == DType::i64) {
    auto* p = static_cast<const int64_t*>(t.base);
    for_each_offset(t.shape, t.strides, t.offset, [&](int64_t o) { out[i++] = p[o]; });
  } else if (t.dtype == DType::i32) {
    auto* p = static_cast<const int32_t*>(t.base);
    for_each_offset(t.shape, t.strides, t.offset, [&](int64_t o) { out[i++] = p[o]; });
  } else {
    unsupported_dtype(t.dtype, "an index tensor");
  }
  return out;
}
inline void store_index(const TensorArg& t, const std::vector<int64_t>& v) { store<double>(t, std::vector<double>(v.begin(), v.end())); }

// Masks in logical order: any nonzero byte (or nonzero value of another dtype) is true.
inline std::vector<uint8_t> load_mask(const TensorArg& t) {
  if (t.dtype == DType::b8 || t.dtype == DType::u8) {
    std::vector<uint8_t> out(static_cast<size_t>(numel(t)));
    size_t i = 0;
    auto* p = static_cast<const uint8_t*>(t.base);
    for_each_offset(t.shape, t.strides, t.offset, [&](int64_t o) { out[i++] = p[o] != 0; });
    return out;
  }
  std::vector<double> v = load<double>(t);
  std::vector<uint8_t> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = v[i] != 0;
  return out;
}
inline void store_mask(const TensorArg& t, const std::vector<uint8_t>& v) {
  std::vector<double> d(v.begin(), v.end());
  store<double>(t, d);
}

// A view of `t` broadcast to `shape` (right-aligned, stride 0 along expanded dims).
inline TensorArg broadcast_to(const TensorArg& t, const Shape& shape) {
  TensorArg r = t;
  r.shape = shape;
  r.strides.assign(shape.size(), 0);
  const size_t lead = shape.size() - t.shape.size();
  if (t.shape.size() > shape.size()) throw std::runtime_error("cpu backend: cannot broadcast to a lower rank");
  for (size_t i = 0; i < t.shape.size(); ++i) {
    if (t.shape[i] == shape[lead + i]) r.strides[lead + i] = t.strides[i];
    else if (t.shape[i] != 1) throw std::runtime_error("cpu backend: shapes do not broadcast");
  }
  return r;
}

// The view of `t` with dims d0 and d1 swapped.
inline TensorArg transposed(const TensorArg& t, size_t d0, size_t d1) {
  TensorArg r = t;
  std::swap(r.shape[d0], r.shape[d1]);
  std::swap(r.strides[d0], r.strides[d1]);
  return r;
}

// Broadcast shape of a and b (right-aligned).
inline Shape broadcast_shape(const Shape& a, const Shape& b) {
  Shape out(std::max(a.size(), b.size()));
  for (size_t i = 0; i < out.size(); ++i) {
    const int64_t da = i < out.size() - a.size() ? 1 : a[i - (out.size() - a.size())];
    const int64_t db = i < out.size() - b.size() ? 1 : b[i - (out.size() - b.size())];
    if (da != db && da != 1 && db != 1) throw std::runtime_error("cpu backend: shapes do not broadcast");
    out[i] = std::max(da, db);
  }
  return out;
}

}  // namespace actsim::backends::cpu
