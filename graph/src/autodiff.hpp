// Private: appends the backward pass to a forward graph, as PyTorch's autograd engine runs it.
#pragma once

#include <functional>
#include <vector>

#include "actsim/graph/checkpoint.hpp"
#include "builder.hpp"

namespace actsim::graph {

// Emits backward ops for `loss` (ones_like seed, then nodes in the engine's order). Parameter
// gradients end in storages of category gradient; returns them in `params` order (kNoTensor
// for a parameter that received no gradient).
// `plan` (optional) gives the explicit recompute schedule of checkpointed blocks.
// A hook run right after AccumulateGrad has made parameter `param`'s gradient `grad` (DDP's
// reducer hook, ZeRO's reduction): it may emit ops and returns the tensor that is the
// parameter's .grad from then on (`grad`, or a view of a bucket).
using GradReadyHook = std::function<TensorId(size_t param, TensorId grad)>;

// Gradient accumulation: `forward_begin` is the first op of this micro-batch's forward (its
// checkpoint regions are its own), and `grads` (optional) the parameters' .grad left by earlier
// micro-batches, which AccumulateGrad adds into in place; then those are returned.
std::vector<TensorId> differentiate(Builder& b, TensorId loss, const std::vector<TensorId>& params,
                                    const BlockPlan* plan = nullptr, OpId forward_begin = OpId{0},
                                    const std::vector<TensorId>* grads = nullptr,
                                    const GradReadyHook& on_grad_ready = {});

}  // namespace actsim::graph
