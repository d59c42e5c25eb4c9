// What the Hugging Face lowerings share (lower_hf.hpp).
#include "lower_hf.hpp"

namespace actsim::graph {

TensorId HfBase::position_ids() {
  TensorId ar = b.arange(T);
  TensorId pos = b.fresh("position_ids", {T}, DType::i64);
  b.emit({.kind = OpKind::copy, .name = "position_ids", .inputs = {ar}, .outputs = {pos}, .workspace_bytes = 8,
          .bytes_moved = 2 * g().view_bytes(pos)});
  return pos;
}

TensorId HfBase::causal_mask(TensorId pos) {
  l.scope(-1, "model.create_causal_mask");
  TensorId mask = b.fresh("causal_mask", {B, 1, T, T}, dt);
  b.emit({.kind = OpKind::causal_mask, .name = "causal_mask", .inputs = {pos}, .outputs = {mask},
          .bytes_moved = g().view_bytes(mask), .params = {.start = m.sliding_window}});  // start: the window, 0 = none
  return mask;
}

void HfBase::causal_lm_loss(TensorId x, TensorId lm_head, TensorId labels, const std::vector<TensorId>& cache) {
  l.scope(-1, "lm_head");
  TensorId logits = l.linear(x, lm_head, std::nullopt);
  // Gemma2's final_logit_softcapping: logits / c, tanh, * c (the outputs object holds the result).
  if (m.final_softcap > 0) logits = softcap(logits, m.final_softcap);
  // ForCausalLMLoss: logits.float(); labels = pad(labels, (0, 1), value=-100);
  // shift_labels = labels[..., 1:].contiguous(); cross_entropy(logits.view(-1, V), shift_labels.view(-1)).
  l.scope(-1, "loss_function");
  TensorId lf = cast(logits, DType::f32);
  TensorId padded = b.fresh("pad", {B, T + 1}, DType::i64);
  b.emit({.kind = OpKind::pad, .name = "pad", .inputs = {labels}, .outputs = {padded},
          .bytes_moved = g().view_bytes(labels) + g().view_bytes(padded), .params = {.scalar = -100}});
  TensorId shift = b.contiguous(b.slice(padded, -1, 1, T + 1, 1));
  TensorId lv = b.view(lf, {B * T, V});
  TensorId tv = b.reshape(shift, {B * T});
  l.out.loss = b.cross_entropy(lv, tv);
  b.hold_until_last(padded);
  if (lf != logits) b.hold_until_last(lf);
  // The outputs object (logits, the cache) is dropped when forward returns; so is the base model's
  // (last_hidden_state: the final norm's output, which under autocast lm_head does not save).
  b.hold_until_last(logits);
  b.hold_until_last(x);
  for (TensorId c : cache) b.hold_until_last(c);
}

}  // namespace actsim::graph
