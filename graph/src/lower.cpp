// Lowering of the reference model families (../shared/reference/models.py), op for op, and of
// the optimizer step (torch/optim/{adamw,adam,sgd}.py).
#include "actsim/graph/lower.hpp"

#include <fmt/format.h>

#include <cmath>

#include "actsim/util/error.hpp"
#include "autodiff.hpp"
#include "builder.hpp"

namespace actsim::graph {

int64_t ModelConfig::ff() const { return d_ff > 0 ? d_ff : default_d_ff(family, d_model); }

int64_t default_d_ff(Family f, int64_t d) {
  if (f == Family::gpt2) return 4 * d;
  return 8 * ((static_cast<int64_t>(2 * 4 * d / 3.0) + 7) / 8);
}

std::string_view to_string(Family f) { return f == Family::gpt2 ? "gpt2" : "llama"; }
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

namespace {

struct Lowering {
  const ModelConfig& m;
  const TrainingConfig& tr;
  const RuntimeProfile& prof;
  StepGraph out;
  Builder b;
  DType dt;

  const BlockPlan* plan = nullptr;

  Lowering(const ModelConfig& mc, const TrainingConfig& tc, const RuntimeProfile& p, const BlockPlan* bp)
      : m(mc), tr(tc), prof(p), b(out.graph, p, tc.dtype), dt(tc.dtype), plan(bp) {
    out.graph.alloc_granularity = p.alloc_granularity;
  }

  // Checkpointing: region ids are unique per recomputed unit (a segment, a block's attention core,
  // a block under ops:LIST).
  static constexpr int32_t kSelectiveRegion = 1 << 20, kOpsRegion = 2 << 20, kBlockRegion = 3 << 20,
                           kMlpRegion = 4 << 20;
  BlockMode mode(int i) const { return plan ? plan->mode[static_cast<size_t>(i)] : BlockMode::keep; }
  void enter_block(int i) {
    switch (mode(i)) {
      case BlockMode::recompute: {
        const int32_t r = plan->before_backward.empty() ? plan->segment[static_cast<size_t>(i)] : kBlockRegion + i;
        // A new checkpoint call (every:K spans K blocks): it stashes the RNG state first.
        if (!b.rng_stash.count(r)) b.rng_stash[r] = b.stash_rng("checkpoint.rng_state");
        b.set_region(r);
        break;
      }
      case BlockMode::ops:  // selective activation checkpointing: a checkpoint call too
        b.rng_stash[kOpsRegion + i] = b.stash_rng("checkpoint.rng_state");
        b.set_region(kOpsRegion + i, &plan->keep_kinds);
        break;
      case BlockMode::offload: b.set_offload(true); break;
      default: break;
    }
  }
  void leave_block() {
    b.set_region(-1);
    b.set_offload(false);
  }
  // Megatron-LM selective recompute: the attention core (scores, mask, softmax, dropout, x V).
  void core_begin(int i) {
    if (mode(i) != BlockMode::selective) return;
    b.rng_stash[kSelectiveRegion + i] = b.stash_rng("checkpoint.rng_state");  // one checkpoint call
    b.set_region(kSelectiveRegion + i);
  }
  void core_end(int i) {
    if (mode(i) == BlockMode::selective) b.set_region(-1);
  }
  // Half-block checkpointing: the MLP sublayer of block i (norm, MLP, residual add) as one
  // checkpoint call, from the mid-block residual to the block output (two consecutive cut tensors).
  void mlp_begin(int i) {
    if (mode(i) != BlockMode::mlp) return;
    b.rng_stash[kMlpRegion + i] = b.stash_rng("checkpoint.rng_state");
    b.set_region(kMlpRegion + i);
  }
  void mlp_end(int i) {
    if (mode(i) == BlockMode::mlp) b.set_region(-1);
  }

  TensorId param(const std::string& name, const Shape& shape) {
    TensorId t = b.leaf(name, shape, dt, Category::parameter, true);
    out.params.push_back(t);
    return t;
  }
  TensorId buffer(const std::string& name, const Shape& shape) {
    return b.leaf(name, shape, dt, Category::buffer, false);
  }
  void scope(int32_t layer, const std::string& s) {
    b.set_layer(layer);
    b.set_scope(s);
  }

  // ---- GPT-2 (nanoGPT) ----------------------------------------------------------------------
  struct Gpt2Block {
    TensorId ln1_w, ln1_b, c_attn_w, c_attn_b, c_proj_w, c_proj_b, ln2_w, ln2_b, fc_w, fc_b, proj_w, proj_b, mask;
  };

