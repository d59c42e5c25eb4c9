// actsim::graph — basic value types of the IR.
//
//   using namespace actsim::graph;
//   Shape s{8, 1024, 1600};
//   int64_t bytes = numel(s) * dtype_size(DType::f32);   // 52'428'800
//
// Ids are strong integers indexing the graph's flat vectors (ggml style): never strings in maps.
#pragma once

#include <cstdint>
#include <string_view>
#include <vector>

#include "actsim/util/small_vector.hpp"

namespace actsim::graph {

enum class TensorId : uint32_t {};
enum class StorageId : uint32_t {};
enum class OpId : uint32_t {};

inline constexpr uint32_t index(TensorId id) { return static_cast<uint32_t>(id); }
inline constexpr uint32_t index(StorageId id) { return static_cast<uint32_t>(id); }
inline constexpr uint32_t index(OpId id) { return static_cast<uint32_t>(id); }
inline constexpr OpId kNoOp{0xffffffffu};
inline constexpr TensorId kNoTensor{0xffffffffu};

enum class DType : uint8_t { f32, bf16, f16, f64, i64, i32, b8, u8 };

inline constexpr int64_t dtype_size(DType t) {
  switch (t) {
    case DType::f64: case DType::i64: return 8;
    case DType::f32: case DType::i32: return 4;
    case DType::bf16: case DType::f16: return 2;
    case DType::b8: case DType::u8: return 1;
  }
  return 0;
}
std::string_view to_string(DType t);
inline constexpr bool is_floating(DType t) {
  return t == DType::f32 || t == DType::bf16 || t == DType::f16 || t == DType::f64;
}

// What a storage is for. The order is the order of the memory table.
enum class Category : uint8_t { parameter, buffer, optimizer_state, input, activation, gradient, temporary };
inline constexpr int kNumCategories = 7;
std::string_view to_string(Category c);

// Step phase an op belongs to.
enum class Phase : uint8_t { forward, backward, optimizer };
std::string_view to_string(Phase p);

// Where a storage lives: device memory, or host memory (CUDA's 0-dim CPU scalars).
enum class Location : uint8_t { device, host };

// Dims and strides inline up to 4 (a heap block past them): most tensors have at most 4 dims.
using Shape = util::SmallVector<int64_t, 4>;
using Strides = util::SmallVector<int64_t, 4>;
// An op's or a tensor's small lists of ids, inline up to 4 (as big as a std::vector).
using TensorIds = util::SmallVector<TensorId, 4>;
using OpIds = util::SmallVector<OpId, 4>;

int64_t numel(const Shape& s);
Strides contiguous_strides(const Shape& s);
std::string shape_string(const Shape& s);  // "[8, 1024, 1600]"

}  // namespace actsim::graph
