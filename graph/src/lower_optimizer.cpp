// Lowering of the optimizer step (torch/optim/{adamw,adam,sgd}.py, for-loop, foreach and fused) and
// of zero_grad(set_to_none=True).
#include "lowering.hpp"

namespace actsim::graph {

// ---- optimizer -----------------------------------------------------------------------------
OptimizerImpl Lowering::resolve_impl() const {
  OptimizerImpl impl = tr.optimizer_impl == OptimizerImpl::profile_default ? prof.default_impl : tr.optimizer_impl;
  return impl;
}

void Lowering::optimizer() {
  b.set_phase(Phase::optimizer);
  b.set_scope("optimizer");
  const OptimizerImpl impl = out.optimizer_impl = resolve_impl();
  const bool adam = tr.optimizer == Optimizer::adamw || tr.optimizer == Optimizer::adam;
  const bool momentum = tr.optimizer == Optimizer::sgd_momentum;
  Graph& g = out.graph;
  // State: created by the warm-up step, so it exists before this step.
  struct State {
    TensorId exp_avg = kNoTensor, exp_avg_sq = kNoTensor, step = kNoTensor, momentum = kNoTensor;
  };
  std::vector<State> st(out.params.size());
  const std::vector<size_t> order = optimizer_order();  // zero_redundancy: this rank's partition
  for (size_t i : order) {
    const Tensor& p = g.tensor(out.params[i]);
    if (!p.requires_grad) continue;  // frozen (training.trainable): not in the optimizer's list
    b.set_layer(g.storage(p.storage).layer);
    const Shape shape = p.shape;
    const std::string name = p.name;
    if (adam) {
      st[i].exp_avg = b.leaf(name + ".exp_avg", shape, dt, Category::optimizer_state, false);
      st[i].exp_avg_sq = b.leaf(name + ".exp_avg_sq", shape, dt, Category::optimizer_state, false);
      // 'step' is a 0-dim float32 tensor: on the host for non-fused CUDA (torch 2.x), on the
      // parameter's device when fused.
      const Location loc = impl == OptimizerImpl::fused ? Location::device : prof.step_scalar_location;
      st[i].step = b.leaf(name + ".step", {}, DType::f32, Category::optimizer_state, false, loc);
    } else if (momentum) {
      st[i].momentum = b.leaf(name + ".momentum_buffer", shape, dt, Category::optimizer_state, false);
    }
  }
  auto grad_of = [&](size_t i) { return out.param_grads[i]; };
  const size_t n = out.params.size();
  OptimParams hp{.decoupled = tr.optimizer == Optimizer::adamw, .lr = tr.lr,
                 .weight_decay = tr.weight_decay >= 0 ? tr.weight_decay : (tr.optimizer == Optimizer::adamw ? 1e-2 : 0.0),
                 .momentum = momentum ? tr.momentum : 0.0};
  auto params_for = [&](OptimStep st_kind) {
    OpParams p;
    p.optim = hp;
    p.optim.step = st_kind;
    return p;
  };
  // In-place updates with Python-number operands (mul_(beta1), step += 1, ...) hold a wrapped
  // scalar and its cast while they run; the largest cast is to float32 ('step').
  const int64_t scalar_ws = prof.scalar_temp_bytes(DType::f32);
  auto update = [&](size_t i, const std::string& what, OptimStep kind, std::vector<TensorId> ins, int kernels,
                    double per, int64_t ws = 0) {
    const int64_t e = numel(g.tensor(out.params[i]).shape);
    b.set_layer(g.storage(g.tensor(out.params[i]).storage).layer);
    b.emit({.kind = OpKind::optim_update, .name = g.tensor(out.params[i]).name + "." + what, .inputs = std::move(ins),
            .workspace_bytes = ws, .flops = per * e,
            .bytes_moved = static_cast<int64_t>(kernels) * 3 * e * dtype_size(dt), .kernels = kernels,
            .params = params_for(kind)});
  };
  auto temp = [&](size_t i, const std::string& what, OptimStep kind, std::vector<TensorId> ins, int64_t ws,
                  std::vector<TensorId> holds = {}) {
    const Tensor& p = g.tensor(out.params[i]);
    b.set_layer(g.storage(p.storage).layer);
    TensorId o = b.fresh(p.name + "." + what, p.shape, dt, Category::temporary);
    b.emit({.kind = OpKind::optim_temp, .name = p.name + "." + what, .inputs = std::move(ins), .outputs = {o},
            .holds = std::move(holds), .workspace_bytes = ws, .flops = static_cast<double>(numel(p.shape)),
            .bytes_moved = 2 * g.view_bytes(o), .params = params_for(kind)});
    return o;
  };
  if (!adam) {
    for (size_t i : order) {
      if (grad_of(i) == kNoTensor) continue;
      // param.add_(grad, alpha=-lr) takes a Scalar; buf.mul_(momentum) wraps a number.
      if (momentum) {
        update(i, "sgd_momentum", OptimStep::sgd_momentum, {out.params[i], grad_of(i), st[i].momentum}, 3, 5,
               prof.scalar_temp_bytes(dt));
      } else {
        update(i, "sgd", OptimStep::sgd, {out.params[i], grad_of(i)}, 1, 2);
      }
    }
    return;
  }
  auto moments_in = [&](size_t i) {
    return std::vector<TensorId>{out.params[i], grad_of(i), st[i].exp_avg, st[i].exp_avg_sq, st[i].step};
  };
  if (impl == OptimizerImpl::fused) {
    for (size_t i : order) {
      if (grad_of(i) != kNoTensor) update(i, "fused_adam", OptimStep::adam_fused, moments_in(i), 1, 16);
    }
    return;
  }
  if (impl == OptimizerImpl::for_loop) {
    // _single_tensor_adam(w): denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    // holds sqrt and the division at once, and the previous parameter's denom until reassigned.
    TensorId prev_denom = kNoTensor;
    for (size_t i : order) {
      if (grad_of(i) == kNoTensor) continue;
      update(i, "moments", OptimStep::adam_moments, moments_in(i), 5, 6, scalar_ws);
      TensorId sq = temp(i, "sqrt", OptimStep::adam_sqrt, {st[i].exp_avg_sq, st[i].step}, 0);
      std::vector<TensorId> holds;
      if (prev_denom != kNoTensor) holds.push_back(prev_denom);
      TensorId denom = temp(i, "denom", OptimStep::adam_denom, {sq, st[i].step}, prof.scalar_temp_bytes(dt), holds);
      // param.addcdiv_(exp_avg, denom, value=-step_size); the .add_(eps) before it wraps a number.
      update(i, "addcdiv", OptimStep::adam_update, {out.params[i], st[i].exp_avg, denom, st[i].step}, 2, 4,
             prof.scalar_temp_bytes(dt));
      prev_denom = denom;
    }
    if (prev_denom != kNoTensor) b.hold_until_last(prev_denom);
    return;
  }
  // foreach: _multi_tensor_adam(w) -- whole lists of temporaries. CPU foreach falls back to
  // per-tensor ops, so mul_(beta1), step += 1 and + eps wrap numbers there.
  std::vector<TensorId> sq(n, kNoTensor), denom(n, kNoTensor);
  for (size_t i : order) {
    if (grad_of(i) != kNoTensor) update(i, "foreach_moments", OptimStep::adam_moments, moments_in(i), 5, 6, scalar_ws);
  }
  const bool two_lists = prof.foreach_adam_two_lists;
  for (size_t i : order) {
    if (grad_of(i) == kNoTensor) continue;
    sq[i] = temp(i, "foreach_sqrt", OptimStep::adam_sqrt, {st[i].exp_avg_sq, st[i].step}, 0);
  }
  for (size_t i : order) {
    if (grad_of(i) == kNoTensor) continue;
    if (two_lists) {
      denom[i] = temp(i, "foreach_add", OptimStep::adam_denom, {sq[i], st[i].step}, prof.scalar_temp_bytes(dt));
    } else {
      // torch 2.x: _foreach_div_(exp_avg_sq_sqrt, bias_correction2_sqrt) and _foreach_add_(..., eps)
      // in place; bias_correction2_sqrt is a list of Python numbers, which the CPU fallback wraps
      // one tensor at a time (both in-place ops hold a wrapped scalar and its cast while they run).
      update(i, "foreach_div_add", OptimStep::adam_denom, {sq[i], st[i].step}, 2, 2, prof.scalar_temp_bytes(dt));
      denom[i] = sq[i];
    }
  }
  for (size_t i : order) {
    if (grad_of(i) != kNoTensor) {
      update(i, "foreach_addcdiv", OptimStep::adam_update, {out.params[i], st[i].exp_avg, denom[i], st[i].step}, 1, 4);
    }
  }
  // Both lists are locals of _multi_tensor_adam(w): released when it returns.
  for (size_t i : order) {
    if (sq[i] != kNoTensor) b.hold_until_last(sq[i]);
    if (denom[i] != kNoTensor && denom[i] != sq[i]) b.hold_until_last(denom[i]);
  }
}

// ---- torch.amp.GradScaler (torch/amp/grad_scaler.py, 2.x) ----------------------------------
// The simulator takes the branch a steady-state step takes: no inf or NaN in the gradients, so
// scaler.step runs optimizer.step(). A skipped step (found_inf) allocates a subset of this: the
// same unscale_ temporaries and no optimizer temporaries; its peak is never above this one's.
TensorId Lowering::scaler_scale_loss(TensorId loss) {
  // _scale and _growth_tracker: 0-dim float32 and int32 tensors made by the warm-up step's first
  // scale() (_lazy_init_scale_growth_tracker); they persist, as the optimizer state does. With
  // gradient accumulation every micro-batch scales its loss with the same two.
  if (scaler.scale == kNoTensor) {
    scaler.scale = b.leaf("grad_scaler._scale", {}, DType::f32, Category::temporary, false);
    scaler.growth_tracker = b.leaf("grad_scaler._growth_tracker", {}, DType::i32, Category::temporary, false);
    out.graph.mutable_storage(out.graph.tensor(scaler.scale).storage).keep = true;
    out.graph.mutable_storage(out.graph.tensor(scaler.growth_tracker).storage).keep = true;
  }
  b.set_phase(Phase::backward);
  b.set_layer(-1);
  b.set_scope("grad_scaler");
  // outputs * scale.to(device): MulBackward0 saves `scale`, which persists anyway; it is left out
  // of the op's inputs so that it never counts as an activation kept for backward.
  TensorId scaled = b.fresh("scaled_loss", {}, out.graph.tensor(loss).dtype);
  b.emit({.kind = OpKind::mul, .name = "scale", .inputs = {loss}, .outputs = {scaled}, .flops = 1, .bytes_moved = 12});
  return scaled;
}

void Lowering::scaler_unscale() {
  b.set_phase(Phase::optimizer);
  b.set_layer(-1);
  b.set_scope("grad_scaler");
  auto small = [&](const std::string& name, DType dt, std::vector<TensorId> ins, std::vector<TensorId> holds = {}) {
    TensorId o = b.fresh(name, {}, dt, Category::temporary);
    b.emit({.kind = OpKind::optim_temp, .name = name, .inputs = std::move(ins), .outputs = {o},
            .holds = std::move(holds), .bytes_moved = 2 * dtype_size(dt)});
    return o;
  };
  // unscale_: inv_scale = self._scale.double().reciprocal().float()
  TensorId d = small("unscale_.double", DType::f64, {scaler.scale});
  TensorId r = small("unscale_.reciprocal", DType::f64, {d});
  TensorId inv = small("unscale_.inv_scale", DType::f32, {r});
  TensorId found = small("unscale_.found_inf", DType::f32, {});
  // _unscale_grads_: _MultiDeviceReplicator.get(device) copies found_inf and inv_scale (to(copy=True)),
  // found_inf first (argument order); one group per (device, dtype) of the gradients.
  TensorId found_copy = small("unscale_.found_inf.copy", DType::f32, {found});
  TensorId inv_copy = small("unscale_.inv_scale.copy", DType::f32, {inv});
  std::vector<TensorId> grads{found_copy, inv_copy};
  for (TensorId gr : out.param_grads) {
    if (gr != kNoTensor) grads.push_back(gr);
  }
  int64_t n = 0;
  for (TensorId gr : out.param_grads) {
    if (gr != kNoTensor) n += numel(out.graph.tensor(gr).shape);
  }
  // _amp_foreach_non_finite_check_and_unscale_ in place (nothing allocated on the CPU); inv_scale,
  // found_inf and the inv_scale copy die when unscale_ returns; the found_inf copy stays in the
  // per-optimizer state until update().
  b.emit({.kind = OpKind::optim_update, .name = "_amp_foreach_non_finite_check_and_unscale_",
          .inputs = std::move(grads), .holds = {inv, found}, .flops = 2.0 * n,
          .bytes_moved = 2 * n * dtype_size(dt), .kernels = 1});
  scaler.found_inf = found_copy;
}

void Lowering::scaler_update() {
  b.set_phase(Phase::optimizer);
  b.set_layer(-1);
  b.set_scope("grad_scaler");
  // torch._amp_update_scale_(_scale, _growth_tracker, found_inf, ...) in place; then
  // _per_optimizer_states is reset, which releases the found_inf copy.
  b.emit({.kind = OpKind::optim_update, .name = "_amp_update_scale_",
          .inputs = {scaler.scale, scaler.growth_tracker, scaler.found_inf}, .flops = 4, .bytes_moved = 12,
          .kernels = 1});
}

void Lowering::zero_grad() {
  b.set_layer(-1);
  b.set_scope("");
  Op z{.kind = OpKind::zero_grad, .name = "optimizer.zero_grad", .kernels = 0};
  for (TensorId t : out.param_grads) {
    if (t != kNoTensor) z.releases.push_back(t);
  }
  b.emit(std::move(z));
}

}  // namespace actsim::graph
