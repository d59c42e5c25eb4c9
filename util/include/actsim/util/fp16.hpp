// actsim::util — IEEE half (fp16) storage helpers, next to bf16.hpp: round to nearest even, the
// algorithm of c10/util/Half.h (from the FP16 library), so values match PyTorch's bit for bit.
//
//   uint16_t h = util::to_f16(1.5f);     // round to nearest even; NaN stays NaN, overflow is inf
//   float f = util::from_f16(h);         // exact
#pragma once

#include <cstdint>
#include <cstring>

namespace actsim::util {

inline float f16_bits_to_f32(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline uint32_t f16_f32_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

inline float from_f16(uint16_t h) {
  const uint32_t w = static_cast<uint32_t>(h) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const float normalized = f16_bits_to_f32((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const float denormalized = f16_bits_to_f32((two_w >> 17) | (126u << 23)) - 0.5f;
  const uint32_t r = sign | (two_w < (1u << 27) ? f16_f32_to_bits(denormalized) : f16_f32_to_bits(normalized));
  return f16_bits_to_f32(r);
}

inline uint16_t to_f16(float f) {
  float base = (__builtin_fabsf(f) * 0x1.0p+112f) * 0x1.0p-110f;
  const uint32_t w = f16_f32_to_bits(f);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  if (bias < 0x71000000u) bias = 0x71000000u;
  base = f16_bits_to_f32((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = f16_f32_to_bits(base);
  const uint32_t nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
  return static_cast<uint16_t>((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}

}  // namespace actsim::util
