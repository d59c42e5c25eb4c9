// actsim::graph configuration of what is lowered: the model, the training step, the runtime profile.
//
//   ModelConfig m;            // defaults: a small gpt2
//   m.family = Family::llama;
//   m.d_ff = default_d_ff(m.family, m.d_model);
//
// Values are checked by the scenario loader (sim/scenario), which knows the file and line.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "actsim/graph/types.hpp"

namespace actsim::graph {

// gpt2, llama: the reference models (../shared/reference/models.py). hf_llama: Hugging Face
// transformers' LlamaForCausalLM and the families that run its code (Mistral, Qwen2, Qwen3), read
// from a config.json (model.hf_config) and lowered as transformers' modeling code runs them.
// hf_gpt2: transformers' GPT2LMHeadModel (Conv1D, gelu_new written out, dropout everywhere).
// hf_neox: transformers' GPTNeoXForCausalLM (Pythia: fused qkv, partial rotary, parallel residual).
enum class Family : uint8_t { gpt2, llama, hf_llama, hf_gpt2, hf_neox };
// The families read from a Hugging Face config.json (model.hf_config).
constexpr bool is_hf(Family f) { return f == Family::hf_llama || f == Family::hf_gpt2 || f == Family::hf_neox; }
enum class Attention : uint8_t { eager, flash };
enum class Optimizer : uint8_t { adamw, adam, sgd, sgd_momentum };
enum class OptimizerImpl : uint8_t { profile_default, for_loop, foreach, fused };
enum class ProfileId : uint8_t { torch_cuda, torch_cpu, torch2_cpu };
// The CPU's vector ISA, where a CPU runtime's kernels depend on it (oneDNN's bf16 matmul needs
// AVX-512 BW/VL/DQ). `native` is the machine actsim runs on.
enum class CpuIsa : uint8_t { avx512, avx2 };
// torch.utils.checkpoint(use_reentrant=False) (saved-tensor hooks) or use_reentrant=True
// (CheckpointFunction: no_grad forward, the whole call recomputed and backpropagated in its backward).
enum class CheckpointImpl : uint8_t { nonreentrant, reentrant };

std::string_view to_string(Family f);
std::string_view to_string(Attention a);
std::string_view to_string(Optimizer o);
std::string_view to_string(OptimizerImpl o);
std::string_view to_string(ProfileId p);

struct ModelConfig {
  Family family = Family::gpt2;
  int64_t vocab_size = 50257;
  int64_t seq_len = 1024;
  int64_t d_model = 768;
  int64_t n_heads = 12;
  int64_t n_kv_heads = 0;       // 0 = n_heads (no grouped-query attention)
  int64_t n_layers = 12;
  int64_t d_ff = 0;             // 0 = default_d_ff(family, d_model)
  double dropout = 0.0;         // gpt2 only
  Attention attention = Attention::eager;
  int tie_embeddings = -1;      // -1 = the family's default (gpt2 tied, llama untied)
  double rope_theta = 10000.0;
  // Hugging Face decoders (hf_llama) only.
  int64_t head_dim = 0;         // 0 = d_model / n_heads (config.head_dim)
  bool qkv_bias = false;        // q/k/v projections have a bias (attention_bias; Qwen2 always)
  bool o_bias = false;          // o_proj has a bias (attention_bias)
  bool mlp_bias = false;        // gate/up/down projections have a bias (mlp_bias)
  bool qk_norm = false;         // RMSNorm of q and k per head before RoPE (Qwen3)
  bool use_cache = true;        // config.use_cache: the forward fills a DynamicCache (k, v copies)
  double attention_dropout = 0; // config.attention_dropout / attn_pdrop (applied in training)
  double embd_dropout = 0;      // GPT-2's embd_pdrop
  int64_t n_positions = 0;      // GPT-2's wpe rows (n_positions); 0 = seq_len
  double norm_eps = 1e-6;       // config.rms_norm_eps
  int64_t sliding_window = 0;   // Mistral's and Phi3's config.sliding_window; 0 = none
  bool fused_qkv_mlp = false;   // Phi3: one qkv_proj, one gate_up_proj, and cat([rope(q_rot), q_pass])
  double partial_rotary = 1.0;  // the share of head_dim that RoPE rotates (partial_rotary_factor)
  bool longrope = false;        // rope_type "longrope": the first forward re-registers inv_freq as
                                // original_inv_freq (one buffer storage for both)
  bool parallel_residual = false; // GPT-NeoX's use_parallel_residual: x + attn(ln1(x)) + mlp(ln2(x))
  bool gemma = false;           // Gemma: embeddings times sqrt(hidden), RMSNorm's (1 + weight) in fp32,
                                // gelu_pytorch_tanh in the MLP
  // Gemma2 and the mixture-of-experts decoders (issue 11: hfrest).
  bool gemma2 = false;          // Gemma2: norms after attention and around the MLP, a full and a sliding mask
  double attn_softcap = 0;      // attn_logit_softcapping: scores / c, tanh, * c (eager only); 0 = none
  double final_softcap = 0;     // final_logit_softcapping: logits / c, tanh, * c; 0 = none
  double query_scale = 0;       // Gemma2's query_pre_attn_scalar ** -0.5; 0 = head_dim ** -0.5
  int64_t n_sliding_layers = 0; // layers whose layer_types is "sliding_attention" (Gemma2's DynamicCache)
  int64_t n_experts = 0;        // Mixtral's num_local_experts; 0 = a dense MLP
  int64_t experts_top_k = 0;    // num_experts_per_tok
  bool router_aux_loss = false; // output_router_logits: the load-balancing loss is added to the loss

