// actsim::util hashing: FNV-1a, the one non-cryptographic hash of the project (digests of replay
// results, per-tensor value keys, structure hashes of graphs). splitmix64 lives in rng.hpp.
//
//   util::Fnv1a h;
//   h.add_bytes(v.data(), v.size());   // byte-wise FNV-1a (64-bit)
//   h.add_word(op.kind);               // a whole 64-bit word at once (one xor, one multiply)
//   uint64_t d = h.value();
//   uint64_t k = util::fnv1a("blocks.0.attn");
#pragma once

#include <cstddef>
#include <cstdint>
#include <string_view>

namespace actsim::util {

class Fnv1a {
 public:
  static constexpr uint64_t kOffset = 0xcbf29ce484222325ull;
  static constexpr uint64_t kPrime = 0x100000001b3ull;

  void add_bytes(const void* data, size_t n) {
    const auto* p = static_cast<const uint8_t*>(data);
    for (size_t i = 0; i < n; ++i) h_ = (h_ ^ p[i]) * kPrime;
  }
  void add_word(uint64_t v) { h_ = (h_ ^ v) * kPrime; }
  uint64_t value() const { return h_; }

 private:
  uint64_t h_ = kOffset;
};

inline uint64_t fnv1a(std::string_view s) {
  Fnv1a h;
  h.add_bytes(s.data(), s.size());
  return h.value();
}

}  // namespace actsim::util
