// actsim::graph::lower_training_step — one training step of a model family as a graph.
//
//   ModelConfig m; TrainingConfig t;
//   StepGraph s = lower_training_step(m, t, profile(ProfileId::torch_cuda));
//   s.graph.ops().size();          // forward, backward, optimizer and zero_grad ops, in order
//
// The forward mirrors ../shared/reference/models.py op for op (every view, copy, mask, index
// tensor and scalar); the backward is what PyTorch's autograd engine runs; the optimizer step is
// torch.optim's implementation for the configured optimizer.
#pragma once

#include <string>
#include <vector>

#include "actsim/graph/checkpoint.hpp"
#include "actsim/graph/config.hpp"
#include "actsim/graph/graph.hpp"
#include "actsim/graph/profile.hpp"

namespace actsim::graph {

struct StepGraph {
  Graph graph;
  std::vector<TensorId> params;        // model.parameters() order (tied weights once)
  std::vector<TensorId> param_grads;   // [params]
  TensorId loss = kNoTensor;
  OptimizerImpl optimizer_impl = OptimizerImpl::for_loop;  // resolved (never profile_default)
};

// What a lowering records beyond what the engine reads.
struct LowerOptions {
  // false: ops and the tensors they make are left unnamed (parameters keep their names). For
  // lowerings whose graph only the engine reads (the batch search's probes): names are about a
  // fifth of a lowering's allocations. Sizes, order and everything simulated are the same.
  bool names = true;
  // false: the graph's invariants (Graph::validate) are not checked when it is frozen. For the
  // same probes (issue 9): the checks are a few percent of a lowering, and every lowering a
  // command reports (and every test's) is still checked.
  bool validate = true;
};

// `plan` (optional) checkpoints, recomputes or offloads blocks (checkpoint.hpp).
StepGraph lower_training_step(const ModelConfig& model, const TrainingConfig& training, const RuntimeProfile& prof,
                              const BlockPlan* plan = nullptr, LowerOptions options = {});

// The forward graph alone (params, buffers, inputs and the forward ops up to the loss).
StepGraph lower_forward(const ModelConfig& model, const TrainingConfig& training, const RuntimeProfile& prof,
                        const BlockPlan* plan = nullptr);

}  // namespace actsim::graph
