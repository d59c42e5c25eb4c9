// Lowering of Hugging Face transformers' Llama-style decoders (Family::hf_llama): LlamaForCausalLM
// and the families that run the same code with other flags (MistralForCausalLM, Qwen2ForCausalLM,
// Qwen3ForCausalLM, Phi3ForCausalLM, GemmaForCausalLM, Gemma2ForCausalLM, MixtralForCausalLM with its
// MoE block in lower_hf_moe.cpp), op for op as transformers 5.18.0's modeling_llama.py / modeling_qwen3.py / modeling_gemma.py run
// them in training with `model(input_ids=x, labels=y).loss`: the DynamicCache the forward fills
// when config.use_cache is on, create_causal_mask (none for sdpa, a (B, 1, T, T) additive mask for
// eager), the rotary embedding computed once per forward, RMSNorm in fp32, rotate_half, sdpa with
// enable_gqa or eager attention with repeat_kv, and ForCausalLMLoss (upcast, pad, shift, cross
// entropy).
#include <cmath>

#include "lower_hf.hpp"

namespace actsim::graph {

namespace {

struct HfLlama : HfBase {
  struct Layer {
    TensorId wq, bq = kNoTensor, wk, bk = kNoTensor, wv, bv = kNoTensor, wo, bo = kNoTensor, q_norm = kNoTensor,
        k_norm = kNoTensor, wqkv = kNoTensor, gate_up = kNoTensor, gate = kNoTensor, gate_b = kNoTensor, up, up_b = kNoTensor, down, down_b = kNoTensor, in_norm, post_norm,
        pre_ff_norm = kNoTensor, post_ff_norm = kNoTensor,  // Gemma2
        router = kNoTensor;                                 // Mixtral: mlp.gate (gate_up, down: the experts')
  };

  int64_t rd;
  explicit HfLlama(Lowering& lw)
      : HfBase(lw), rd(static_cast<int64_t>(static_cast<double>(lw.m.hd()) * lw.m.partial_rotary)) {}

  TensorId param(const std::string& name, const Shape& shape) { return l.param(name, shape); }
  TensorId maybe_bias(bool on, const std::string& name, int64_t n) { return on ? param(name, {n}) : kNoTensor; }

  // LlamaRMSNorm: to(float32), pow(2).mean(-1, keepdim), x * rsqrt(var + eps), weight * x.to(input_dtype).
  TensorId rmsnorm(TensorId x, TensorId w) {
    if (m.gemma) return gemma_rmsnorm(x, w);
    const DType in_dt = t(x).dtype;
    TensorId h = cast(x, DType::f32);
    TensorId var = b.mean_last(b.pow2(h));
    TensorId r = b.unary(OpKind::rsqrt, b.scalar_op(OpKind::add_scalar, var, m.norm_eps));
    h = mul(h, r);
    h = cast(h, in_dt);
    return like(b.binary(OpKind::mul, w, h), h);
  }

  // GemmaRMSNorm: output = _norm(x.float()); output * (1.0 + self.weight.float()); .type_as(x).
  TensorId gemma_rmsnorm(TensorId x, TensorId w) {
    const DType in_dt = t(x).dtype;
    TensorId h = cast(x, DType::f32);
    TensorId var = b.mean_last(b.pow2(h));
    TensorId r = b.unary(OpKind::rsqrt, b.scalar_op(OpKind::add_scalar, var, m.norm_eps));
    h = mul(h, r);
    TensorId w1 = b.scalar_op(OpKind::add_scalar, cast(w, DType::f32), 1.0);
    h = mul(h, w1);
    return cast(h, in_dt);
  }

