// Private: what the Hugging Face lowerings share (lower_hf_llama.cpp, lower_hf_gpt2.cpp): the
// helpers that mirror transformers' tensor code (TensorIterator layouts, .to(dtype), rotate_half's
// neg and cat, DynamicCache's copies), position_ids, create_causal_mask and ForCausalLMLoss.
#pragma once

#include <vector>

#include "lowering.hpp"

namespace actsim::graph {

struct HfBase {
  Lowering& l;
  Builder& b;
  const ModelConfig& m;
  DType dt;
  int64_t B, T, d, H, KV, hd, ff, V;

  explicit HfBase(Lowering& lw)
      : l(lw), b(lw.b), m(lw.m), dt(lw.dt), B(lw.tr.batch_size), T(lw.m.seq_len), d(lw.m.d_model),
        H(lw.m.n_heads), KV(lw.m.kv_heads()), hd(lw.m.hd()), ff(lw.m.ff()), V(lw.m.vocab_size) {}

  Graph& g() { return b.graph(); }
  const Tensor& t(TensorId x) { return g().tensor(x); }
  std::optional<TensorId> opt(TensorId x) { return x == kNoTensor ? std::nullopt : std::optional<TensorId>(x); }

  // TensorIterator allocates an elementwise op's output in the memory order of its first full-size
  // operand (q * cos keeps q's (B, T, H, hd) layout).
  TensorId like(TensorId out, TensorId src) {
    if (t(src).shape == t(out).shape) g().mutable_tensor(out).strides = dense_strides_like(t(out).shape, t(src).strides);
    return out;
  }
  TensorId cast(TensorId x, DType to) {
    if (t(x).dtype == to) return x;  // .to(dtype) of the same dtype is x itself
    TensorId out = b.fresh("to", t(x).shape, to);
    like(out, x);
    b.emit({.kind = OpKind::cast, .name = "to", .inputs = {x}, .outputs = {out},
            .bytes_moved = g().view_bytes(x) + g().view_bytes(out)});
    return out;
  }
  TensorId neg(TensorId x) {
    TensorId out = like(b.fresh("neg", t(x).shape, t(x).dtype), x);
    b.emit({.kind = OpKind::neg, .name = "neg", .inputs = {x}, .outputs = {out},
            .flops = static_cast<double>(numel(t(x).shape)), .bytes_moved = 2 * g().view_bytes(x)});
    return out;
  }
  TensorId cat_last(TensorId a, TensorId c) {
    Shape sh = t(a).shape;
    sh.back() += t(c).shape.back();
    TensorId out = b.fresh("cat", sh, t(a).dtype);  // at::cat: contiguous (suggest_memory_format)
    b.emit({.kind = OpKind::cat, .name = "cat", .inputs = {a, c}, .outputs = {out},
            .bytes_moved = 2 * g().view_bytes(out), .params = {.dim0 = static_cast<int16_t>(sh.size() - 1)}});
    return out;
  }
  // DynamicLayer.update: torch.cat([self.keys, key_states], dim=-2) with an empty self.keys -- a copy.
  TensorId cache_copy(TensorId x) {
    TensorId out = b.fresh("past_key_values", t(x).shape, t(x).dtype);
    b.emit({.kind = OpKind::copy, .name = "past_key_values.update", .inputs = {x}, .outputs = {out},
            .bytes_moved = 2 * g().view_bytes(x)});
    return out;
  }
  // Gemma2's tanh softcapping: x / c, torch.tanh, * c (three tensors; tanh saves its result).
  TensorId softcap(TensorId x, double c) {
    TensorId y = b.unary(OpKind::tanh, b.scalar_op(OpKind::div_scalar, x, c));
    return b.scalar_op(OpKind::mul_scalar, y, c);
  }
  TensorId mul(TensorId a, TensorId c) { return like(b.binary(OpKind::mul, a, c), a); }
  TensorId add(TensorId a, TensorId c) { return like(b.binary(OpKind::add, a, c), a); }

  // position_ids = torch.arange(T) + past_seen_tokens, unsqueezed: (1, T). The add of a Python 0
  // is a copy of arange's values (with a transient wrapped number).
  TensorId position_ids();
  // create_causal_mask under eager attention: a (B, 1, T, T) additive mask in the model dtype.
  TensorId causal_mask(TensorId pos);
  // MixtralSparseMoeBlock on h (B, T, d) with transformers' default experts implementation
  // (grouped_mm; lower_hf_moe.cpp). `s` is the block's module path ("model.layers.3.mlp").
  TensorId moe(int i, const std::string& s, TensorId h, TensorId router, TensorId gate_up, TensorId down);
  // lm_head, then ForCausalLMLoss; the outputs object (logits, the cache) is dropped when forward returns.
  void causal_lm_loss(TensorId x, TensorId lm_head, TensorId labels, const std::vector<TensorId>& cache);
};

}  // namespace actsim::graph
