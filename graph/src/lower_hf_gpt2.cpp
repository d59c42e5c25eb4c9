// Lowering of Hugging Face transformers' GPT2LMHeadModel (Family::hf_gpt2), op for op as
// transformers 5.18.0's modeling_gpt2.py runs it in training with `model(input_ids=x, labels=y).loss`:
// wte + wpe (both embeddings and position_ids are forward locals until GPT2Model returns), embd
// dropout, LayerNorm, Conv1D (addmm on the flattened input with a (in, out) weight), c_attn split,
// the DynamicCache copies, sdpa (is_causal, attn_pdrop as SDPA dropout) or eager attention (scores
// * scaling + mask, softmax in the model dtype, dropout), the transpose/reshape copy, resid dropout,
// gelu_new as transformers writes it (0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3)))),
// ln_f, the tied lm_head and ForCausalLMLoss.
#include <cmath>

#include "lower_hf.hpp"

namespace actsim::graph {

namespace {

struct HfGpt2 : HfBase {
  struct Block {
    TensorId ln1_w, ln1_b, attn_w, attn_b, proj_w, proj_b, ln2_w, ln2_b, fc_w, fc_b, mproj_w, mproj_b;
  };
  explicit HfGpt2(Lowering& lw) : HfBase(lw) {}

  // Conv1D: torch.addmm(bias, x.view(-1, nx), weight).view(*x.shape[:-1], nf)
  TensorId conv1d(TensorId x, TensorId w, TensorId bias) {
    const Shape sx = t(x).shape;
    const int64_t nf = t(w).shape[1];
    TensorId y = b.addmm(bias, b.view(x, {numel(sx) / sx.back(), sx.back()}), w);
    Shape so = sx;
    so.back() = nf;
    return b.view(y, so);
  }

  // NewGELUActivation: 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))
  TensorId gelu_new(TensorId x) {
    TensorId half = b.scalar_op(OpKind::mul_scalar, x, 0.5);
    TensorId cube = b.scalar_op(OpKind::pow_scalar, x, 3.0);
    TensorId inner = b.binary(OpKind::add, x, b.scalar_op(OpKind::mul_scalar, cube, 0.044715));
    TensorId th = b.unary(OpKind::tanh, b.scalar_op(OpKind::mul_scalar, inner, std::sqrt(2.0 / M_PI)));
    return b.binary(OpKind::mul, half, b.scalar_op(OpKind::add_scalar, th, 1.0));
  }

  TensorId attention(int i, const Block& p, TensorId x, TensorId mask, std::vector<TensorId>& cache, bool use_cache) {
    const std::string s = fmt::format("transformer.h.{}.attn", i);
    l.scope(i, s + ".c_attn");
    TensorId qkv = conv1d(x, p.attn_w, p.attn_b);
    l.scope(i, s);
    auto parts = b.split(qkv, d, 2);
    TensorId k = b.transpose(b.view(parts[1], {B, T, H, hd}), 1, 2);
    TensorId v = b.transpose(b.view(parts[2], {B, T, H, hd}), 1, 2);
    TensorId q = b.transpose(b.view(parts[0], {B, T, H, hd}), 1, 2);
    if (use_cache) {
      k = cache_copy(k);
      v = cache_copy(v);
      cache.push_back(k);
      cache.push_back(v);
    }
    TensorId o;
    l.core_begin(i);
    if (m.attention == Attention::flash) {
      o = b.flash_attention(q, k, v, m.attention_dropout);
    } else {
      TensorId w = b.matmul(q, b.transpose(k, -1, -2));
      w = b.scalar_op(OpKind::mul_scalar, w, 1.0 / std::sqrt(static_cast<double>(hd)));
      w = b.binary(OpKind::add, w, mask);
      w = b.unary(OpKind::softmax, w);  // .type(value.dtype): the same dtype
      l.scope(i, s + ".attn_dropout");
      w = b.dropout(w, m.attention_dropout);
      l.scope(i, s);
      o = b.matmul(w, v);
    }
    l.core_end(i);
    // attn_output.transpose(1, 2); .reshape(*shape[:-2], -1).contiguous()
    o = b.reshape(b.transpose(o, 1, 2), {B, T, d});
    l.scope(i, s + ".c_proj");
    o = conv1d(o, p.proj_w, p.proj_b);
    l.scope(i, s + ".resid_dropout");
    return b.dropout(o, m.dropout);
  }

  TensorId pos_ids = kNoTensor;  // the model's position_ids, a keyword argument of every block call