  int64_t kv_heads() const { return n_kv_heads > 0 ? n_kv_heads : n_heads; }
  int64_t hd() const { return head_dim > 0 ? head_dim : d_model / n_heads; }
  int64_t ff() const;
  bool tied() const { return tie_embeddings < 0 ? family == Family::gpt2 : tie_embeddings != 0; }
};

// gpt2: 4d. llama: int(2*4d/3) rounded up to a multiple of 8 (as ../shared/reference/models.py).
int64_t default_d_ff(Family f, int64_t d_model);

// ---- trainable subsets (issue 12, recipe 3: LoRA as peft applies it, frozen weights) ----------
// all: every parameter trains. lora: peft's LoRA on the target Linear modules, every other
// parameter frozen. frozen: the parameters whose names match a pattern are frozen.
enum class Trainable : uint8_t { all, lora, frozen };
struct TrainableConfig {
  Trainable mode = Trainable::all;
  std::vector<std::string> frozen;        // frozen: name patterns (trainable.hpp), braces expanded
  int64_t lora_r = 8;                     // LoraConfig.r
  double lora_alpha = 8;                  // LoraConfig.lora_alpha (scaling = alpha / r)
  double lora_dropout = 0;                // LoraConfig.lora_dropout (nn.Identity when 0)
  std::vector<std::string> lora_targets;  // LoraConfig.target_modules; empty = the family's default,
                                          // {"all-linear"} = every Linear (peft's rule)
};
// ---- end trainable subsets -------------------------------------------------------------------
// ---- issue 13: data parallelism and sharding (parallel.*), master weights -----------------
// none: DistributedDataParallel (gradients all-reduced in buckets). zero1/zero2: DeepSpeed's ZeRO
// stages 1 and 2 (fp32 master, exp_avg and exp_avg_sq partitioned over the ranks as flat shards;
// stage 2 reduce-scatters each gradient and keeps only its shard; stage 3 also partitions each
// parameter and gathers a block's parameters around its forward and its backward).
enum class Sharding : uint8_t { none, zero1, zero2, zero3 };
std::string_view to_string(Sharding s);
// Tensor parallelism's implementation: Megatron-LM's ColumnParallelLinear/RowParallelLinear, or
// PyTorch's DTensor ColwiseParallel/RowwiseParallel/SequenceParallel.
enum class TpImpl : uint8_t { megatron, dtensor };
// zero_redundancy: who implements sharding = "zero1": DeepSpeed's ZeRO stage 1 (flat fp32
// partitions) or torch.distributed.optim.ZeroRedundancyOptimizer over DDP (whole parameters).
enum class ZeroImpl : uint8_t { deepspeed, torch };
std::string_view to_string(ZeroImpl z);
std::string_view to_string(TpImpl t);
// Pipeline schedules (pp helper): GPipe, 1F1B (PipeDream-Flush), Megatron's interleaved 1F1B.
enum class PpSchedule : uint8_t { gpipe, one_f_one_b, interleaved };
std::string_view to_string(PpSchedule s);
struct ParallelConfig {
  int64_t dp = 1;                       // data-parallel degree (ranks)
  Sharding sharding = Sharding::none;
  double bucket_cap_mb = 25;            // DDP's bucket_cap_mb (MiB); the first bucket is 1 MiB
  bool gradient_as_bucket_view = false; // DDP: gradients are views into the buckets
  bool active() const { return dp > 1; }
  // ---- issue 13: tensor and sequence parallelism (lower_tp.cpp) ----
  int64_t tp = 1;                       // tensor-parallel degree: this rank holds 1/tp of each sharded layer
  bool sp = false;                      // sequence parallelism (Megatron-LM): norms and dropouts on s/tp
  TpImpl tp_impl = TpImpl::megatron;    // megatron: Megatron-LM's layers; dtensor: PyTorch DTensor (lower_dtensor.cpp)
  // ---- end tensor and sequence parallelism ----
  // --- dp2 (issue 13, data-parallel half): accumulation ---
  bool no_sync = true;                  // DDP + accumulation: the first N-1 micro-batches under no_sync()
  // ---- issue 13: pipeline parallelism (pp helper; study/src/pipeline*.cpp, lower_pp.cpp) ----
  int64_t pp = 1;                       // pipeline stages
  int64_t microbatches = 0;             // micro-batches per step (0 = pp)
  PpSchedule pp_schedule = PpSchedule::one_f_one_b;
  int64_t pp_chunks = 1;                // interleaved:V, the model chunks per stage (V)
  // The piece of the model one lowering holds (set by study's pipeline per virtual stage, never by
  // a scenario key): the embedding (else the input is received), the final norm, head and loss
  // (else the output is sent and backward starts from a received gradient).
  bool pp_embedding = true, pp_head = true;
  int64_t pp_micro() const { return microbatches > 0 ? microbatches : pp; }
  bool pp_stage() const { return !pp_embedding || !pp_head; }
  // ---- end pipeline parallelism ----
  // ---- zero_redundancy (issue 13): torch's ZeroRedundancyOptimizer (lower_zero_redundancy.cpp) ----
  ZeroImpl zero_impl = ZeroImpl::deepspeed;
  // The rank lowered (set by study per rank class, never by a key): -1 = every rank, analyze()
  // simulates each distinct partition and reports the highest peak's (a lowering of -1 is rank 0's).
  int64_t zero_rank = -1;
  bool zero_redundancy() const { return active() && sharding == Sharding::zero1 && zero_impl == ZeroImpl::torch; }
  bool ddp() const { return active() && (sharding == Sharding::none || zero_redundancy()); }  // DDP's buckets
  // ---- end zero_redundancy ----
};
// none: the optimizer updates the parameters in their own dtype. fp32: bf16/fp16 parameters and
// gradients, an fp32 master copy and fp32 moments in the optimizer (Megatron-LM, DeepSpeed).
enum class MasterWeights : uint8_t { none, fp32 };
// ---- zero_redundancy (issue 13): torch.distributed.optim.ZeroRedundancyOptimizer ----------
// The greedy partition of whole parameters over `ranks` (_partition_parameters: sorted by numel,
// largest first, a stable sort; each to the rank with the fewest elements so far, the lowest such
// rank on a tie). `numels` in the optimizer's parameter order; returns each parameter's rank.
std::vector<int64_t> zero_redundancy_partition(const std::vector<int64_t>& numels, int64_t ranks);
// ---- end zero_redundancy ----
// ---- end issue 13 --------------------------------------------------------------------------

struct TrainingConfig {
  int64_t batch_size = 8;
  DType dtype = DType::f32;     // model (parameters, activations) dtype; whole-model cast
  Optimizer optimizer = Optimizer::adamw;
  OptimizerImpl optimizer_impl = OptimizerImpl::profile_default;
  double weight_decay = -1;     // -1 = torch.optim's default (AdamW 0.01, Adam and SGD 0)
  double lr = 1e-3;
  double momentum = 0.9;        // sgd_momentum
  TrainableConfig trainable;    // trainable subsets (issue 12, recipe 3)
  // Gradient accumulation (issue 12, recipe 2): micro-batches of batch_size per optimizer step,
  // each `loss = model(idx, targets) / N; loss.backward()`; 1 = no division, one backward.
  int64_t grad_accum_steps = 1;
  // checkpoint implementation (issue 12, recipe 4): checkpoint.impl and checkpoint.preserve_rng_state,
  // torch.utils.checkpoint's use_reentrant and preserve_rng_state for every checkpoint call
  CheckpointImpl checkpoint_impl = CheckpointImpl::nonreentrant;
  bool preserve_rng_state = true;
  // --- autocast recipe (issue 12, recipe 1) ---
  // training.autocast: none, or the dtype torch.autocast runs model(idx, targets) under (bf16,
  // f16); parameters stay in `dtype`. f16 adds torch.amp.GradScaler around backward and the step.
  DType autocast = DType::f32;  // f32 = none
  bool autocast_on() const { return autocast != DType::f32; }
  // --- end autocast recipe ---
  // issue 13: data parallelism (one rank class is lowered), master weights
  ParallelConfig parallel;
  MasterWeights master_weights = MasterWeights::none;
};

}  // namespace actsim::graph
