// Private to the CPU backend: the kernel families, each templated on the compute type A (float
// for f32/bf16/f16 storage, double for f64) and instantiated for both in its .cpp file. The math
// of every op is specified in docs/kernels.md; the CUDA backend implements the same contract.
#pragma once

#include <cstdint>
#include <vector>

#include "actsim/graph/graph.hpp"
#include "actsim/backends/backend.hpp"

namespace actsim::backends::cpu {

// Forward op kinds (and recompute): `k` supplies the kind and params, `c` the tensors.
template <class A> void run_forward(const OpCall& c, const graph::Op& k);
// OpKind::backward: `op` is the backward op, its Op::forward the op it differentiates.
template <class A> void run_backward(const OpCall& c, const graph::Op& op);
// optim_update / optim_temp.
template <class A> void run_optimizer(const OpCall& c, const graph::Op& op);

// out = a @ b (+ bias broadcast to out), for rank-2 or batched rank-3 strided operands.
template <class A> void matmul(const TensorArg& a, const TensorArg& b, const TensorArg& out, const TensorArg* bias);
// g (logical order, shape gshape) summed down to rshape (right-aligned broadcast), in order.
template <class A> std::vector<A> sum_to(const std::vector<A>& g, const graph::Shape& gshape, const graph::Shape& rshape);

}  // namespace actsim::backends::cpu