  TensorId gpt2_attention(int i, const Gpt2Block& p, TensorId x) {
    const int64_t B = tr.batch_size, T = m.seq_len, C = m.d_model, H = m.n_heads, hd = C / H;
    const std::string s = fmt::format("blocks.{}.attn", i);
    scope(i, s + ".c_attn");
    TensorId qkv = b.linear(x, p.c_attn_w, p.c_attn_b);
    scope(i, s);
    auto parts = b.split(qkv, C, 2);
    TensorId k = b.transpose(b.view(parts[1], {B, T, H, hd}), 1, 2);
    TensorId q = b.transpose(b.view(parts[0], {B, T, H, hd}), 1, 2);
    TensorId v = b.transpose(b.view(parts[2], {B, T, H, hd}), 1, 2);
    TensorId y;
    core_begin(i);
    if (m.attention == Attention::flash) {
      y = b.flash_attention(q, k, v, m.dropout);
    } else {
      TensorId att = b.matmul(q, b.transpose(k, -2, -1));
      att = b.scalar_op(OpKind::mul_scalar, att, 1.0 / std::sqrt(static_cast<double>(hd)));
      // self.bias[:, :, :T, :T] is the whole buffer (T == block_size): the slice is skipped.
      TensorId mask = b.eq_scalar(p.mask, 0.0);
      att = b.masked_fill(att, mask);
      att = b.unary(OpKind::softmax, att);
      scope(i, s + ".attn_dropout");
      att = b.dropout(att, m.dropout);
      scope(i, s);
      y = b.matmul(att, v);
    }
    core_end(i);
    y = b.view(b.contiguous(b.transpose(y, 1, 2)), {B, T, C});
    scope(i, s + ".c_proj");
    y = b.linear(y, p.c_proj_w, p.c_proj_b);
    scope(i, s + ".resid_dropout");
    return b.dropout(y, m.dropout);
  }

  TensorId gpt2_block(int i, const Gpt2Block& p, TensorId x) {
    enter_block(i);
    TensorId out = gpt2_block_ops(i, p, x);
    leave_block();
    b.block_outputs.push_back(out);
    return out;
  }

  TensorId gpt2_block_ops(int i, const Gpt2Block& p, TensorId x) {
    const std::string s = fmt::format("blocks.{}", i);
    scope(i, s + ".ln_1");
    TensorId h = b.layer_norm(x, p.ln1_w, p.ln1_b);
    TensorId a = gpt2_attention(i, p, h);
    scope(i, s);
    x = b.binary(OpKind::add, x, a);
    scope(i, s);
    mlp_begin(i);
    scope(i, s + ".ln_2");
    h = b.layer_norm(x, p.ln2_w, p.ln2_b);
    scope(i, s + ".mlp.c_fc");
    TensorId f = b.linear(h, p.fc_w, p.fc_b);
    scope(i, s + ".mlp.gelu");
    f = b.unary(OpKind::gelu_tanh, f);
    scope(i, s + ".mlp.c_proj");
    f = b.linear(f, p.proj_w, p.proj_b);
    scope(i, s + ".mlp.dropout");
    f = b.dropout(f, m.dropout);
    scope(i, s);
    x = b.binary(OpKind::add, x, f);
    mlp_end(i);
    return x;
  }

