// Lowering of the gpt2 family (nanoGPT, ../shared/reference/models.py GPT), op for op.
#include "lowering.hpp"

#include <cmath>

namespace actsim::graph {

// ---- GPT-2 (nanoGPT) ----------------------------------------------------------------------
TensorId Lowering::gpt2_attention(int i, const Gpt2Block& p, TensorId x) {
  // Tensor parallelism: this rank's heads and width (lower_tp.cpp); tp == 1: the whole layer.
  const int64_t B = tr.batch_size, T = m.seq_len, C = tp_shard(m.d_model), H = tp_shard(m.n_heads), hd = m.d_model / m.n_heads;
  const std::string s = fmt::format("blocks.{}.attn", i);
  scope(i, s + ".c_attn");
  TensorId qkv = tp_column(tp_in(x), p.c_attn_w, p.c_attn_b);
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
  y = tp_row(y, p.c_proj_w, p.c_proj_b);
  scope(i, s + ".resid_dropout");
  y = b.dropout(y, m.dropout);
  hold_frame(x);  // CausalSelfAttention.forward's x
  return y;
}

TensorId Lowering::gpt2_block(int i, const Gpt2Block& p, TensorId x) {
  enter_block(i);
  TensorId out = gpt2_block_ops(i, p, x);
  leave_block();
  b.block_outputs.push_back(out);
  return out;
}

TensorId Lowering::gpt2_block_ops(int i, const Gpt2Block& p, TensorId x) {
  const std::string s = fmt::format("blocks.{}", i);
  const TensorId in = x;  // GPT2.forward's loop variable holds the block input until block(x) returns
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
  TensorId f = tp_column(tp_in(h), p.fc_w, p.fc_b);
  scope(i, s + ".mlp.gelu");
  f = b.unary(OpKind::gelu_tanh, f);
  scope(i, s + ".mlp.c_proj");
  f = tp_row(f, p.proj_w, p.proj_b);
  scope(i, s + ".mlp.dropout");
  f = b.dropout(f, m.dropout);
  hold_frame(h);  // GPT2MLP.forward's x
  scope(i, s);
  x = b.binary(OpKind::add, x, f);
  // Under `mlp` this add is recomputed in backward, where the block input is long gone.
  if (mode(i) != BlockMode::mlp) hold_frame(in);
  mlp_end(i);
  return x;
}

void Lowering::gpt2() {
  // Tensor parallelism (lower_tp.cpp): this rank's shards; tp == 1: the whole model.
  const int64_t V = tp_vocab(), S = m.seq_len, d = m.d_model, ff = m.ff(), L = m.n_layers;
  const int64_t B = tr.batch_size, T = m.seq_len, dl = tp_shard(d), ffl = tp_shard(ff);
  // Parameters in model.parameters() order: wte (tied with lm_head), wpe, blocks, ln_f.
  const bool first = tr.parallel.pp_embedding, last = tr.parallel.pp_head;  // pipeline stages (issue 13)
  TensorId wte = first ? param("wte.weight", {V, d}) : kNoTensor;  // named_parameters() names a tied weight once, first
  TensorId wpe = first ? param("wpe.weight", {S, d}) : kNoTensor;
  std::vector<Gpt2Block> blocks(L);
  for (int i = 0; i < L; ++i) {
    auto n = [&](const char* x) { return fmt::format("blocks.{}.{}", i, x); };
    b.set_layer(i);
    Gpt2Block& p = blocks[i];
    p.ln1_w = param(n("ln_1.weight"), {d});
    p.ln1_b = param(n("ln_1.bias"), {d});
    p.c_attn_w = linear_weight(n("attn.c_attn"), {3 * dl, d});
    p.c_attn_b = param(n("attn.c_attn.bias"), {3 * dl});
    p.c_proj_w = linear_weight(n("attn.c_proj"), {d, dl});
    p.c_proj_b = param(n("attn.c_proj.bias"), {d});
    p.ln2_w = param(n("ln_2.weight"), {d});
    p.ln2_b = param(n("ln_2.bias"), {d});
    p.fc_w = linear_weight(n("mlp.c_fc"), {ffl, d});
    p.fc_b = param(n("mlp.c_fc.bias"), {ffl});
    p.proj_w = linear_weight(n("mlp.c_proj"), {d, ffl});
    p.proj_b = param(n("mlp.c_proj.bias"), {d});
    p.mask = buffer(n("attn.bias"), {1, 1, S, S});
  }
  b.set_layer(-1);
  TensorId lnf_w = last ? param("ln_f.weight", {d}) : kNoTensor;
  TensorId lnf_b = last ? param("ln_f.bias", {d}) : kNoTensor;
  TensorId lm_head = !last ? kNoTensor : m.tied() && first ? tied_linear("lm_head", wte) : linear_weight("lm_head", {V, d});
  if (params_only) return;
  TensorId idx = first ? b.leaf("idx", {B, T}, DType::i64, Category::input, false) : kNoTensor;
  TensorId targets = last ? b.leaf("targets", {B, T}, DType::i64, Category::input, false) : kNoTensor;

  TensorId x = kNoTensor, pos = kNoTensor;
  if (first) {
    scope(-1, "");
    pos = b.arange(T);
    scope(-1, "wte");
    TensorId tok = tp_embedding(wte, idx, false);
    scope(-1, "wpe");
    TensorId pe = b.embedding(wpe, pos);
    scope(-1, "");
    x = b.binary(OpKind::add, tok, pe);
    scope(-1, "drop");
    x = b.dropout(tp_scatter(x), m.dropout);  // sequence parallelism: the embedding's dropout on s/tp
  } else {
    x = pp_input();
  }
  for (int i = 0; i < L; ++i) {
    zero3_block(i, true);  // ZeRO-3 (lower_parallel.cpp): the block's parameters gathered around it
    x = gpt2_block(i, blocks[i], x);
    zero3_block(i, false);
  }
  if (!last) return pp_output(x, pos);
  scope(-1, "ln_f");
  x = b.layer_norm(x, lnf_w, lnf_b);
  finish_loss(x, lm_head, targets, pos);
  hold_frame(x);  // GPT2.forward's x = self.ln_f(x)
}

}  // namespace actsim::graph
