// Pipeline stages (issue 13, pp helper): what one stage's lowering adds to the family code. A
// stage holds a contiguous range of blocks (study/src/pipeline.cpp sets the model's n_layers to
// the range and says whether the stage has the embedding and the head); without the embedding its
// input is received, without the head its output is sent and backward starts from the gradient
// received for it. torch.distributed.pipelining does the same: the received activation is a
// detached leaf with requires_grad_(), its .grad is what the stage sends back, and the stage's
// backward is torch.autograd.backward(output, grad_output).
#include "lowering.hpp"

namespace actsim::graph {

std::string_view to_string(PpSchedule s) {
  switch (s) {
    case PpSchedule::gpipe: return "gpipe";
    case PpSchedule::one_f_one_b: return "1f1b";
    case PpSchedule::interleaved: return "interleaved";
  }
  return "?";
}

TensorId Lowering::pp_input() {
  // With tensor parallelism each tp rank of a stage receives what its peer of the previous stage
  // sends: the block output, replicated [b, s, h] without sequence parallelism, the sequence
  // shard [b, s/t, h] with it (Megatron-LM's p2p tensor_shape divides the sequence by t when
  // sequence_parallel), which is what the first block's norm and tp_in expect.
  pp_recv = b.leaf("pp.recv_activation", {tr.batch_size, tp_seq(), m.d_model}, dt, Category::input, true);
  return pp_recv;
}

void Lowering::pp_output(TensorId x, TensorId held) {
  // The stage returns its output; backward's root is it, seeded with the received gradient (the
  // seed has the root's shape and dtype: the receive buffer).
  out.loss = x;
  if (held != kNoTensor) b.hold_until_last(held);
}

void pp_send_input_grad(Lowering& l) {
  const TensorId g = l.out.param_grads.back();
  l.out.param_grads.pop_back();
  if (g == kNoTensor) return;
  // Sent to the previous stage when backward ends, then dropped (a release, no kernel: the send's
  // time is the pipeline's, study/src/pipeline.cpp).
  l.b.set_phase(Phase::backward);
  l.b.emit({.kind = OpKind::zero_grad, .name = "pp.send_input_grad", .releases = {g}, .kernels = 0});
}

}  // namespace actsim::graph
