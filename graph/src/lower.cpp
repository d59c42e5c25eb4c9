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
  const int64_t B = tr.batch_size, T = m.seq_len, V = tp() > 1 ? tp_vocab() : m.vocab_size;
  scope(-1, "lm_head");
  TensorId logits = tp_column(tp_in(x), lm_head, std::nullopt);  // tensor parallelism: the vocab shard
  scope(-1, "cross_entropy");
  TensorId lv = b.view(logits, {B * T, V});
  TensorId tv = b.view(targets, {B * T});
  tp_loss_reductions();  // issue 13: vocab-parallel cross-entropy's all-reduces (tp > 1)
  out.loss = dtensor() ? dt_cross_entropy(lv, tv) : b.cross_entropy(lv, tv);  // issue 13: DTensor's loss_parallel
  b.hold_until_last(logits);
  if (held != kNoTensor) b.hold_until_last(held);  // a last pipeline stage of gpt2 has no positions
}

namespace {

void check_config(const ModelConfig& m, const RuntimeProfile& prof) {
  ACTSIM_ASSERT(m.head_dim > 0 || m.d_model % m.n_heads == 0, "heads must divide d_model (checked by the loader)");
  ACTSIM_ASSERT(m.n_heads % m.kv_heads() == 0, "kv heads must divide heads (checked by the loader)");
  ACTSIM_ASSERT(m.attention == Attention::eager || prof.has_sdpa, "flash attention needs SDPA (checked by the loader)");
}

}  // namespace

void lower_family(Lowering& l) {
  const Family f = l.m.family;
  if (f == Family::gpt2) l.gpt2();
  else if (f == Family::llama) l.llama();
  else if (f == Family::hf_llama) lower_hf_llama(l);
  else if (f == Family::hf_gpt2) lower_hf_gpt2(l);
  else lower_hf_neox(l);
}

