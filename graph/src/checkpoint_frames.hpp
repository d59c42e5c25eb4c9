// What a torch.utils.checkpoint call's frame keeps alive through backward (PyTorch 2.x,
// use_reentrant=False), as extra `holds` on the ops of the lowered step. Internal to graph/.
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

// After backward is lowered: each checkpoint call's RNG stash (`rng_stash`, by region) and its
// arguments live until the last backward node of its region has run; selective activation
// checkpointing's cached outputs that backward never reads live until the recomputation passes
// their op (it takes them from the cache), or else until that same last node (the frame dies).
void keep_checkpoint_frames(Graph& g, const std::unordered_map<int32_t, TensorId>& rng_stash,
                            const std::unordered_map<int32_t, std::vector<OpId>>& regions,
                            const std::unordered_map<int32_t, Recomputation>& recomputations);

}  // namespace actsim::graph