  void gpt2() {
    const int64_t V = m.vocab_size, S = m.seq_len, d = m.d_model, ff = m.ff(), L = m.n_layers;
    const int64_t B = tr.batch_size, T = m.seq_len;
    // Parameters in model.parameters() order: wte (tied with lm_head), wpe, blocks, ln_f.
    TensorId wte = param("wte.weight", {V, d});  // named_parameters() names a tied weight once, first
    TensorId wpe = param("wpe.weight", {S, d});
    std::vector<Gpt2Block> blocks(L);
    for (int i = 0; i < L; ++i) {
      auto n = [&](const char* x) { return fmt::format("blocks.{}.{}", i, x); };
      b.set_layer(i);
      Gpt2Block& p = blocks[i];
      p.ln1_w = param(n("ln_1.weight"), {d});
      p.ln1_b = param(n("ln_1.bias"), {d});
      p.c_attn_w = param(n("attn.c_attn.weight"), {3 * d, d});
      p.c_attn_b = param(n("attn.c_attn.bias"), {3 * d});
      p.c_proj_w = param(n("attn.c_proj.weight"), {d, d});
      p.c_proj_b = param(n("attn.c_proj.bias"), {d});
      p.ln2_w = param(n("ln_2.weight"), {d});
      p.ln2_b = param(n("ln_2.bias"), {d});
      p.fc_w = param(n("mlp.c_fc.weight"), {ff, d});
      p.fc_b = param(n("mlp.c_fc.bias"), {ff});
      p.proj_w = param(n("mlp.c_proj.weight"), {d, ff});
      p.proj_b = param(n("mlp.c_proj.bias"), {d});
      p.mask = buffer(n("attn.bias"), {1, 1, S, S});
    }
    b.set_layer(-1);
    TensorId lnf_w = param("ln_f.weight", {d});
    TensorId lnf_b = param("ln_f.bias", {d});
    TensorId lm_head = m.tied() ? wte : param("lm_head.weight", {V, d});
    TensorId idx = b.leaf("idx", {B, T}, DType::i64, Category::input, false);
    TensorId targets = b.leaf("targets", {B, T}, DType::i64, Category::input, false);

    scope(-1, "");
    TensorId pos = b.arange(T);
    scope(-1, "wte");
    TensorId tok = b.embedding(wte, idx);
    scope(-1, "wpe");
    TensorId pe = b.embedding(wpe, pos);
    scope(-1, "");
    TensorId x = b.binary(OpKind::add, tok, pe);
    scope(-1, "drop");
    x = b.dropout(x, m.dropout);
    for (int i = 0; i < L; ++i) x = gpt2_block(i, blocks[i], x);
    scope(-1, "ln_f");
    x = b.layer_norm(x, lnf_w, lnf_b);
    finish_loss(x, lm_head, targets, pos);
  }

