// Lowering of Hugging Face transformers' GPTNeoXForCausalLM (Family::hf_neox: Pythia, GPT-NeoX), op
// for op as transformers 5.18.0's modeling_gpt_neox.py runs it in training with
// `model(input_ids=x, labels=y).loss`: embed_in, the DynamicCache, position_ids, create_causal_mask
// (eager only), emb_dropout (hidden_dropout), the rotary table once per forward, and per layer
// input_layernorm, the fused query_key_value linear viewed (B, T, H, 3 * head_size), transposed and
// chunked into q, k, v, partial rotary (cat([rope(x[..., :rotary_ndims]), x[..., rotary_ndims:]])),
// sdpa (attention_dropout as SDPA dropout) or eager attention (softmax in fp32, dropout), dense,
// post_attention_dropout, then the parallel residual (mlp(post_attention_layernorm(x)) + attn + x)
// or the sequential one; the MLP is dense_h_to_4h, exact gelu, dense_4h_to_h, post_mlp_dropout.
// final_layer_norm, the untied lm_head and ForCausalLMLoss.
#include <cmath>

#include "lower_hf.hpp"

namespace actsim::graph {

namespace {

struct HfNeox : HfBase {
  struct Layer {
    TensorId ln1_w, ln1_b, ln2_w, ln2_b, qkv_w, qkv_b = kNoTensor, dense_w, dense_b = kNoTensor, fc_w, fc_b, proj_w,
        proj_b;
  };

  int64_t rd;  // rotary_ndims = int(head_size * partial_rotary_factor)
  bool use_cache = false;
  explicit HfNeox(Lowering& lw)
      : HfBase(lw), rd(static_cast<int64_t>(static_cast<double>(lw.m.hd()) * lw.m.partial_rotary)) {}

  // (x * cos) + (rotate_half(x) * sin), rotate_half(x) = cat((-x[..., n/2:], x[..., :n/2]), dim=-1).
  TensorId rope(TensorId x, TensorId cos, TensorId sin) {
    const int64_t n = t(x).shape.back();
    TensorId xc = mul(x, cos);
    TensorId x1 = b.slice(x, -1, 0, n / 2, 1);
    TensorId x2 = b.slice(x, -1, n / 2, n, 1);
    TensorId rot = cat_last(neg(x2), x1);
    return add(xc, mul(rot, sin));
  }

  TensorId attention(int i, const Layer& p, TensorId x, TensorId cos, TensorId sin, TensorId mask,
                     std::vector<TensorId>& cache) {
    const std::string s = fmt::format("gpt_neox.layers.{}.attention", i);
    // qkv = query_key_value(x).view(B, T, -1, 3 * head_size).transpose(1, 2); qkv.chunk(3, dim=-1)
    l.scope(i, s + ".query_key_value");
    TensorId qkv = b.linear(x, p.qkv_w, opt(p.qkv_b));
    l.scope(i, s);
    qkv = b.transpose(b.view(qkv, {B, T, H, 3 * hd}), 1, 2);
    auto parts = b.split(qkv, hd, 3);
    TensorId q = parts[0], k = parts[1], v = parts[2];
    // apply_rotary_pos_emb: cos/sin unsqueezed; q_rot, q_pass, k_rot, k_pass are views (a slice of
    // the whole dim is the tensor itself); q_embed, k_embed, then the two cats.
    l.scope(i, s + ".rotary");
    TensorId cu = b.unsqueeze(cos, 1), su = b.unsqueeze(sin, 1);
    auto rot_part = [&](TensorId y) { return rd == hd ? y : b.slice(y, -1, 0, rd, 1); };
    TensorId qr = rot_part(q), qp = b.slice(q, -1, rd, hd, 1);
    TensorId kr = rot_part(k), kp = b.slice(k, -1, rd, hd, 1);
    TensorId qe = rope(qr, cu, su);
    TensorId ke = rope(kr, cu, su);
    q = cat_last(qe, qp);
    k = cat_last(ke, kp);
    l.scope(i, s);
    if (use_cache) {
      const DType key_dtype = t(k).dtype;
      k = cache_copy(k);
      v = cache_copy(v, key_dtype, true);
      cache.push_back(k);
      cache.push_back(v);
    }
    TensorId o;
    l.core_begin(i);
    if (m.attention == Attention::flash) {
      o = b.flash_attention(q, k, v, m.attention_dropout);
    } else {
      // eager_attention_forward
      TensorId w = b.matmul(q, b.transpose(k, 2, 3));
      w = b.scalar_op(OpKind::mul_scalar, w, 1.0 / std::sqrt(static_cast<double>(hd)));
      w = b.binary(OpKind::add, w, mask);
      // softmax(dim=-1, dtype=float32).to(query.dtype)
      w = cast(b.unary(OpKind::softmax, cast(w, DType::f32)), t(q).dtype);
      w = b.dropout(w, m.attention_dropout);
      o = b.matmul(w, v);
    }
    l.core_end(i);
    // attn_output.transpose(1, 2).contiguous(); .reshape(*input_shape, -1).contiguous()
    o = b.view(b.contiguous(b.transpose(o, 1, 2)), {B, T, d});
    l.scope(i, s + ".dense");
    return b.linear(o, p.dense_w, opt(p.dense_b));
  }