  // q * cos + rotate_half(q) * sin, rotate_half(x) = cat(-x[..., n/2:], x[..., :n/2]).
  TensorId rope_full(TensorId x, TensorId cos, TensorId sin) {
    const int64_t n = t(x).shape.back();
    TensorId xc = mul(x, cos);
    TensorId x1 = b.slice(x, -1, 0, n / 2, 1);
    TensorId x2 = b.slice(x, -1, n / 2, n, 1);
    TensorId rot = cat_last(neg(x2), x1);
    return add(xc, mul(rot, sin));
  }
  // Partial rotary (rotary_dim < head_dim) and Phi3: cat([rope(x[..., :rd]), x[..., rd:]]). A
  // slice of the whole dim is x itself (Python indexing's fast path); the pass-through may be empty.
  TensorId rope(TensorId x, TensorId cos, TensorId sin) {
    if (rd == hd && !m.fused_qkv_mlp) return rope_full(x, cos, sin);
    TensorId xr = rd == hd ? x : b.slice(x, -1, 0, rd, 1);
    TensorId pass = b.slice(x, -1, rd, hd, 1);
    return cat_last(rope_full(xr, cos, sin), pass);
  }

  TensorId repeat_kv(TensorId x, int64_t n_rep) {
    if (n_rep == 1) return x;
    const Shape s = t(x).shape;  // (B, kvh, T, hd)
    TensorId e = b.expand(b.unsqueeze(x, 2), {s[0], s[1], n_rep, s[2], s[3]});
    return b.reshape(e, {s[0], s[1] * n_rep, s[2], s[3]});
  }

  TensorId proj_heads(int i, const std::string& s, const char* name, TensorId x, TensorId w, TensorId bias,
                      int64_t heads, TensorId norm) {
    l.scope(i, s + "." + name);
    TensorId y = b.view(l.linear(x, w, opt(bias)), {B, T, heads, hd});
    if (norm != kNoTensor) {
      l.scope(i, s + "." + std::string(name).substr(0, 1) + "_norm");
      y = rmsnorm(y, norm);
    }
    return b.transpose(y, 1, 2);
  }

  TensorId attention(int i, const Layer& p, TensorId x, TensorId cos, TensorId sin, TensorId mask,
                     std::vector<TensorId>& cache) {
    const std::string s = fmt::format("model.layers.{}.self_attn", i);
    TensorId q, k, v;
    if (m.fused_qkv_mlp) {  // Phi3: qkv = qkv_proj(x); q, k, v = slices of its last dim
      l.scope(i, s + ".qkv_proj");
      TensorId qkv = l.linear(x, p.wqkv, std::nullopt);
      l.scope(i, s);
      auto heads = [&](int64_t from, int64_t n) {
        return b.transpose(b.view(b.slice(qkv, -1, from * hd, (from + n) * hd, 1), {B, T, n, hd}), 1, 2);
      };
      q = heads(0, H);
      k = heads(H, KV);
      v = heads(H + KV, KV);
    } else {
      q = proj_heads(i, s, "q_proj", x, p.wq, p.bq, H, p.q_norm);
      k = proj_heads(i, s, "k_proj", x, p.wk, p.bk, KV, p.k_norm);
      v = proj_heads(i, s, "v_proj", x, p.wv, p.bv, KV, kNoTensor);
    }
    l.scope(i, s + ".rotary");
    TensorId cu = b.unsqueeze(cos, 1), su = b.unsqueeze(sin, 1);
    q = rope(q, cu, su);
    k = rope(k, cu, su);
    l.scope(i, s);
    if (use_cache) {
      k = cache_copy(k);
      v = cache_copy(v);
      cache.push_back(k);
      cache.push_back(v);
    }
    TensorId o;
    l.core_begin(i);
    if (m.attention == Attention::flash) {
      // sdpa_attention_forward: enable_gqa when there is no mask and head_dim <= 256, else repeat_kv.
      if (H != KV && hd > 256) {
        k = repeat_kv(k, H / KV);
        v = repeat_kv(v, H / KV);
      }
      o = b.flash_attention(q, k, v, 0.0);
    } else {
      // eager_attention_forward
      TensorId kr = repeat_kv(k, H / KV), vr = repeat_kv(v, H / KV);
      TensorId w = b.matmul(q, b.transpose(kr, 2, 3));
      w = b.scalar_op(OpKind::mul_scalar, w, m.query_scale > 0 ? m.query_scale : 1.0 / std::sqrt(static_cast<double>(hd)));
      // Gemma2's attn_logit_softcapping: attn_weights / softcap, tanh, * softcap (sdpa drops it).
      if (m.attn_softcap > 0) w = softcap(w, m.attn_softcap);
      w = b.binary(OpKind::add, w, mask);
      // softmax(dim=-1, dtype=float32).to(query.dtype)
      w = cast(b.unary(OpKind::softmax, cast(w, DType::f32)), t(q).dtype);
      w = b.dropout(w, m.attention_dropout);
      o = b.matmul(w, vr);
    }
    l.core_end(i);
    o = b.view(b.contiguous(b.transpose(o, 1, 2)), {B, T, H * hd});
    l.scope(i, s + ".o_proj");
    return l.linear(o, p.wo, opt(p.bo));
  }

