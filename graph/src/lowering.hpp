// Private: the state of one lowering (the model, the training step, the runtime profile, the
// builder) and the pieces every family shares: parameters, buffers, scopes, checkpoint regions and
// the loss. Each family's forward is in its own file (lower_gpt2.cpp, lower_llama.cpp), the
// optimizer step and zero_grad in lower_optimizer.cpp; lower.cpp dispatches.
#pragma once

#include <fmt/format.h>

#include <memory>
#include <string>

#include "actsim/graph/lower.hpp"
#include "builder.hpp"

namespace actsim::graph {

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

  // Shared tail of both families: logits, cross-entropy (lower.cpp).
  void finish_loss(TensorId x, TensorId lm_head, TensorId targets, TensorId held);

  // ---- GPT-2 (nanoGPT), lower_gpt2.cpp -------------------------------------------------------
  struct Gpt2Block {
    TensorId ln1_w, ln1_b, c_attn_w, c_attn_b, c_proj_w, c_proj_b, ln2_w, ln2_b, fc_w, fc_b, proj_w, proj_b, mask;
  };
  TensorId gpt2_attention(int i, const Gpt2Block& p, TensorId x);
  TensorId gpt2_block(int i, const Gpt2Block& p, TensorId x);
  TensorId gpt2_block_ops(int i, const Gpt2Block& p, TensorId x);
  void gpt2();

  // ---- Llama, lower_llama.cpp ----------------------------------------------------------------
  struct LlamaBlock {
    TensorId attn_norm, wq, wk, wv, wo, ffn_norm, w1, w2, w3;
  };
  TensorId rmsnorm(TensorId x, TensorId w);
  TensorId rope(TensorId x, TensorId cos_c, TensorId sin_c, TensorId pos);
  TensorId repeat_kv(TensorId x, int64_t n_rep);
  TensorId llama_attention(int i, const LlamaBlock& p, TensorId x, TensorId cos_c, TensorId sin_c, TensorId pos);
  TensorId llama_block(int i, const LlamaBlock& p, TensorId x, TensorId cos_c, TensorId sin_c, TensorId pos);
  TensorId llama_block_ops(int i, const LlamaBlock& p, TensorId x, TensorId cos_c, TensorId sin_c, TensorId pos);
  void llama();

  // ---- issue 13: data parallelism, lower_parallel.cpp ---------------------------------------
  struct Parallel;                          // DDP buckets, ZeRO reductions (lower_parallel.cpp)
  std::shared_ptr<Parallel> par;
  void parallel_forward_begin();            // DDP.forward: the buffers' broadcast (sized later)
  void parallel_forward_end();
  TensorId parallel_grad_ready(size_t param, TensorId grad);  // the gradient hook
  void parallel_backward_end();             // DDP's finalize; ZeRO-1's last all-reduce
  void optimizer_flat();                    // master weights / ZeRO: fp32 flat partitions
  // ---- optimizer step and zero_grad, lower_optimizer.cpp -------------------------------------
  OptimizerImpl resolve_impl() const;
  void optimizer();
  void zero_grad();
};

// Hugging Face transformers' Llama-style decoders (Family::hf_llama), lower_hf_llama.cpp.
void lower_hf_llama(Lowering& l);
// transformers' GPT2LMHeadModel (Family::hf_gpt2), lower_hf_gpt2.cpp.
void lower_hf_gpt2(Lowering& l);
// transformers' GPTNeoXForCausalLM (Family::hf_neox), lower_hf_neox.cpp.
void lower_hf_neox(Lowering& l);

}  // namespace actsim::graph