  // GPTNeoXMLP: dense_h_to_4h, act (hidden_act "gelu": nn.functional.gelu, approximate="none"),
  // dense_4h_to_h. aten::gelu is one kernel for both approximations and saves its input either way:
  // the op is gelu_tanh's kind, named "gelu".
  TensorId mlp(int i, const Layer& p, TensorId h) {
    const std::string s = fmt::format("gpt_neox.layers.{}.mlp", i);
    l.scope(i, s + ".dense_h_to_4h");
    TensorId f = b.linear(h, p.fc_w, p.fc_b);
    l.scope(i, s + ".act");
    TensorId out = b.fresh("gelu", t(f).shape, t(f).dtype);
    b.emit({.kind = OpKind::gelu_tanh, .name = "gelu", .inputs = {f}, .outputs = {out},
            .flops = 8.0 * static_cast<double>(numel(t(f).shape)), .bytes_moved = 2 * g().view_bytes(f)});
    l.scope(i, s + ".dense_4h_to_h");
    return b.linear(out, p.proj_w, p.proj_b);
  }

  TensorId layer(int i, const Layer& p, TensorId x, TensorId cos, TensorId sin, TensorId mask,
                 std::vector<TensorId>& cache) {
    l.enter_block(i);
    const std::string s = fmt::format("gpt_neox.layers.{}", i);
    l.scope(i, s + ".input_layernorm");
    TensorId h = b.layer_norm(x, p.ln1_w, p.ln1_b);
    TensorId a = attention(i, p, h, cos, sin, mask, cache);
    l.scope(i, s + ".post_attention_dropout");
    a = b.dropout(a, m.dropout);
    TensorId out;
    if (m.parallel_residual) {
      l.mlp_begin(i);
      l.scope(i, s + ".post_attention_layernorm");
      TensorId f = mlp(i, p, b.layer_norm(x, p.ln2_w, p.ln2_b));
      l.scope(i, s + ".post_mlp_dropout");
      f = b.dropout(f, m.dropout);
      l.scope(i, s);
      out = add(add(f, a), x);  // mlp_output + attn_output + hidden_states
      l.mlp_end(i);
    } else {
      l.scope(i, s);
      a = add(a, x);  // attn_output + hidden_states
      l.mlp_begin(i);
      l.scope(i, s + ".post_attention_layernorm");
      TensorId f = mlp(i, p, b.layer_norm(a, p.ln2_w, p.ln2_b));
      l.scope(i, s + ".post_mlp_dropout");
      f = b.dropout(f, m.dropout);
      l.scope(i, s);
      out = add(f, a);  // mlp_output + attn_output
      l.mlp_end(i);
    }
    l.leave_block();
    b.block_outputs.push_back(out);
    return out;
  }

