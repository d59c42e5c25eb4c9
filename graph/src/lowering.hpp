// Private: the state of one lowering (the model, the training step, the runtime profile, the
// builder) and the pieces every family shares: parameters, buffers, scopes, checkpoint regions and
// the loss. Each family's forward is in its own file (lower_gpt2.cpp, lower_llama.cpp), the
// optimizer step and zero_grad in lower_optimizer.cpp; lower.cpp dispatches.
#pragma once

#include <fmt/format.h>

#include <optional>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

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
    b.ckpt_reentrant = tc.checkpoint_impl == CheckpointImpl::reentrant;
    b.ckpt_preserve_rng = tc.preserve_rng_state;
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
        b.begin_checkpoint_call(r);
        b.set_region(r);
        break;
      }
      case BlockMode::ops:  // selective activation checkpointing: a checkpoint call too
        b.begin_checkpoint_call(kOpsRegion + i);
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
    b.begin_checkpoint_call(kSelectiveRegion + i);  // one checkpoint call
    b.set_region(kSelectiveRegion + i);
  }
  void core_end(int i) {
    if (mode(i) == BlockMode::selective) b.set_region(-1);
  }
  // Half-block checkpointing: the MLP sublayer of block i (norm, MLP, residual add) as one
  // checkpoint call, from the mid-block residual to the block output (two consecutive cut tensors).
  void mlp_begin(int i) {
    if (mode(i) != BlockMode::mlp) return;
    b.begin_checkpoint_call(kMlpRegion + i);
    b.set_region(kMlpRegion + i);
  }
  void mlp_end(int i) {
    if (mode(i) == BlockMode::mlp) b.set_region(-1);
  }

  TensorId param(const std::string& name, const Shape& shape) {
    TensorId t = b.leaf(name, shape, dt, Category::parameter, trainable(name));
    if (!b.is_replaying_leaves()) out.params.push_back(t);
    return t;
  }
  TensorId buffer(const std::string& name, const Shape& shape) {
    return b.leaf(name, shape, dt, Category::buffer, false);
  }
  void scope(int32_t layer, const std::string& s) {
    b.set_layer(layer);
    b.set_scope(s);
  }

  // ---- trainable subsets and LoRA (training.trainable), lower_lora.cpp ------------------------
  bool params_only = false;                // model_names(): each family returns after its parameters
  std::vector<std::string> linear_modules; // the nn.Linear modules, in model order
  struct LoraAdapter {
    std::string module;                    // "blocks.0.attn.c_attn"
    int32_t layer = -1;
    TensorId a = kNoTensor, b = kNoTensor; // lora_A (r x in), lora_B (out x r)
  };
  std::unordered_map<uint32_t, LoraAdapter> lora;  // base weight tensor -> its adapter
  // Whether parameter `name` requires grad (all; frozen: no pattern matches; lora: never).
  bool trainable(const std::string& name) const;
  // An nn.Linear's weight (module + ".weight"), and under LoRA its adapter's A and B after it.
  TensorId linear_weight(const std::string& module, const Shape& shape);
  // The Linear `module` whose weight is `w` (a tied lm_head): the same bookkeeping.
  TensorId tied_linear(const std::string& module, TensorId w);
  // F.linear, plus peft's LoRA branch when `w` has an adapter (every family calls this).
  TensorId linear(TensorId x, TensorId w, std::optional<TensorId> bias);
  // A module's argument (a Python local) stays alive until the module returns: the last op
  // emitted holds `t`. Only under a trainable subset: with every weight trained, the linears that
  // read these tensors save them for backward, which outlives the frame. Under DTensor sequence
  // parallelism too (issue 13): the linears save the all-gathered input, not the frame's shard.
  void hold_frame(TensorId t) {
    if (tr.trainable.mode != Trainable::all || (dtensor() && sp())) b.hold_until_last(t);
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
  bool parallel_hooks(bool last_micro_batch) const;  // does this backward reduce (no_sync)?
  // fsdp: ZeRO-3 (lower_parallel.cpp): block i's parameters gathered before its forward, freed after
  void zero3_block(int32_t layer, bool begin);
  void zero3_gather(int32_t layer);         // a unit's parameters all-gathered (root: layer -1)
  void zero3_release(int32_t layer);
  void members_view(int32_t layer, const std::vector<TensorId>& members);
  TensorId ddp_refill(size_t param, TensorId grad);  // a later backward's hook, buckets laid out
  void optimizer_flat();                    // master weights / ZeRO: fp32 flat partitions
  // zero_redundancy: torch's ZeroRedundancyOptimizer (lower_zero_redundancy.cpp)
  std::vector<size_t> optimizer_order() const;  // the optimizer's parameters (this rank's partition)
  void zero_redundancy_broadcast();         // _sync_params after the local step
  // ---- issue 13: tensor and sequence parallelism (Megatron-LM), lower_tp.cpp -----------------
  // One tensor-parallel rank: with tp == 1 every hook is the plain op (the graph is unchanged).
  int64_t tp() const { return tr.parallel.tp; }
  bool sp() const { return tr.parallel.tp > 1 && tr.parallel.sp; }
  int64_t tp_shard(int64_t n) const { return n / tr.parallel.tp; }  // a column/row-parallel width
  int64_t tp_vocab() const;                 // this rank's embedding rows (padded vocab / tp)
  int64_t tp_seq() const { return sp() ? m.seq_len / tr.parallel.tp : m.seq_len; }  // tokens a norm sees
  // What a ColumnParallelLinear reads: x (copy_to region) or, with sp, x all-gathered.
  TensorId tp_in(TensorId x);
  // ColumnParallelLinear on tp_in's result: the weight shard [out/tp, in]; with sp it saves the
  // sequence shard, not the gathered input (Megatron re-gathers it in backward).
  TensorId tp_column(TensorId xin, TensorId w, std::optional<TensorId> bias);
  // RowParallelLinear: the weight shard [out, in/tp], the partial output all-reduced (or
  // reduce-scattered with sp), then the replicated bias.
  TensorId tp_row(TensorId x, TensorId w, std::optional<TensorId> bias);
  // VocabParallelEmbedding: this rank's rows, the partial lookup all-reduced (reduce-scattered
  // with sp when `scatter`).
  TensorId tp_embedding(TensorId w, TensorId idx, bool scatter);
  TensorId tp_scatter(TensorId x);          // scatter_to_sequence_parallel_region (sp)
  void tp_loss_reductions();                // vocab-parallel cross-entropy's three all-reduces
  std::unordered_map<uint32_t, TensorId> tp_shard_of;  // gathered input -> its sequence shard
  // ---- issue 13: DTensor tensor parallelism (tp_impl = "dtensor"), lower_dtensor.cpp ---------
  // torchtitan's plan (ColwiseParallel/RowwiseParallel/SequenceParallel, loss_parallel); the tp_*
  // hooks above call these when parallel.tp_impl == dtensor.
  bool dtensor() const { return tr.parallel.tp > 1 && tr.parallel.tp_impl == TpImpl::dtensor; }
  bool gloo() const;                        // torch2-cpu: the gloo backend's extra buffers
  TensorId dt_in(TensorId x);
  TensorId dt_column(TensorId xin, TensorId w, std::optional<TensorId> bias);
  TensorId dt_row(TensorId x, TensorId w, std::optional<TensorId> bias);
  TensorId dt_embedding(TensorId w, TensorId idx, bool scatter);
  TensorId dt_cross_entropy(TensorId logits2d, TensorId target1d);  // under loss_parallel()
  // ---- end DTensor ----
  // ---- issue 13: pipeline stages, lower_pp.cpp (pp helper) -----------------------------------
  // A stage without the embedding receives its input: a leaf requiring grad (torch.distributed.
  // pipelining's recv buffer, detached with requires_grad_()), whose .grad is sent back after
  // backward. A stage without the head sends its output, and backward starts from the gradient
  // received for it (the seed of the root's shape).
  TensorId pp_recv = kNoTensor;
  TensorId pp_input();                      // the received activation (B, T, d)
  void pp_output(TensorId x, TensorId held);  // the stage's output is backward's root
  // ---- optimizer step and zero_grad, lower_optimizer.cpp -------------------------------------
  OptimizerImpl resolve_impl() const;
  void optimizer();
  void zero_grad();

  // ---- torch.amp.GradScaler (training.autocast = fp16), lower_optimizer.cpp ------------------
  struct Scaler {
    TensorId scale = kNoTensor, growth_tracker = kNoTensor, found_inf = kNoTensor;
  } scaler;
  TensorId scaler_scale_loss(TensorId loss);  // scaler.scale(loss): loss * scale
  void scaler_unscale();                      // scaler.step's unscale_ and inf check
  void scaler_update();                       // scaler.update()
};

// A pipeline stage's input gradient (the last entry of param_grads) is sent back: the entry is
// removed, and a send op reads it, after which it is freed (lower_pp.cpp).
void pp_send_input_grad(Lowering& l);
// Runs the family's lowering; with l.params_only it stops after the parameters (lower.cpp).
void lower_family(Lowering& l);
// The parameters alone (l.params_only set): model_names() (lower_lora.cpp).
inline void lower_parameters(Lowering& l) { lower_family(l); }

// Hugging Face transformers' Llama-style decoders (Family::hf_llama), lower_hf_llama.cpp.
void lower_hf_llama(Lowering& l);
// transformers' GPT2LMHeadModel (Family::hf_gpt2), lower_hf_gpt2.cpp.
void lower_hf_gpt2(Lowering& l);
// transformers' GPTNeoXForCausalLM (Family::hf_neox), lower_hf_neox.cpp.
void lower_hf_neox(Lowering& l);

}  // namespace actsim::graph