  // Shared tail of both families: logits, cross-entropy; `logits` and `held` stay referenced by
  // the Python frame until forward returns (after the loss).
  void finish_loss(TensorId x, TensorId lm_head, TensorId targets, TensorId held) {
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

  // ---- Llama ---------------------------------------------------------------------------------
  struct LlamaBlock {
    TensorId attn_norm, wq, wk, wv, wo, ffn_norm, w1, w2, w3;
  };

  TensorId rmsnorm(TensorId x, TensorId w) {
    // x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight
    TensorId r = b.unary(OpKind::rsqrt, b.scalar_op(OpKind::add_scalar, b.mean_last(b.pow2(x)), 1e-5));
    return b.binary(OpKind::mul, b.binary(OpKind::mul, x, r), w);
  }

  TensorId rope(TensorId x, TensorId cos_c, TensorId sin_c, TensorId pos) {
    const int64_t hd = m.d_model / m.n_heads;
    TensorId cos = b.index_rows(cos_c, pos);
    TensorId sin = b.index_rows(sin_c, pos);
    TensorId x1 = b.slice(x, -1, 0, hd, 2);
    TensorId x2 = b.slice(x, -1, 1, hd, 2);
    TensorId r0 = b.binary(OpKind::sub, b.binary(OpKind::mul, x1, cos), b.binary(OpKind::mul, x2, sin));
    TensorId r1 = b.binary(OpKind::add, b.binary(OpKind::mul, x1, sin), b.binary(OpKind::mul, x2, cos));
    Shape sh = b.graph().tensor(x).shape;
    TensorId outp = b.reshape(b.stack_last(r0, r1), sh);  // .flatten(-2)
    b.hold_until_last(cos);
    b.hold_until_last(sin);
    return outp;
  }

  TensorId repeat_kv(TensorId x, int64_t n_rep) {
    if (n_rep == 1) return x;
    Shape s = b.graph().tensor(x).shape;  // (B, kvh, T, hd)
    TensorId e = b.expand(b.unsqueeze(x, 2), {s[0], s[1], n_rep, s[2], s[3]});
    return b.reshape(e, {s[0], s[1] * n_rep, s[2], s[3]});
  }

  TensorId llama_attention(int i, const LlamaBlock& p, TensorId x, TensorId cos_c, TensorId sin_c, TensorId pos) {
    const int64_t B = tr.batch_size, T = m.seq_len, d = m.d_model, H = m.n_heads, KV = m.kv_heads(), hd = d / H;
    const std::string s = fmt::format("blocks.{}.attn", i);
    scope(i, s + ".q_proj");
    TensorId q = b.transpose(b.view(b.linear(x, p.wq, std::nullopt), {B, T, H, hd}), 1, 2);
    scope(i, s + ".k_proj");
    TensorId k = b.transpose(b.view(b.linear(x, p.wk, std::nullopt), {B, T, KV, hd}), 1, 2);
    scope(i, s + ".v_proj");
    TensorId v = b.transpose(b.view(b.linear(x, p.wv, std::nullopt), {B, T, KV, hd}), 1, 2);
    scope(i, s + ".rope");
    q = rope(q, cos_c, sin_c, pos);
    k = rope(k, cos_c, sin_c, pos);
    scope(i, s);
    k = repeat_kv(k, H / KV);
    v = repeat_kv(v, H / KV);
    TensorId o;
    core_begin(i);
    if (m.attention == Attention::flash) {
      o = b.flash_attention(q, k, v, 0.0);
    } else {
      TensorId scores = b.matmul(q, b.transpose(k, -2, -1));
      scores = b.scalar_op(OpKind::div_scalar, scores, std::sqrt(static_cast<double>(hd)));
      TensorId mask = b.triu(b.ones_bool(T, T), 1);
      scores = b.masked_fill(scores, mask);
      TensorId probs = b.unary(OpKind::softmax, scores);
      o = b.matmul(probs, v);
      b.hold_until_last(mask);
    }
    core_end(i);
    o = b.view(b.contiguous(b.transpose(o, 1, 2)), {B, T, d});
    scope(i, s + ".o_proj");
    return b.linear(o, p.wo, std::nullopt);
  }

  TensorId llama_block(int i, const LlamaBlock& p, TensorId x, TensorId cos_c, TensorId sin_c, TensorId pos) {
    enter_block(i);
    TensorId out = llama_block_ops(i, p, x, cos_c, sin_c, pos);
    leave_block();
    b.block_outputs.push_back(out);
    return out;
  }

  TensorId llama_block_ops(int i, const LlamaBlock& p, TensorId x, TensorId cos_c, TensorId sin_c, TensorId pos) {
    const std::string s = fmt::format("blocks.{}", i);
    scope(i, s + ".attn_norm");
    TensorId h = rmsnorm(x, p.attn_norm);
    TensorId a = llama_attention(i, p, h, cos_c, sin_c, pos);
    scope(i, s);
    x = b.binary(OpKind::add, x, a);
    scope(i, s);
    mlp_begin(i);
    scope(i, s + ".ffn_norm");
    h = rmsnorm(x, p.ffn_norm);
    // self.w2(F.silu(self.w1(x)) * self.w3(x))
    scope(i, s + ".ffn.w1");
    TensorId g = b.linear(h, p.w1, std::nullopt);
    scope(i, s + ".ffn");
    g = b.unary(OpKind::silu, g);
    scope(i, s + ".ffn.w3");
    TensorId u = b.linear(h, p.w3, std::nullopt);
    scope(i, s + ".ffn");
    TensorId gu = b.binary(OpKind::mul, g, u);
    scope(i, s + ".ffn.w2");
    TensorId f = b.linear(gu, p.w2, std::nullopt);
    scope(i, s);
    x = b.binary(OpKind::add, x, f);
    mlp_end(i);
    return x;
  }

  void llama() {
    const int64_t V = m.vocab_size, S = m.seq_len, d = m.d_model, ff = m.ff(), L = m.n_layers;
    const int64_t H = m.n_heads, KV = m.kv_heads(), hd = d / H;
    const int64_t B = tr.batch_size, T = m.seq_len;
    TensorId emb = param("tok_embeddings.weight", {V, d});
    // One RotaryPositionalEmbedding module shared by all blocks: one pair of tables.
    TensorId cos_c = buffer("rope.cos_cached", {S, hd / 2});
    TensorId sin_c = buffer("rope.sin_cached", {S, hd / 2});
    std::vector<LlamaBlock> blocks(L);
    for (int i = 0; i < L; ++i) {
      auto n = [&](const char* x) { return fmt::format("blocks.{}.{}", i, x); };
      b.set_layer(i);
      LlamaBlock& p = blocks[i];
      p.attn_norm = param(n("attn_norm.weight"), {d});
      p.wq = param(n("attn.q_proj.weight"), {d, d});
      p.wk = param(n("attn.k_proj.weight"), {KV * hd, d});
      p.wv = param(n("attn.v_proj.weight"), {KV * hd, d});
      p.wo = param(n("attn.o_proj.weight"), {d, d});
      p.ffn_norm = param(n("ffn_norm.weight"), {d});
      p.w1 = param(n("ffn.w1.weight"), {ff, d});
      p.w2 = param(n("ffn.w2.weight"), {d, ff});
      p.w3 = param(n("ffn.w3.weight"), {ff, d});
    }
    b.set_layer(-1);
    TensorId norm = param("norm.weight", {d});
    TensorId lm_head = m.tied() ? emb : param("lm_head.weight", {V, d});
    TensorId idx = b.leaf("idx", {B, T}, DType::i64, Category::input, false);
    TensorId targets = b.leaf("targets", {B, T}, DType::i64, Category::input, false);

    scope(-1, "");
    TensorId pos = b.arange(T);
    scope(-1, "tok_embeddings");
    TensorId x = b.embedding(emb, idx);
    for (int i = 0; i < L; ++i) x = llama_block(i, blocks[i], x, cos_c, sin_c, pos);
    scope(-1, "norm");
    x = rmsnorm(x, norm);
    finish_loss(x, lm_head, targets, pos);
  }

  // ---- optimizer -----------------------------------------------------------------------------
  OptimizerImpl resolve_impl() const {
    OptimizerImpl impl = tr.optimizer_impl == OptimizerImpl::profile_default ? prof.default_impl : tr.optimizer_impl;
    return impl;
  }

  void optimizer() {
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
    for (size_t i = 0; i < out.params.size(); ++i) {
      const Tensor& p = g.tensor(out.params[i]);
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
      for (size_t i = 0; i < n; ++i) {
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
      for (size_t i = 0; i < n; ++i) {
        if (grad_of(i) != kNoTensor) update(i, "fused_adam", OptimStep::adam_fused, moments_in(i), 1, 16);
      }
      return;
    }
    if (impl == OptimizerImpl::for_loop) {
      // _single_tensor_adam(w): denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
      // holds sqrt and the division at once, and the previous parameter's denom until reassigned.
      TensorId prev_denom = kNoTensor;
      for (size_t i = 0; i < n; ++i) {
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
    for (size_t i = 0; i < n; ++i) {
      if (grad_of(i) != kNoTensor) update(i, "foreach_moments", OptimStep::adam_moments, moments_in(i), 5, 6, scalar_ws);
    }
    const bool two_lists = prof.foreach_adam_two_lists;
    for (size_t i = 0; i < n; ++i) {
      if (grad_of(i) == kNoTensor) continue;
      sq[i] = temp(i, "foreach_sqrt", OptimStep::adam_sqrt, {st[i].exp_avg_sq, st[i].step}, 0);
    }
    for (size_t i = 0; i < n; ++i) {
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
    for (size_t i = 0; i < n; ++i) {
      if (grad_of(i) != kNoTensor) {
        update(i, "foreach_addcdiv", OptimStep::adam_update, {out.params[i], st[i].exp_avg, denom[i], st[i].step}, 1, 4);
      }
    }
    // Both lists are locals of _multi_tensor_adam(w): released when it returns.
    for (size_t i = 0; i < n; ++i) {
      if (sq[i] != kNoTensor) b.hold_until_last(sq[i]);
      if (denom[i] != kNoTensor && denom[i] != sq[i]) b.hold_until_last(denom[i]);
    }
  }

  void zero_grad() {
    b.set_layer(-1);
    b.set_scope("");
    Op z{.kind = OpKind::zero_grad, .name = "optimizer.zero_grad", .kernels = 0};
    for (TensorId t : out.param_grads) {
      if (t != kNoTensor) z.releases.push_back(t);
    }
    b.emit(std::move(z));
  }
};

void check_config(const ModelConfig& m, const RuntimeProfile& prof) {
  ACTSIM_ASSERT(m.d_model % m.n_heads == 0, "heads must divide d_model (checked by the loader)");
  ACTSIM_ASSERT(m.n_heads % m.kv_heads() == 0, "kv heads must divide heads (checked by the loader)");
  ACTSIM_ASSERT(m.attention == Attention::eager || prof.has_sdpa, "flash attention needs SDPA (checked by the loader)");
}

}  // namespace

namespace {
void lower_model(Lowering& l, const ModelConfig& model, const RuntimeProfile& prof) {
  check_config(model, prof);
  ACTSIM_ASSERT(!l.plan || static_cast<int64_t>(l.plan->mode.size()) == model.n_layers, "plan size != n_layers");
  if (model.family == Family::gpt2) l.gpt2();
  else l.llama();
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
                              const BlockPlan* plan) {
  Lowering l(model, training, prof, plan);
  lower_model(l, model, prof);
  l.out.param_grads = differentiate(l.b, l.out.loss, l.out.params, plan);
  // The training loop's `loss` stays referenced after the step (until the next one reassigns it).
  l.out.graph.storage(l.out.graph.tensor(l.out.loss).storage).keep = true;
  l.optimizer();
  l.zero_grad();
  l.out.graph.freeze();
  return std::move(l.out);
}

}  // namespace actsim::graph