  void run() {
    use_cache = m.use_cache;
    for (int i = 0; i < m.n_layers; ++i) use_cache = use_cache && l.mode(i) != BlockMode::recompute;
    // Parameters in model.parameters() order (module registration order).
    TensorId emb = l.param("gpt_neox.embed_in.weight", {V, d});
    std::vector<Layer> layers(static_cast<size_t>(m.n_layers));
    for (int i = 0; i < m.n_layers; ++i) {
      auto n = [&](const char* x) { return fmt::format("gpt_neox.layers.{}.{}", i, x); };
      b.set_layer(i);
      Layer& p = layers[static_cast<size_t>(i)];
      p.ln1_w = l.param(n("input_layernorm.weight"), {d});
      p.ln1_b = l.param(n("input_layernorm.bias"), {d});
      p.ln2_w = l.param(n("post_attention_layernorm.weight"), {d});
      p.ln2_b = l.param(n("post_attention_layernorm.bias"), {d});
      p.qkv_w = l.param(n("attention.query_key_value.weight"), {3 * d, d});
      if (m.qkv_bias) p.qkv_b = l.param(n("attention.query_key_value.bias"), {3 * d});
      p.dense_w = l.param(n("attention.dense.weight"), {d, d});
      if (m.o_bias) p.dense_b = l.param(n("attention.dense.bias"), {d});
      p.fc_w = l.param(n("mlp.dense_h_to_4h.weight"), {ff, d});
      p.fc_b = l.param(n("mlp.dense_h_to_4h.bias"), {ff});
      p.proj_w = l.param(n("mlp.dense_4h_to_h.weight"), {d, ff});
      p.proj_b = l.param(n("mlp.dense_4h_to_h.bias"), {d});
    }
    b.set_layer(-1);
    TensorId lnf_w = l.param("gpt_neox.final_layer_norm.weight", {d});
    TensorId lnf_b = l.param("gpt_neox.final_layer_norm.bias", {d});
    // GPTNeoXRotaryEmbedding's buffers: inv_freq and original_inv_freq (rotary_ndims / 2 each).
    TensorId inv_freq = l.buffer("gpt_neox.rotary_emb.inv_freq", {rd / 2});
    (void)l.buffer("gpt_neox.rotary_emb.original_inv_freq", {rd / 2});
    TensorId lm_head = m.tied() ? emb : l.param("lm_head.weight", {V, d});
    if (l.params_only) return;  // model_names(): the parameters alone
    TensorId idx = b.leaf("input_ids", {B, T}, DType::i64, Category::input, false);
    TensorId labels = b.leaf("labels", {B, T}, DType::i64, Category::input, false);

    l.scope(-1, "gpt_neox.embed_in");
    TensorId emb_out = b.embedding(emb, idx);
    l.scope(-1, "gpt_neox");
    TensorId pos = position_ids();
    TensorId mask = m.attention == Attention::eager ? causal_mask(pos) : kNoTensor;
    l.scope(-1, "gpt_neox.emb_dropout");
    TensorId x = b.dropout(emb_out, m.embd_dropout);
    // GPTNeoXRotaryEmbedding.forward under no_grad, as LlamaRotaryEmbedding's.
    l.scope(-1, "gpt_neox.rotary_emb");
    TensorId cos = b.fresh("cos", {1, T, rd}, dt), sin = b.fresh("sin", {1, T, rd}, dt);
    const int64_t f32 = 4, ws = T * f32 + T * (rd / 2) * f32 + 2 * T * rd * f32 + (dt == DType::f32 ? 0 : 2 * T * rd * f32);
    b.emit({.kind = OpKind::rotary_table, .name = "rotary_emb", .inputs = {inv_freq, pos}, .outputs = {cos, sin},
            .workspace_bytes = ws, .flops = 4.0 * T * rd, .bytes_moved = 2 * g().view_bytes(cos),
            .params = {.scalar = m.rope_theta}});
    std::vector<TensorId> cache;
    for (int i = 0; i < m.n_layers; ++i) x = layer(i, layers[static_cast<size_t>(i)], x, cos, sin, mask, cache);
    l.scope(-1, "gpt_neox.final_layer_norm");
    x = b.layer_norm(x, lnf_w, lnf_b);
    // GPTNeoXModel.forward returns: inputs_embeds, position_ids, the mask and position_embeddings go.
    b.hold_until_last(emb_out);
    b.hold_until_last(pos);
    if (mask != kNoTensor) b.hold_until_last(mask);
    b.hold_until_last(cos);
    b.hold_until_last(sin);
    causal_lm_loss(x, lm_head, labels, cache);
  }
};

}  // namespace

void lower_hf_neox(Lowering& l) { HfNeox(l).run(); }

}  // namespace actsim::graph