  TensorId layer(int i, const Layer& p, TensorId x, TensorId cos, TensorId sin, TensorId mask,
                 std::vector<TensorId>& cache) {
    l.enter_block(i);
    const std::string s = fmt::format("model.layers.{}", i);
    l.scope(i, s + ".input_layernorm");
    TensorId h = rmsnorm(x, p.in_norm);
    TensorId a = attention(i, p, h, cos, sin, mask, cache);
    if (m.gemma2) {  // Gemma2DecoderLayer: post_attention_layernorm on the attention output
      l.scope(i, s + ".post_attention_layernorm");
      a = rmsnorm(a, p.post_norm);
    }
    l.scope(i, s);
    x = add(x, b.dropout(a, m.dropout));  // Phi3's resid_attn_dropout (resid_pdrop)
    l.scope(i, s);
    l.mlp_begin(i);
    if (m.gemma2) {
      l.scope(i, s + ".pre_feedforward_layernorm");
      h = rmsnorm(x, p.pre_ff_norm);
    } else {
      l.scope(i, s + ".post_attention_layernorm");
      h = rmsnorm(x, p.post_norm);
    }
    if (m.n_experts > 0) {  // MixtralSparseMoeBlock
      TensorId f = moe(i, s + ".mlp", h, p.router, p.gate_up, p.down);
      l.scope(i, s);
      TensorId out = add(x, f);
      l.mlp_end(i);
      l.leave_block();
      b.block_outputs.push_back(out);
      return out;
    }
    if (m.fused_qkv_mlp) {
      // Phi3MLP: gate, up = gate_up_proj(x).chunk(2, dim=-1); down_proj(up * act_fn(gate))
      l.scope(i, s + ".mlp.gate_up_proj");
      auto parts = b.split(l.linear(h, p.gate_up, std::nullopt), ff, 2);
      l.scope(i, s + ".mlp.activation_fn");
      TensorId act = b.unary(OpKind::silu, parts[0]);
      l.scope(i, s + ".mlp");
      TensorId gu = b.binary(OpKind::mul, parts[1], act);
      l.scope(i, s + ".mlp.down_proj");
      TensorId f = l.linear(gu, p.down, std::nullopt);
      l.scope(i, s);
      TensorId out = add(x, b.dropout(f, m.dropout));
      l.mlp_end(i);
      l.leave_block();
      b.block_outputs.push_back(out);
      return out;
    }
    // down_proj(act_fn(gate_proj(x)) * up_proj(x))
    l.scope(i, s + ".mlp.gate_proj");
    TensorId gt = l.linear(h, p.gate, opt(p.gate_b));
    l.scope(i, s + ".mlp.act_fn");
    gt = b.unary(m.gemma ? OpKind::gelu_tanh : OpKind::silu, gt);  // Gemma: gelu_pytorch_tanh
    l.scope(i, s + ".mlp.up_proj");
    TensorId up = l.linear(h, p.up, opt(p.up_b));
    l.scope(i, s + ".mlp");
    TensorId gu = b.binary(OpKind::mul, gt, up);
    l.scope(i, s + ".mlp.down_proj");
    TensorId f = l.linear(gu, p.down, opt(p.down_b));
    if (m.gemma2) {
      l.scope(i, s + ".post_feedforward_layernorm");
      f = rmsnorm(f, p.post_ff_norm);
    }
    l.scope(i, s);
    TensorId out = add(x, f);
    l.mlp_end(i);
    l.leave_block();
    b.block_outputs.push_back(out);
    return out;
  }

  // transformers turns the cache off when gradient checkpointing is on in training
  // (GradientCheckpointingLayer: "`use_cache=True` is incompatible with gradient checkpointing").
  bool use_cache = false;

