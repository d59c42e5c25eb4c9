// MixtralSparseMoeBlock (lower_hf.hpp) as transformers 5.18.0 runs it in training: the router
// (MixtralTopKRouter: linear, softmax in fp32, topk, renormalise in place) and the experts under
// the default experts implementation, "grouped_mm" (integrations/moe.py
// grouped_mm_experts_forward): the S = tokens x top_k routed rows sorted by expert, one
// torch.nn.functional.grouped_mm for gate_up_proj and one for down_proj, the routing weights, the
// inverse permutation and a sum over top_k. Every tensor's size depends on S only, so the bytes do
// not depend on how the router spreads the tokens over the experts (an expert with no token still
// gets its zero gradient in grouped_mm's backward).
#include "lower_hf.hpp"

namespace actsim::graph {

TensorId HfBase::moe(int i, const std::string& s, TensorId h, TensorId router, TensorId gate_up, TensorId down) {
  const int64_t N = B * T, k = m.experts_top_k, E = m.n_experts, S = N * k;
  // Routing bookkeeping without gradient: `outs` of the given shapes and dtypes, plus transients.
  auto index_op = [&](const char* name, TensorId x, std::vector<std::pair<Shape, DType>> outs, int64_t ws) {
    std::vector<TensorId> o;
    for (auto& [sh, dt_] : outs) o.push_back(b.fresh(name, sh, dt_));
    int64_t moved = g().view_bytes(x);
    for (TensorId t_ : o) moved += g().view_bytes(t_);
    b.emit({.kind = OpKind::moe_index, .name = name, .inputs = {x}, .outputs = o, .workspace_bytes = ws,
            .bytes_moved = moved});
    return o;
  };
  auto grouped_mm = [&](TensorId x, TensorId w_t, TensorId offs) {
    const Shape ws = t(w_t).shape;  // (E, in, out)
    TensorId out = b.fresh("grouped_mm", {t(x).shape[0], ws[2]}, t(x).dtype);
    b.emit({.kind = OpKind::grouped_mm, .name = "grouped_mm", .inputs = {x, w_t, offs}, .outputs = {out},
            .flops = 2.0 * static_cast<double>(t(x).shape[0] * ws[1] * ws[2]),
            .bytes_moved = g().view_bytes(x) + g().view_bytes(w_t) + g().view_bytes(out)});
    return out;
  };
  auto sum_dim = [&](TensorId x, int dim, bool keepdim) {
    Shape sh = t(x).shape;
    if (keepdim) sh[static_cast<size_t>(dim)] = 1;
    else sh.erase(sh.begin() + dim);
    TensorId out = b.fresh("sum", sh, t(x).dtype);
    b.emit({.kind = OpKind::sum_dim, .name = "sum", .inputs = {x}, .outputs = {out},
            .flops = static_cast<double>(numel(t(x).shape)), .bytes_moved = g().view_bytes(x) + g().view_bytes(out),
            .params = {.dim0 = static_cast<int16_t>(dim), .start = keepdim ? 1 : 0}});
    return out;
  };

  // MixtralSparseMoeBlock.forward: hidden_states.view(-1, hidden_dim); the router's reshape is the same view.
  l.scope(i, s);
  TensorId x = b.view(h, {N, d});
  // MixtralTopKRouter: logits = F.linear(x, weight); softmax(logits.float()); topk; values /= values.sum(-1, keepdim).
  l.scope(i, s + ".gate");
  TensorId logits = b.mm(x, b.transpose(router, 0, 1));  // F.linear of a 2-D input: mm
  TensorId probs = b.unary(OpKind::softmax, cast(logits, DType::f32));
  TensorId vals = b.fresh("topk.values", {N, k}, DType::f32), idx = b.fresh("topk.indices", {N, k}, DType::i64);
  b.emit({.kind = OpKind::topk, .name = "topk", .inputs = {probs}, .outputs = {vals, idx},
          .flops = static_cast<double>(numel(t(probs).shape)),
          .bytes_moved = g().view_bytes(probs) + g().view_bytes(vals) + g().view_bytes(idx)});
  TensorId denom = sum_dim(vals, 1, true);
  // In place: the result is vals itself; autograd keeps a clone of the original (CloneBackward-free).
  TensorId scores = b.alias(vals, "router_scores", {N, k}, {}, 0);
  TensorId orig = b.fresh("div_.original_self", {N, k}, DType::f32);
  b.emit({.kind = OpKind::div_inplace, .name = "div_", .inputs = {vals, denom}, .outputs = {scores, orig},
          .flops = static_cast<double>(N * k), .bytes_moved = 3 * g().view_bytes(vals)});

  // grouped_mm_experts_forward
  l.scope(i, s + ".experts");
  TensorId weights = b.view(scores, {S, 1});  // top_k_weights.reshape(-1), unsqueezed for the product
  TensorId ids = b.view(idx, {S});
  auto sorted = index_op("sort", ids, {{{S}, DType::i64}, {{S}, DType::i64}}, S * 8);  // sort's arange
  TensorId ids_g = sorted[0], perm = sorted[1];
  // perm // num_top_k: the Python int is a wrapped 0-dim int64 tensor while it runs.
  TensorId rows = index_op("floor_divide", perm, {{{S}, DType::i64}}, 8)[0];
  TensorId sel = b.index_rows(x, rows);           // hidden_states[perm // num_top_k]
  TensorId w_g = b.index_rows(weights, perm);     // sample_weights[perm]
  // histc(expert_ids_g.float(), bins=E): its (E + 1) float counts and zeros; cumsum(dtype=int32) casts first.
  TensorId hin = index_op("to", ids_g, {{{S}, DType::f32}}, 0)[0];
  TensorId hist = index_op("histc", hin, {{{E}, DType::f32}}, (E + 1) * 4 + E * 4)[0];
  TensorId offs = index_op("cumsum", hist, {{{E}, DType::i32}}, E * 4)[0];
  TensorId gu = grouped_mm(sel, b.transpose(gate_up, 1, 2), offs);
  auto parts = b.split(gu, ff, 1);  // _default_apply_gate: gate, up = chunk(2, dim=-1); act_fn(gate) * up
  TensorId act = b.unary(OpKind::silu, parts[0]);
  TensorId prod = b.binary(OpKind::mul, act, parts[1]);
  TensorId y = grouped_mm(prod, b.transpose(down, 1, 2), offs);
  // proj_out * sample_weights_g.unsqueeze(-1): the float32 weights first, for the result dtype.
  TensorId weighted = b.binary(OpKind::mul, w_g, y);
  // inv_perm = empty_like(perm); inv_perm[perm] = arange(S) (a transient arange).
  TensorId inv = index_op("inv_perm", perm, {{{S}, DType::i64}}, S * 8)[0];
  TensorId restored = b.index_rows(weighted, inv);
  TensorId out = sum_dim(b.view(restored, {N, k, d}), 1, false);
  out = cast(out, t(h).dtype);
  // grouped_mm_experts_forward returns: its locals go (the sorted ids, histc's input and output, the
  // restored rows); then MixtralSparseMoeBlock.forward's (the router logits, the routing weights).
  for (TensorId z : {ids_g, hin, hist, restored}) b.hold_until_last(z);
  l.scope(i, s);
  out = b.view(out, t(h).shape);
  for (TensorId z : {logits, scores}) b.hold_until_last(z);
  return out;
}

}  // namespace actsim::graph
