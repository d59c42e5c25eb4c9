// actsim::util — bfloat16 storage helpers for the reference kernels (fp32 accumulation).
//
//   uint16_t h = util::to_bf16(1.5f);     // round to nearest even, NaN kept quiet
//   float f = util::from_bf16(h);         // exact
#pragma once

#include <cstdint>
#include <cstring>

namespace actsim::util {

inline float from_bf16(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// Round to nearest, ties to even (as PyTorch's c10::BFloat16 round_to_nearest_even).
inline uint16_t to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x0040u);  // quiet NaN
  const uint32_t rounding_bias = 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>((u + rounding_bias) >> 16);
}

}  // namespace actsim::util
