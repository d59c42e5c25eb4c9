// What a torch.utils.checkpoint call's frame keeps alive through backward (use_reentrant=False: 2.x's
// frame, 1.13's unpack closure), as extra `holds` on the ops of the lowered step. Internal to graph/.
#pragma once

#include <cstdint>
#include <unordered_map>
#include <utility>
#include <vector>

#include "actsim/graph/graph.hpp"

namespace actsim::graph {

// A region's (last) recomputation: how far it ran and what it emitted.
struct Recomputation {
  bool reached = false;                         // it ran at all
  size_t reach = 0;                             // position in the region's op list of the last op it ran
  std::vector<std::pair<size_t, OpId>> emitted; // (position, the recompute op emitted for it)
  OpId end = kNoOp;                             // the last op it emitted
};

// The activations (and inputs) a checkpoint call's ops read from outside the call: its arguments
// (the block input, llama's token positions), which its frame (2.x _NoopSaveInputs, 1.13's unpack
// closure) or its ctx.save_for_backward (reentrant) keeps; one tensor per storage, in op order.
std::vector<TensorId> checkpoint_arguments(const Graph& g, const std::vector<OpId>& ops);

// After backward is lowered: each checkpoint call's RNG stash (`rng_stash`, by region) and its
// arguments live until the last backward node of its region has run; selective activation
// checkpointing's cached outputs that backward never reads live until the recomputation passes
// their op (it takes them from the cache), or else until that same last node (the frame dies).
// A stash of kNoTensor (preserve_rng_state = false) keeps only the arguments.
void keep_checkpoint_frames(Graph& g, const std::unordered_map<int32_t, TensorId>& rng_stash,
                            const std::unordered_map<int32_t, std::vector<OpId>>& regions,
                            const std::unordered_map<int32_t, Recomputation>& recomputations,
                            const std::unordered_map<int32_t, std::vector<TensorId>>& kwargs = {});

}  // namespace actsim::graph