  TensorId block(int i, const Block& p, TensorId x, TensorId mask, std::vector<TensorId>& cache, bool use_cache) {
    l.enter_block(i);
    // gradient_checkpointing_enable(): partial(block.__call__, encoder_attention_mask=None,
    // use_cache=..., position_ids=...) is the checkpointed function (the mask is an argument).
    if (l.mode(i) == BlockMode::recompute) b.checkpoint_kwargs({pos_ids});
    const std::string s = fmt::format("transformer.h.{}", i);
    l.scope(i, s + ".ln_1");
    TensorId h = b.layer_norm(x, p.ln1_w, p.ln1_b);
    TensorId a = attention(i, p, h, mask, cache, use_cache);
    l.scope(i, s);
    x = b.binary(OpKind::add, a, x);  // attn_output + residual
    l.mlp_begin(i);
    l.scope(i, s + ".ln_2");
    h = b.layer_norm(x, p.ln2_w, p.ln2_b);
    l.scope(i, s + ".mlp.c_fc");
    TensorId f = conv1d(h, p.fc_w, p.fc_b);
    l.scope(i, s + ".mlp.act");
    f = gelu_new(f);
    l.scope(i, s + ".mlp.c_proj");
    f = conv1d(f, p.mproj_w, p.mproj_b);
    l.scope(i, s + ".mlp.dropout");
    f = b.dropout(f, m.dropout);
    l.scope(i, s);
    TensorId out = b.binary(OpKind::add, x, f);  // residual + feed_forward_hidden_states
    l.mlp_end(i);
    l.leave_block();
    b.block_outputs.push_back(out);
    return out;
  }

  void run() {
    const int64_t S = m.seq_len;
    bool use_cache = m.use_cache;
    for (int i = 0; i < m.n_layers; ++i) use_cache = use_cache && l.mode(i) != BlockMode::recompute;
    // Parameters in model.parameters() order; Conv1D weights are (in, out).
    TensorId wte = l.param("transformer.wte.weight", {V, d});
    TensorId wpe = l.param("transformer.wpe.weight", {m.n_positions > 0 ? m.n_positions : S, d});
    std::vector<Block> blocks(static_cast<size_t>(m.n_layers));
    for (int i = 0; i < m.n_layers; ++i) {
      auto n = [&](const char* x) { return fmt::format("transformer.h.{}.{}", i, x); };
      b.set_layer(i);
      Block& p = blocks[static_cast<size_t>(i)];
      p.ln1_w = l.param(n("ln_1.weight"), {d});
      p.ln1_b = l.param(n("ln_1.bias"), {d});
      p.attn_w = l.param(n("attn.c_attn.weight"), {d, 3 * d});
      p.attn_b = l.param(n("attn.c_attn.bias"), {3 * d});
      p.proj_w = l.param(n("attn.c_proj.weight"), {d, d});
      p.proj_b = l.param(n("attn.c_proj.bias"), {d});
      p.ln2_w = l.param(n("ln_2.weight"), {d});
      p.ln2_b = l.param(n("ln_2.bias"), {d});
      p.fc_w = l.param(n("mlp.c_fc.weight"), {d, ff});
      p.fc_b = l.param(n("mlp.c_fc.bias"), {ff});
      p.mproj_w = l.param(n("mlp.c_proj.weight"), {ff, d});
      p.mproj_b = l.param(n("mlp.c_proj.bias"), {d});
    }
    b.set_layer(-1);
    TensorId lnf_w = l.param("transformer.ln_f.weight", {d});
    TensorId lnf_b = l.param("transformer.ln_f.bias", {d});
    TensorId lm_head = m.tied() ? wte : l.param("lm_head.weight", {V, d});
    if (l.params_only) return;  // model_names(): the parameters alone
    TensorId idx = b.leaf("input_ids", {B, T}, DType::i64, Category::input, false);
    TensorId labels = b.leaf("labels", {B, T}, DType::i64, Category::input, false);

    l.scope(-1, "transformer.wte");
    TensorId tok = b.embedding(wte, idx);
    l.scope(-1, "transformer");
    TensorId pos = position_ids();
    pos_ids = pos;
    l.scope(-1, "transformer.wpe");
    TensorId pe = b.embedding(wpe, b.view(pos, {1, T}));
    l.scope(-1, "transformer");
    TensorId x = b.binary(OpKind::add, tok, pe);
    TensorId mask = m.attention == Attention::eager ? causal_mask(pos) : kNoTensor;
    l.scope(-1, "transformer.drop");
    x = b.dropout(x, m.embd_dropout);
    std::vector<TensorId> cache;
    for (int i = 0; i < m.n_layers; ++i) x = block(i, blocks[static_cast<size_t>(i)], x, mask, cache, use_cache);
    l.scope(-1, "transformer.ln_f");
    x = b.layer_norm(x, lnf_w, lnf_b);
    // GPT2Model.forward returns: its locals inputs_embeds, position_embeds, position_ids and the mask go.
    b.hold_until_last(tok);
    b.hold_until_last(pe);
    b.hold_until_last(pos);
    if (mask != kNoTensor) b.hold_until_last(mask);
    causal_lm_loss(x, lm_head, labels, cache);
  }
};

}  // namespace

void lower_hf_gpt2(Lowering& l) { HfGpt2(l).run(); }

}  // namespace actsim::graph
