// The CUDA backend's dispatch: one op call to its family (cuda_forward.cu, cuda_backward.cu,
// cuda_optim.cu; attention in cuda_attention.cu; the shared toolkit in cuda_common.cuh). The
// kernels of every op kind the lowering, autodiff and optimizer emit are listed in docs/cuda.md.
#include "cuda_common.cuh"

namespace actsim::backends::cuda {

namespace {

bool has_f64_data(const OpCall& call) {
  // fp64 is the CPU backend's checking dtype; here only 0-dim wrapped scalars may be fp64.
  auto big64 = [](const TensorArg& t) { return t.dtype == DType::f64 && graph::numel(t.shape) > 1; };
  for (const auto* v : {&call.inputs, &call.outputs, &call.grad_outputs}) {
    for (const TensorArg& t : *v) {
      if (big64(t)) return true;
    }
  }
  return false;
}

}  // namespace

void run_op(Context& c, const OpCall& call) {
  ACTSIM_ASSERT(call.graph != nullptr, "OpCall without a graph");
  const graph::Graph& g = *call.graph;
  const Op& op = g.op(call.op);
  if (has_f64_data(call)) unsupported("fp64 tensors (use --backend cpu for fp64 checks)");
  switch (op.kind) {
    case OpKind::backward: run_backward(c, Args{call, g, op, g.op(op.forward)}); break;
    case OpKind::optim_update: case OpKind::optim_temp: run_optim(c, Args{call, g, op, op}); break;
    default: run_forward(c, Args{call, g, op, op}); break;
  }
}

}  // namespace actsim::backends::cuda
