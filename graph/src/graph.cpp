#include "actsim/graph/graph.hpp"

#include <fmt/format.h>

#include <array>
#include <cstdio>
#include <cstdlib>
#include <iterator>

#include "actsim/util/error.hpp"

namespace actsim::graph {

std::string_view to_string(DType t) {
  switch (t) {
    case DType::f32: return "float32";
    case DType::bf16: return "bfloat16";
    case DType::f16: return "float16";
    case DType::f64: return "float64";
    case DType::i64: return "int64";
    case DType::i32: return "int32";
    case DType::b8: return "bool";
    case DType::u8: return "uint8";
  }
  return "?";
}

std::string_view to_string(Category c) {
  static constexpr std::array<std::string_view, kNumCategories> names{
      "parameters", "buffers", "optimizer_state", "inputs", "activations", "gradients", "temporaries"};
  return names[static_cast<size_t>(c)];
}

std::string_view to_string(Phase p) {
  switch (p) {
    case Phase::forward: return "forward";
    case Phase::backward: return "backward";
    case Phase::optimizer: return "optimizer";
  }
  return "?";
}

namespace {
constexpr std::array<std::string_view, kNumOpKinds> kOpKindNames{
    "arange", "ones", "triu", "eq_scalar", "index_rows", "embedding", "view", "copy", "stack",
    "add", "sub", "mul", "mul_scalar", "div_scalar", "add_scalar", "pow_scalar", "rsqrt", "mean_last",
    "mm", "addmm", "bmm", "layer_norm", "gelu_tanh", "silu", "softmax", "masked_fill", "dropout_noise",
    "native_dropout", "flash_attention", "log_softmax", "nll_loss",
    "backward", "sum_to", "accumulate", "grad_seed",
    "optim_update", "optim_temp", "zero_grad", "offload", "prefetch", "rng_stash",
    "neg", "cat", "cast", "rotary_table", "causal_mask", "pad", "tanh",
    "topk", "sum_dim", "div_inplace", "grouped_mm", "moe_index",
    "bucket_copy", "all_reduce", "reduce_scatter", "all_gather"};
}  // namespace

std::string_view to_string(OpKind k) { return kOpKindNames[static_cast<size_t>(k)]; }

bool parse_op_kind(std::string_view s, OpKind& out) {
  for (size_t i = 0; i < kOpKindNames.size(); ++i) {
    if (kOpKindNames[i] == s) {
      out = static_cast<OpKind>(i);
      return true;
    }
  }
  return false;
}

int64_t numel(const Shape& s) {
  int64_t n = 1;
  for (int64_t d : s) n *= d;
  return n;
}

Strides contiguous_strides(const Shape& s) {
  Strides st(s.size());
  int64_t acc = 1;
  for (size_t i = s.size(); i-- > 0;) {
    st[i] = acc;
    acc *= s[i];
  }
  return st;
}

std::string shape_string(const Shape& s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}

StorageId Graph::add_storage(Storage s) {
  ACTSIM_ASSERT(!frozen_, "graph is frozen");
  ACTSIM_ASSERT(s.bytes >= 0, "negative storage size");
  storages_.push_back(s);
  return StorageId{static_cast<uint32_t>(storages_.size() - 1)};
}

TensorId Graph::add_tensor(Tensor t) {
  ACTSIM_ASSERT(!frozen_, "graph is frozen");
  if (t.strides.empty()) t.strides = contiguous_strides(t.shape);
  tensors_.push_back(std::move(t));
  auto id = TensorId{static_cast<uint32_t>(tensors_.size() - 1)};
  Storage& s = storages_.at(index(tensors_.back().storage));
  if (s.first == kNoTensor) s.first = id;
  return id;
}

OpId Graph::add_op(Op op) {
  ACTSIM_ASSERT(!frozen_, "graph is frozen");
  auto id = OpId{static_cast<uint32_t>(ops_.size())};
  for (TensorId t : op.outputs) {
    Tensor& tt = tensors_.at(index(t));
    ACTSIM_ASSERT(tt.producer == kNoOp, fmt::format("tensor {} produced twice", tt.name));
    tt.producer = id;
    Storage& s = storages_.at(index(tt.storage));
    if (!tt.is_view && s.producer == kNoOp) {
      s.producer = id;
      s.layer = op.layer;
    }
  }
  ops_.push_back(std::move(op));
  return id;
}

void Graph::frozen_write() { assertion_failed(__FILE__, __LINE__, "!frozen_", "write access to a frozen graph (use Graph::rewrite)"); }

int64_t Graph::view_bytes(TensorId id) const {
  const Tensor& t = tensor(id);
  return numel(t.shape) * dtype_size(t.dtype);
}

void Graph::validate() const {
  // Shapes: every tensor lies inside its storage.
  for (const Tensor& t : tensors_) {
    ACTSIM_ASSERT(t.shape.size() == t.strides.size(), "rank mismatch for " + t.name);
    int64_t last = t.offset;
    for (size_t i = 0; i < t.shape.size(); ++i) {
      ACTSIM_ASSERT(t.shape[i] >= 0, "negative extent in " + t.name);
      if (t.shape[i] > 0) last += (t.shape[i] - 1) * t.strides[i];
    }
    const Storage& s = storages_.at(index(t.storage));
    if (numel(t.shape) > 0) {
      ACTSIM_ASSERT((last + 1) * dtype_size(t.dtype) <= s.bytes,
                    fmt::format("tensor {} {} overruns its storage of {} bytes", t.name,
                                shape_string(t.shape), s.bytes));
    }
  }
  // Dataflow: an edge from each tensor's producer to each op that reads, saves or holds it.
  // Ops are stored in execution order and every edge must point forward, so the graph is acyclic
  // by construction (a topological sort could not fail; Boost.Graph's work is the cut tensors,
  // cuts.cpp).
  for (size_t i = 0; i < ops_.size(); ++i) {
    const Op& op = ops_[i];
    for (const auto* list : {&op.inputs, &op.holds, &op.saved, &op.releases}) {
      for (TensorId t : *list) {
        OpId p = tensors_.at(index(t)).producer;
        if (p == kNoOp) continue;                                   // exists before the step
        if (list == &op.saved && index(p) == i) continue;           // an op may save its own output
        ACTSIM_ASSERT(index(p) < i, fmt::format("op {} reads {} before it is produced", op.name,
                                                 tensors_[index(t)].name));
      }
    }
    for (TensorId t : op.outputs) {
      ACTSIM_ASSERT(tensors_.at(index(t)).producer == OpId{static_cast<uint32_t>(i)},
                    "output not produced by its op: " + tensors_[index(t)].name);
    }
  }
}

}  // namespace actsim::graph
