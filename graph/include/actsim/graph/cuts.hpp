// actsim::graph cut tensors — the legal checkpoint boundaries of a forward graph, found from the
// graph itself (not from block labels).
//
//   StepGraph f = lower_forward(model, training, prof);
//   std::vector<CutTensor> cuts = forward_cuts(f.graph);   // in forward order
//   cuts[k].tensor;     // everything from the input to the loss flows through it
//
// The dataflow graph is the forward ops and the activations: tensors that depend on the step's
// input (Category::input leaves); parameters, buffers, optimizer state and constants built from
// nothing (llama's positions, causal masks, dropout noise) are left out, since a recomputation
// reads them as they are. On its undirected view (op and tensor vertices, an edge per read and per
// write) Boost's biconnected_components gives the articulation points and the block-cut tree; the
// cut tensors are the tensor articulation points on the tree's path from the input to the loss:
// removing one separates everything before it from everything after it, so a segment between two
// consecutive cuts can be recomputed from the first alone. On gpt2 and llama these are each
// block's input and the residual stream between attention and MLP (and the head's chain); a
// parallel-residual block (attention and MLP both read the block input) has none inside it.
#pragma once

#include <vector>

#include "actsim/graph/graph.hpp"

namespace actsim::graph {

struct CutTensor {
  TensorId tensor = kNoTensor;
  OpId producer = kNoOp;   // the forward op that writes it (kNoOp for the input itself: never a cut)
};

// The cut tensors of `g`'s forward phase in forward order (producers strictly increasing).
// `source` is the input leaf the forward starts from (kNoTensor: the input leaf the first forward
// op reads), `sink` the forward's last output (kNoTensor: the last forward op's first output).
std::vector<CutTensor> forward_cuts(const Graph& g, TensorId source = kNoTensor, TensorId sink = kNoTensor);

}  // namespace actsim::graph
