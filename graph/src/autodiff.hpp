// Private: appends the backward pass to a forward graph, as PyTorch's autograd engine runs it.
#pragma once

#include <vector>

#include "builder.hpp"

namespace actsim::graph {

// Emits backward ops for `loss` (ones_like seed, then nodes in the engine's order). Parameter
// gradients end in storages of category gradient; returns them in `params` order (kNoTensor
// for a parameter that received no gradient).
std::vector<TensorId> differentiate(Builder& b, TensorId loss, const std::vector<TensorId>& params);

}  // namespace actsim::graph