namespace {
void lower_model(Lowering& l, const ModelConfig& model, const RuntimeProfile& prof) {
  check_config(model, prof);
  ACTSIM_ASSERT(prof.autocast_supports(l.tr.autocast), "autocast dtype unsupported (checked by the loader)");
  l.b.set_autocast(l.tr.autocast);  // f32: off
  l.parallel_forward_begin();
  ACTSIM_ASSERT(!l.plan || static_cast<int64_t>(l.plan->mode.size()) == model.n_layers, "plan size != n_layers");
  lower_family(l);
  // torch.autocast's __exit__ clears the weight-cast cache once model(idx, targets) returns.
  for (TensorId c : l.b.cast_cache) l.b.hold_until_last(c);
  l.b.set_autocast(DType::f32);
  l.out.graph.n_layers = static_cast<int32_t>(model.n_layers);
  l.parallel_forward_end();
}

// Note [Gradient accumulation]: N micro-batches, each `loss = model(idx, targets) / N;
// loss.backward()`, then one optimizer step. Two micro-batches are lowered: the first (its
// AccumulateGrad creates .grad: steals or clones) and one later micro-batch (.grad exists and is
// added into in place). Every later micro-batch starts from the same live bytes (parameters,
// optimizer state, inputs, .grad, the previous micro-batch's loss) and runs the same ops, so the
// second stands for all N - 1 of them: the engine runs it once for memory and charges its time
// N - 1 times (Graph::micro_batches). The division is an op of the graph (div.Tensor with the
// number wrapped as a 0-dim tensor, which DivBackward0 saves); the Python local `loss` keeps the
// previous micro-batch's loss alive until the next division returns.
void accumulate_micro_batches(Lowering& l, const ModelConfig& model, const RuntimeProfile& prof) {
  Graph& g = l.out.graph;
  Builder& b = l.b;
  const double n = static_cast<double>(l.tr.grad_accum_steps);
  auto divide = [&](TensorId loss) {
    b.set_phase(Phase::forward);
    l.scope(-1, "loss");
    return b.scalar_op(OpKind::div_scalar, loss, n);
  };
  // fp16 autocast: each micro-batch runs scaler.scale(loss).backward(), so the gradients
  // accumulate scaled; unscale_, the inf check and update() run once, at the step.
  const bool scaled = l.tr.autocast == DType::f16;
  auto root_of = [&](TensorId loss) { return scaled ? l.scaler_scale_loss(loss) : loss; };
  const TensorId first_loss = divide(l.out.loss);
  const TensorId first_root = root_of(first_loss);
  // Data parallelism (issue 13): DDP's hooks run in the backwards outside no_sync (the last one,
  // or every one with parallel.no_sync = false); the later micro-batch stands for the last.
  GradReadyHook hook;
  if (l.tr.parallel.active()) hook = [&l](size_t i, TensorId gr) { return l.parallel_grad_ready(i, gr); };
  l.out.param_grads = differentiate(b, first_root, l.out.params, l.plan, OpId{0}, nullptr,
                                    l.parallel_hooks(false) ? hook : GradReadyHook{});
  if (l.parallel_hooks(false)) l.parallel_backward_end();
  if (scaled) b.hold_until_last(first_root);  // the temporary lives until .backward() returns
  // The second micro-batch's forward: the same family code, on the first's leaves; what the
  // builder collected per forward (checkpoint RNG stashes, offloads, block outputs) starts anew.
  // (Reentrant checkpoint, issue 12 recipe 4: the first micro-batch's ctx.fwd_cpu_state stashes
  // live with its autograd graph, which dies when `loss` is rebound, not past the step.)
  std::vector<TensorId> first_graph_stashes;
  for (const auto& [r, t] : b.rng_stash) {
    if (t != kNoTensor && g.storage(g.tensor(t).storage).keep) {
      g.mutable_storage(g.tensor(t).storage).keep = false;
      first_graph_stashes.push_back(t);
    }
  }
  for (const auto& [r, ts] : b.ckpt_kwargs) {  // ctx.run_function's keyword arguments, likewise
    for (TensorId t : ts) {
      if (g.storage(g.tensor(t).storage).keep) {
        g.mutable_storage(g.tensor(t).storage).keep = false;
        first_graph_stashes.push_back(t);
      }
    }
  }
  b.rng_stash.clear();
  b.ckpt_kwargs.clear();
  b.offloaded.clear();
  b.offload_order.clear();
  b.block_outputs.clear();
  const OpId begin{static_cast<uint32_t>(g.n_ops())};
  b.set_phase(Phase::forward);
  b.replay_leaves(true);
  lower_model(l, model, prof);
  b.replay_leaves(false);
  l.out.loss = divide(l.out.loss);
  g.mutable_op(OpId{static_cast<uint32_t>(g.n_ops() - 1)}).releases.push_back(first_loss);  // `loss = ...` rebinds
  for (TensorId t : first_graph_stashes) b.hold_until_last(t);
  const TensorId root = root_of(l.out.loss);
  const std::vector<TensorId> before = l.out.param_grads;
  l.out.param_grads = differentiate(b, root, l.out.params, l.plan, begin, &before, hook);
  if (scaled) b.hold_until_last(root);
  g.micro_batches = l.tr.grad_accum_steps;
  g.last_micro_batch = begin;
  g.after_micro_batches = OpId{static_cast<uint32_t>(g.n_ops())};
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
  if (options.stamp) {
    if (std::optional<StepGraph> s = lower_stamped(model, training, prof, plan, options)) return std::move(*s);
  }
  Lowering l(model, training, prof, plan);
  l.b.set_names(options.names);
  lower_model(l, model, prof);
  // fp16 autocast: scaler.scale(loss).backward() (the scaled loss is backward's temporary), once
  // per micro-batch with accumulation. Data parallelism's gradient hooks (issue 13): see
  // accumulate_micro_batches for DDP's no_sync.
  const bool scaled = training.autocast == DType::f16;
  if (training.grad_accum_steps > 1) {
    accumulate_micro_batches(l, model, prof);
  } else {
    GradReadyHook hook;
    const size_t n_params = l.out.params.size();
    if (training.parallel.active()) {
      hook = [&l, n_params](size_t i, TensorId g) { return i < n_params ? l.parallel_grad_ready(i, g) : g; };
    }
    const TensorId root = scaled ? l.scaler_scale_loss(l.out.loss) : l.out.loss;
    // A pipeline stage's received input requires grad like a parameter (lower_pp.cpp).
    std::vector<TensorId> leaves = l.out.params;
    if (l.pp_recv != kNoTensor) leaves.push_back(l.pp_recv);
    l.out.param_grads = differentiate(l.b, root, leaves, plan, OpId{0}, nullptr, hook);
    if (l.pp_recv != kNoTensor) pp_send_input_grad(l);
    if (scaled) l.b.hold_until_last(root);  // the temporary lives until .backward() returns
  }
  l.parallel_backward_end();
  // The training loop's `loss` stays referenced after the step (until the next one reassigns it).
  if (training.parallel.pp_head) l.out.graph.mutable_storage(l.out.graph.tensor(l.out.loss).storage).keep = true;
  if (scaled) l.scaler_unscale();
  if (training.master_weights == MasterWeights::fp32 ||
      (training.parallel.sharding != Sharding::none && !training.parallel.zero_redundancy())) {
    l.optimizer_flat();
  } else {
    l.optimizer();
    l.zero_redundancy_broadcast();  // zero_redundancy: torch's ZeroRedundancyOptimizer syncs its parameters
  }
  if (scaled) l.scaler_update();
  l.zero_grad();
  if (options.validate) l.out.graph.freeze();
  else l.out.graph.freeze_unchecked();
  return std::move(l.out);
}

}  // namespace actsim::graph
