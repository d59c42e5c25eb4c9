// The schedule format's names and version, shared by the writer, the reader and the validator
// (docs/schedule-format.md). Internal to schedule/.
#pragma once

#include <array>
#include <string>
#include <string_view>

#include "actsim/graph/graph.hpp"

namespace actsim::schedule::format {

using graph::DType;

inline constexpr std::array<std::string_view, 5> kEntryNames{"alloc", "run", "free", "ws_alloc", "ws_free"};
inline constexpr std::array<std::string_view, 8> kViewNames{"none", "reshape", "transpose", "expand",
                                                     "unsqueeze", "split", "slice", "select"};
inline constexpr std::array<std::string_view, 8> kOptimNames{"none", "adam_moments", "adam_sqrt", "adam_denom",
                                                      "adam_update", "adam_fused", "sgd", "sgd_momentum"};
inline constexpr std::array<DType, 8> kDTypes{DType::f32, DType::bf16, DType::f16, DType::f64,
                                       DType::i64, DType::i32, DType::b8, DType::u8};
inline constexpr int kFormatVersion = 1;

// A storage's name in messages: its first tensor's, or "?".
inline std::string storage_name(const graph::Graph& g, uint32_t s) {
  const graph::Storage& st = g.storages()[s];
  return st.first == graph::kNoTensor ? std::string("?") : g.tensor(st.first).name;
}

}  // namespace actsim::schedule::format
