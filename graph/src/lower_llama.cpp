// Lowering of the llama family (CS336-style, ../shared/reference/models.py Llama), op for op.
#include "lowering.hpp"

#include <cmath>

namespace actsim::graph {

// ---- Llama ---------------------------------------------------------------------------------
TensorId Lowering::rmsnorm(TensorId x, TensorId w) {
  // x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight
  TensorId r = b.unary(OpKind::rsqrt, b.scalar_op(OpKind::add_scalar, b.mean_last(b.pow2(x)), 1e-5));
  return b.binary(OpKind::mul, b.binary(OpKind::mul, x, r), w);
}

TensorId Lowering::rope(TensorId x, TensorId cos_c, TensorId sin_c, TensorId pos) {
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

TensorId Lowering::repeat_kv(TensorId x, int64_t n_rep) {
  if (n_rep == 1) return x;
  Shape s = b.graph().tensor(x).shape;  // (B, kvh, T, hd)
  TensorId e = b.expand(b.unsqueeze(x, 2), {s[0], s[1], n_rep, s[2], s[3]});
  return b.reshape(e, {s[0], s[1] * n_rep, s[2], s[3]});
}

TensorId Lowering::llama_attention(int i, const LlamaBlock& p, TensorId x, TensorId cos_c, TensorId sin_c, TensorId pos) {
  // Tensor parallelism: this rank's heads and width (lower_tp.cpp); tp == 1: the whole layer.
  const int64_t B = tr.batch_size, T = m.seq_len, d = tp_shard(m.d_model), H = tp_shard(m.n_heads),
                KV = tp_shard(m.kv_heads()), hd = m.d_model / m.n_heads;
  const std::string s = fmt::format("blocks.{}.attn", i);
  const TensorId xin = tp_in(x);
  scope(i, s + ".q_proj");
  TensorId q = b.transpose(b.view(tp_column(xin, p.wq, std::nullopt), {B, T, H, hd}), 1, 2);
  scope(i, s + ".k_proj");
  TensorId k = b.transpose(b.view(tp_column(xin, p.wk, std::nullopt), {B, T, KV, hd}), 1, 2);
  scope(i, s + ".v_proj");
  TensorId v = b.transpose(b.view(tp_column(xin, p.wv, std::nullopt), {B, T, KV, hd}), 1, 2);
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
  o = tp_row(o, p.wo, std::nullopt);
  hold_frame(x);  // LlamaAttention.forward's x
  return o;
}

TensorId Lowering::llama_block(int i, const LlamaBlock& p, TensorId x, TensorId cos_c, TensorId sin_c, TensorId pos) {
  enter_block(i);
  TensorId out = llama_block_ops(i, p, x, cos_c, sin_c, pos);
  leave_block();
  b.block_outputs.push_back(out);
  return out;
}

TensorId Lowering::llama_block_ops(int i, const LlamaBlock& p, TensorId x, TensorId cos_c, TensorId sin_c, TensorId pos) {
  const std::string s = fmt::format("blocks.{}", i);
  const TensorId in = x;  // Llama.forward's loop variable holds the block input until block(x) returns
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
  const TensorId hin = tp_in(h);
  TensorId g = tp_column(hin, p.w1, std::nullopt);
  scope(i, s + ".ffn");
  g = b.unary(OpKind::silu, g);
  scope(i, s + ".ffn.w3");
  TensorId u = tp_column(hin, p.w3, std::nullopt);
  scope(i, s + ".ffn");
  TensorId gu = b.binary(OpKind::mul, g, u);
  scope(i, s + ".ffn.w2");
  TensorId f = tp_row(gu, p.w2, std::nullopt);
  hold_frame(h);  // SwiGLU.forward's x
  scope(i, s);
  x = b.binary(OpKind::add, x, f);
  // Under `mlp` this add is recomputed in backward, where the block input is long gone.
  if (mode(i) != BlockMode::mlp) hold_frame(in);
  mlp_end(i);
  return x;
}

void Lowering::llama() {
  // Tensor parallelism (lower_tp.cpp): this rank's shards; tp == 1: the whole model.
  const int64_t V = tp_vocab(), S = m.seq_len, d = m.d_model, ff = tp_shard(m.ff()), L = m.n_layers;
  const int64_t H = m.n_heads, KV = m.kv_heads(), hd = d / H, dl = tp_shard(d), kvl = tp_shard(KV * hd);
  const int64_t B = tr.batch_size, T = m.seq_len;
  const bool first = tr.parallel.pp_embedding, last = tr.parallel.pp_head;  // pipeline stages (issue 13)
  TensorId emb = first ? param("tok_embeddings.weight", {V, d}) : kNoTensor;
  // One RotaryPositionalEmbedding module shared by all blocks: one pair of tables.
  TensorId cos_c = buffer("rope.cos_cached", {S, hd / 2});
  TensorId sin_c = buffer("rope.sin_cached", {S, hd / 2});
  std::vector<LlamaBlock> blocks(L);
  for (int i = 0; i < L; ++i) {
    auto n = [&](const char* x) { return fmt::format("blocks.{}.{}", i, x); };
    b.set_layer(i);
    LlamaBlock& p = blocks[i];
    p.attn_norm = param(n("attn_norm.weight"), {d});
    p.wq = linear_weight(n("attn.q_proj"), {dl, d});
    p.wk = linear_weight(n("attn.k_proj"), {kvl, d});
    p.wv = linear_weight(n("attn.v_proj"), {kvl, d});
    p.wo = linear_weight(n("attn.o_proj"), {d, dl});
    p.ffn_norm = param(n("ffn_norm.weight"), {d});
    p.w1 = linear_weight(n("ffn.w1"), {ff, d});
    p.w2 = linear_weight(n("ffn.w2"), {d, ff});
    p.w3 = linear_weight(n("ffn.w3"), {ff, d});
  }
  b.set_layer(-1);
  TensorId norm = last ? param("norm.weight", {d}) : kNoTensor;
  TensorId lm_head = !last ? kNoTensor : m.tied() && first ? tied_linear("lm_head", emb) : linear_weight("lm_head", {V, d});
  if (params_only) return;
  TensorId idx = first ? b.leaf("idx", {B, T}, DType::i64, Category::input, false) : kNoTensor;
  TensorId targets = last ? b.leaf("targets", {B, T}, DType::i64, Category::input, false) : kNoTensor;
  TensorId x = first ? kNoTensor : pp_input();

  scope(-1, "");
  TensorId pos = b.arange(T);
  if (first) {
    scope(-1, "tok_embeddings");
    x = tp_embedding(emb, idx, true);
  }
  for (int i = 0; i < L; ++i) {
    zero3_block(i, true);  // ZeRO-3 (lower_parallel.cpp): the block's parameters gathered around it
    x = llama_block(i, blocks[i], x, cos_c, sin_c, pos);
    zero3_block(i, false);
  }
  if (!last) return pp_output(x, pos);
  scope(-1, "norm");
  x = rmsnorm(x, norm);
  finish_loss(x, lm_head, targets, pos);
  hold_frame(x);  // Llama.forward's x = self.norm(x)
}

}  // namespace actsim::graph