  void run() {
    use_cache = m.use_cache;
    for (int i = 0; i < m.n_layers; ++i) use_cache = use_cache && l.mode(i) != BlockMode::recompute;
    // Parameters in model.parameters() order (module registration order).
    TensorId emb = param("model.embed_tokens.weight", {V, d});
    // GemmaTextScaledWordEmbedding's embed_scale: a 0-dim buffer (sqrt(hidden_size)), cast with the model.
    TensorId embed_scale = m.gemma ? l.buffer("model.embed_tokens.embed_scale", {}) : kNoTensor;
    std::vector<Layer> layers(static_cast<size_t>(m.n_layers));
    for (int i = 0; i < m.n_layers; ++i) {
      auto n = [&](const char* x) { return fmt::format("model.layers.{}.{}", i, x); };
      b.set_layer(i);
      Layer& p = layers[static_cast<size_t>(i)];
      if (m.fused_qkv_mlp) {  // Phi3Attention registers o_proj before qkv_proj
        p.wo = l.linear_weight(n("self_attn.o_proj"), {d, H * hd});
        p.wqkv = l.linear_weight(n("self_attn.qkv_proj"), {(H + 2 * KV) * hd, d});
        p.gate_up = l.linear_weight(n("mlp.gate_up_proj"), {2 * ff, d});
        p.down = l.linear_weight(n("mlp.down_proj"), {d, ff});
        p.in_norm = param(n("input_layernorm.weight"), {d});
        p.post_norm = param(n("post_attention_layernorm.weight"), {d});
        continue;
      }
      p.wq = l.linear_weight(n("self_attn.q_proj"), {H * hd, d});
      p.bq = maybe_bias(m.qkv_bias, n("self_attn.q_proj.bias"), H * hd);
      p.wk = l.linear_weight(n("self_attn.k_proj"), {KV * hd, d});
      p.bk = maybe_bias(m.qkv_bias, n("self_attn.k_proj.bias"), KV * hd);
      p.wv = l.linear_weight(n("self_attn.v_proj"), {KV * hd, d});
      p.bv = maybe_bias(m.qkv_bias, n("self_attn.v_proj.bias"), KV * hd);
      p.wo = l.linear_weight(n("self_attn.o_proj"), {d, H * hd});
      p.bo = maybe_bias(m.o_bias, n("self_attn.o_proj.bias"), d);
      if (m.qk_norm) {
        p.q_norm = param(n("self_attn.q_norm.weight"), {hd});
        p.k_norm = param(n("self_attn.k_norm.weight"), {hd});
      }
      if (m.n_experts > 0) {  // MixtralSparseMoeBlock: gate (the router), experts' stacked weights
        p.router = param(n("mlp.gate.weight"), {m.n_experts, d});
        p.gate_up = param(n("mlp.experts.gate_up_proj"), {m.n_experts, 2 * ff, d});
        p.down = param(n("mlp.experts.down_proj"), {m.n_experts, d, ff});
        p.in_norm = param(n("input_layernorm.weight"), {d});
        p.post_norm = param(n("post_attention_layernorm.weight"), {d});
        continue;
      }
      p.gate = l.linear_weight(n("mlp.gate_proj"), {ff, d});
      p.gate_b = maybe_bias(m.mlp_bias, n("mlp.gate_proj.bias"), ff);
      p.up = l.linear_weight(n("mlp.up_proj"), {ff, d});
      p.up_b = maybe_bias(m.mlp_bias, n("mlp.up_proj.bias"), ff);
      p.down = l.linear_weight(n("mlp.down_proj"), {d, ff});
      p.down_b = maybe_bias(m.mlp_bias, n("mlp.down_proj.bias"), d);
      p.in_norm = param(n("input_layernorm.weight"), {d});
      p.post_norm = param(n("post_attention_layernorm.weight"), {d});
      if (m.gemma2) {
        p.pre_ff_norm = param(n("pre_feedforward_layernorm.weight"), {d});
        p.post_ff_norm = param(n("post_feedforward_layernorm.weight"), {d});
      }
    }
    b.set_layer(-1);
    TensorId norm = param("model.norm.weight", {d});
    // LlamaRotaryEmbedding's buffers: inv_freq and original_inv_freq (hd/2 each, cast with the model).
    TensorId inv_freq = l.buffer("model.rotary_emb.inv_freq", {rd / 2});
    // longrope_frequency_update: register_buffer("inv_freq", original_inv_freq) -- one storage.
    if (!m.longrope) (void)l.buffer("model.rotary_emb.original_inv_freq", {rd / 2});
    TensorId lm_head = m.tied() ? l.tied_linear("lm_head", emb) : l.linear_weight("lm_head", {V, d});
    if (l.params_only) return;
    TensorId idx = b.leaf("input_ids", {B, T}, DType::i64, Category::input, false);
    TensorId labels = b.leaf("labels", {B, T}, DType::i64, Category::input, false);

    l.scope(-1, "model.embed_tokens");
    TensorId x = b.embedding(emb, idx);
    // Gemma: embedding(input_ids) * self.embed_scale.to(self.weight.dtype) (the same dtype: the buffer itself).
    if (m.gemma) x = mul(x, embed_scale);
    std::vector<TensorId> cache;
    // Gemma2's DynamicCache(config): each sliding_attention layer's DynamicSlidingWindowLayer holds
    // torch.tensor(sliding_window, dtype=torch.long), kept with the cache until forward returns.
    if (use_cache && m.gemma2) {
      l.scope(-1, "model.past_key_values");
      for (int64_t i = 0; i < m.n_sliding_layers; ++i) {
        TensorId sw = b.fresh("sliding_window_tensor", {1}, DType::i64);  // 0-dim; {1} for the arange contract
        b.emit({.kind = OpKind::arange, .name = "sliding_window_tensor", .outputs = {sw}, .bytes_moved = 8});
        cache.push_back(sw);
      }
    }
    l.scope(-1, "model");
    TensorId pos = position_ids();
    TensorId mask = m.attention == Attention::eager ? causal_mask(pos) : kNoTensor;
    // Gemma2Model: causal_mask_mapping holds create_causal_mask's and create_sliding_window_causal_mask's
    // masks (both (B, 1, T, T) under eager; the sliding one is None under sdpa while T < sliding_window).
    TensorId sliding_mask = kNoTensor;
    if (m.gemma2 && m.attention == Attention::eager) {
      sliding_mask = causal_mask(pos);
      g().mutable_tensor(sliding_mask).name = "sliding_causal_mask";
      g().mutable_op(t(mask).producer).params.start = 0;  // create_causal_mask's: no window
    }
    // LlamaRotaryEmbedding.forward under no_grad: inv_freq @ position_ids in fp32, cat, cos/sin
    // times attention_scaling, .to(x.dtype). The fp32 intermediates are transient.
    l.scope(-1, "model.rotary_emb");
    TensorId cos = b.fresh("cos", {1, T, rd}, dt), sin = b.fresh("sin", {1, T, rd}, dt);
    const int64_t f32 = 4, ws = T * f32 + T * (rd / 2) * f32 + 2 * T * rd * f32 + (dt == DType::f32 ? 0 : 2 * T * rd * f32);
    b.emit({.kind = OpKind::rotary_table, .name = "rotary_emb", .inputs = {inv_freq, pos}, .outputs = {cos, sin},
            .workspace_bytes = ws, .flops = 4.0 * T * hd, .bytes_moved = 2 * g().view_bytes(cos),
            .params = {.scalar = m.rope_theta}});
    for (int i = 0; i < m.n_layers; ++i) x = layer(i, layers[static_cast<size_t>(i)], x, cos, sin, mask, cache);
    l.scope(-1, "model.norm");
    x = rmsnorm(x, norm);
    // LlamaModel.forward returns: position_ids, the mask and position_embeddings go out of scope.
    b.hold_until_last(pos);
    if (mask != kNoTensor) b.hold_until_last(mask);
    if (sliding_mask != kNoTensor) b.hold_until_last(sliding_mask);
    b.hold_until_last(cos);
    b.hold_until_last(sin);

    causal_lm_loss(x, lm_head, labels, cache);
  }
};

}  // namespace

void lower_hf_llama(Lowering& l) { HfLlama(l).run(); }

}  // namespace actsim::graph
