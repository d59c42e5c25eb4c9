// actsim::util — the counter-based generator behind every random number a kernel draws
// (dropout). Stateless: the value for element `i` of an op depends only on (seed, i), so CPU and
// CUDA backends, any thread layout, and a recompute of the same op all draw the same numbers.
//
//   uint32_t r = util::rng_u32(call.seed, i);          // splitmix64 of (seed, i), high half
//   bool keep  = util::rng_keep(call.seed, i, 0.1);     // dropout: kept with probability 1 - p
//
// Header-only, no standard library beyond <cstdint>: it compiles in CUDA device code too.
#pragma once

#include <cstdint>

#ifdef __CUDACC__
#define ACTSIM_HD __host__ __device__
#else
#define ACTSIM_HD
#endif

namespace actsim::util {

// splitmix64's output function (Steele, Lea, Flood 2014): a bijection on 64 bits that mixes well.
ACTSIM_HD inline uint64_t rng_mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// 32 random bits for element `index` of the stream keyed by `seed`. The seed is mixed first so
// that nearby seeds (op ids) give unrelated streams, then the index steps by the golden gamma.
ACTSIM_HD inline uint32_t rng_u32(uint64_t seed, uint64_t index) {
  const uint64_t key = rng_mix64(seed + 0x9E3779B97F4A7C15ull);
  return static_cast<uint32_t>(rng_mix64(key + (index + 1) * 0x9E3779B97F4A7C15ull) >> 32);
}

// A float uniform in [0, 1) with 24 random bits: exact in float, so every backend agrees.
ACTSIM_HD inline float rng_uniform(uint64_t seed, uint64_t index) {
  return static_cast<float>(rng_u32(seed, index) >> 8) * (1.0f / 16777216.0f);
}

// Dropout's keep decision: kept with probability 1 - p. The threshold is (float)(1 - p) computed
// in double, so the comparison is the same bit for bit on every backend.
ACTSIM_HD inline bool rng_keep(uint64_t seed, uint64_t index, double p) {
  return rng_uniform(seed, index) < static_cast<float>(1.0 - p);
}

}  // namespace actsim::util
