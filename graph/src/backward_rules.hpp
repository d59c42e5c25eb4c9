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
  std::vector<TensorId> grads;  // [forward inputs] the gradient for input i, kNoTensor if none
  int64_t workspace = 0;        // transient bytes while the node runs
  int kernels = 1;              // kernel launches; 0 = no kernel (views and pass-throughs)
};

// A fresh contiguous gradient (category temporary), or with `strides` when given.
TensorId new_grad(Builder& b, const std::string& name, const Shape& shape, DType dt, const Strides& strides = {});

// The rule for forward op `f` given its first incoming gradient `g`. Emits nothing; allocates
// the gradient tensors (in the order PyTorch's backward function creates them).
BackwardRule backward_rule(Builder& b, const Op& f, TensorId g);

}  // namespace actsim::graph
