// Private: the backward rule of each forward op kind (the derivatives.yaml of this simulator). A
// rule says which gradients a node produces for its inputs (fresh storages, or views of and
// pass-throughs of the incoming gradient), the node's transient workspace and its kernel count.
// The engine (autodiff.cpp) decides when a node runs and what happens to its gradients.
#pragma once

#include <string>
#include <vector>

#include "builder.hpp"

namespace actsim::graph {

// What a node's backward produces.
struct BackwardRule {
  TensorIds grads;              // [forward inputs] the gradient for input i, kNoTensor if none
  int64_t workspace = 0;        // transient bytes while the node runs
  int kernels = 1;              // kernel launches; 0 = no kernel (views and pass-throughs)
  // issue 13, tensor parallelism: a node that is a collective (the backward of Megatron-LM's
  // region functions) runs as that collective over group_size ranks, moving `bytes`.
  OpKind collective = OpKind::backward;
  int64_t group_size = 0, bytes = 0;
};

// issue 13, tensor parallelism (lower_tp.cpp): Megatron-LM's autograd functions of
// tensor_parallel/mappings.py, as forward ops of the compute stream tagged with OpParams::start
// (and OpParams::group_size = tp). Their backward is the dual collective.
enum TpRegion : int64_t {
  kTpCopyTo = 1,         // copy_to_tensor_model_parallel_region: identity; backward all-reduce
  kTpReduceFrom = 2,     // reduce_from_tensor_model_parallel_region: all-reduce; backward identity
  kTpGatherFromSp = 3,   // gather_from_sequence_parallel_region: all-gather; backward reduce-scatter
  kTpReduceScatterToSp = 4,  // reduce_scatter_to_sequence_parallel_region; backward all-gather
  kTpScatterToSp = 5,    // scatter_to_sequence_parallel_region: split (no communication); backward all-gather
  // issue 13, DTensor (lower_dtensor.cpp): functional collectives are out of place.
  kDtFromLocal = 6,      // DTensor.from_local(Replicate): identity; backward all-reduce into a new buffer
  kDtAllReduce = 7,      // redistribute Partial -> Replicate: all-reduce into a new buffer; backward identity
  kDtGather = 8,         // redistribute Shard(1) -> Replicate: all-gather; backward reduce-scatter
  kDtReduceScatter = 9,  // redistribute Partial -> Shard(1): reduce-scatter; backward all-gather
  kDtLogSoftmax = 10,    // loss_parallel's _log_softmax: backward passes the gradient through
  kDtNllLoss = 11,       // loss_parallel's nll_loss_forward: backward the whole softmax gradient
  kDtEmbedding = 12,     // RowwiseParallel embedding: backward a full [V, h] weight gradient
};
inline bool is_tp_region(const Op& f) { return f.phase == Phase::forward && f.params.group_size > 0 && f.params.start >= kTpCopyTo; }

// A fresh contiguous gradient (category temporary), or with `strides` when given.
TensorId new_grad(Builder& b, const std::string& name, const Shape& shape, DType dt, const Strides& strides = {});

// The rule for forward op `f` given its first incoming gradient `g`. Emits nothing; allocates
// the gradient tensors (in the order PyTorch's backward function creates them).
BackwardRule backward_rule(Builder& b, const Op& f, TensorId g);

}  // namespace actsim::graph
