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

#include <optional>
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
  // false: every block is lowered and differentiated. true: a run of six or more blocks with one
  // checkpoint mode is lowered as five and its middle block stamped out (Note [Block stamping] in
  // stamp.cpp); the graph is the same, id for id. Steps stamping cannot reproduce are lowered in
  // full either way.
  bool stamp = true;
};

// `plan` (optional) checkpoints, recomputes or offloads blocks (checkpoint.hpp).
StepGraph lower_training_step(const ModelConfig& model, const TrainingConfig& training, const RuntimeProfile& prof,
                              const BlockPlan* plan = nullptr, LowerOptions options = {});

// Block stamping (Note [Block stamping] in stamp.cpp): the step graph stamped from a lowering of
// fewer blocks, the same as lower_training_step(..., {.stamp = false}) id for id; nullopt when the
// step is not one stamping reproduces (then lower_training_step lowers every block).
std::optional<StepGraph> lower_stamped(const ModelConfig& model, const TrainingConfig& training,
                                       const RuntimeProfile& prof, const BlockPlan* plan, LowerOptions options = {});

// The forward graph alone (params, buffers, inputs and the forward ops up to the loss).
StepGraph lower_forward(const ModelConfig& model, const TrainingConfig& training, const RuntimeProfile& prof,
                        const BlockPlan* plan = nullptr);

}  // namespace actsim::graph
