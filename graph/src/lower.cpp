// Lowering entry points: checks the configuration, runs the family's lowering (lower_<family>.cpp),
// differentiates (autodiff.cpp), appends the optimizer step (lower_optimizer.cpp). Also the shared
// loss tail and the names of the configuration enums.
#include "actsim/graph/lower.hpp"

#include <fmt/format.h>

#include <cmath>

#include "actsim/util/error.hpp"
#include "autodiff.hpp"
#include "lowering.hpp"

namespace actsim::graph {

int64_t ModelConfig::ff() const { return d_ff > 0 ? d_ff : default_d_ff(family, d_model); }

int64_t default_d_ff(Family f, int64_t d) {
  if (f == Family::gpt2 || f == Family::hf_gpt2) return 4 * d;
  return 8 * ((static_cast<int64_t>(2 * 4 * d / 3.0) + 7) / 8);
}

std::string_view to_string(Family f) {
  switch (f) {
    case Family::gpt2: return "gpt2";
    case Family::llama: return "llama";
    case Family::hf_llama: return "hf_llama";
    case Family::hf_gpt2: return "hf_gpt2";
    case Family::hf_neox: return "hf_neox";
  }
  return "?";
}
std::string_view to_string(Attention a) { return a == Attention::eager ? "eager" : "flash"; }
std::string_view to_string(Optimizer o) {
  switch (o) {
    case Optimizer::adamw: return "adamw";
    case Optimizer::adam: return "adam";
    case Optimizer::sgd: return "sgd";
    case Optimizer::sgd_momentum: return "sgd_momentum";
  }
  return "?";
}
std::string_view to_string(OptimizerImpl o) {
  switch (o) {
    case OptimizerImpl::profile_default: return "default";
    case OptimizerImpl::for_loop: return "for_loop";
    case OptimizerImpl::foreach: return "foreach";
    case OptimizerImpl::fused: return "fused";
  }
  return "?";
}
std::string_view to_string(ProfileId p) {
  switch (p) {
    case ProfileId::torch_cpu: return "torch-cpu";
    case ProfileId::torch2_cpu: return "torch2-cpu";
    default: return "torch-cuda";
  }
}

// Shared tail of both families: logits, cross-entropy; `logits` and `held` stay referenced by
// the Python frame until forward returns (after the loss).
void Lowering::finish_loss(TensorId x, TensorId lm_head, TensorId targets, TensorId held) {
  const int64_t B = tr.batch_size, T = m.seq_len, V = m.vocab_size;
  scope(-1, "lm_head");
  TensorId logits = b.linear(x, lm_head, std::nullopt);
  scope(-1, "cross_entropy");
  TensorId lv = b.view(logits, {B * T, V});
  TensorId tv = b.view(targets, {B * T});
  out.loss = b.cross_entropy(lv, tv);
  b.hold_until_last(logits);
  b.hold_until_last(held);
}

namespace {

void check_config(const ModelConfig& m, const RuntimeProfile& prof) {
  ACTSIM_ASSERT(m.head_dim > 0 || m.d_model % m.n_heads == 0, "heads must divide d_model (checked by the loader)");
  ACTSIM_ASSERT(m.n_heads % m.kv_heads() == 0, "kv heads must divide heads (checked by the loader)");
  ACTSIM_ASSERT(m.attention == Attention::eager || prof.has_sdpa, "flash attention needs SDPA (checked by the loader)");
}

}  // namespace

namespace {
void lower_model(Lowering& l, const ModelConfig& model, const RuntimeProfile& prof) {
  check_config(model, prof);
  ACTSIM_ASSERT(!l.plan || static_cast<int64_t>(l.plan->mode.size()) == model.n_layers, "plan size != n_layers");
  if (model.family == Family::gpt2) l.gpt2();
  else if (model.family == Family::llama) l.llama();
  else if (model.family == Family::hf_llama) lower_hf_llama(l);
  else if (model.family == Family::hf_gpt2) lower_hf_gpt2(l);
  else lower_hf_neox(l);
  l.out.graph.n_layers = static_cast<int32_t>(model.n_layers);
}
}  // namespace

StepGraph lower_forward(const ModelConfig& model, const TrainingConfig& training, const RuntimeProfile& prof,
                        const BlockPlan* plan) {
  Lowering l(model, training, prof, plan);
  lower_model(l, model, prof);
  return std::move(l.out);
}

StepGraph lower_training_step(const ModelConfig& model, const TrainingConfig& training, const RuntimeProfile& prof,
                              const BlockPlan* plan, LowerOptions options) {
  Lowering l(model, training, prof, plan);
  l.b.set_names(options.names);
  lower_model(l, model, prof);
  l.out.param_grads = differentiate(l.b, l.out.loss, l.out.params, plan);
  // The training loop's `loss` stays referenced after the step (until the next one reassigns it).
  l.out.graph.mutable_storage(l.out.graph.tensor(l.out.loss).storage).keep = true;
  l.optimizer();
  l.zero_grad();
  l.out.graph.freeze();
  return std::move(l.out);
}

}  // namespace actsim::graph
