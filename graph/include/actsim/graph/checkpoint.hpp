// actsim::graph checkpointing: policies and per-block plans, applied while lowering (the training
// step is lowered again with explicit recompute, offload and prefetch ops).
//
//   CheckpointPolicy p = parse_policy("every:2", "checkpoint.policy");
//   BlockPlan plan = block_plan(p, /*n_layers=*/12);      // per block: keep/recompute/..., segments
//   StepGraph s = lower_training_step(model, training, prof, plan);
//
// Semantics (torch.utils.checkpoint(use_reentrant=False) per segment): a recomputed segment keeps
// only its inputs through the forward pass; when backward first needs one of its saved tensors,
// the segment's forward ops run again (recompute ops) and the recomputed tensors are freed as
// backward consumes them. `mlp` checkpoints each block's MLP sublayer alone (the segment between the
// block's last two cut tensors). `selective` (Megatron-LM) recomputes the attention core only; `ops:LIST`
// (torch's create_selective_checkpoint_contexts) keeps the outputs of the listed op kinds inside
// each checkpointed block and recomputes the rest; `offload` copies saved activations to host
// memory on a copy stream and prefetches them back one block ahead of backward.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "actsim/graph/graph.hpp"

namespace actsim::graph {

enum class BlockMode : uint8_t {
  keep,        // everything autograd saves stays on the device
  recompute,   // the block is (part of) a checkpointed segment
  selective,   // the attention core is recomputed
  ops,         // selective activation checkpointing: listed op kinds kept, the rest recomputed
  offload,     // saved activations go to host memory and come back for backward
  mlp,         // half-block checkpointing: the MLP sublayer (norm, MLP, residual add: the segment
               // between the block's mid-block residual and its output, two cut tensors of cuts.hpp)
               // is one checkpoint call; the attention sublayer is kept
};
std::string_view to_string(BlockMode m);

struct BlockPlan {
  std::vector<BlockMode> mode;       // [n_layers]
  std::vector<int32_t> segment;      // [n_layers] recompute segment id (blocks of one segment are
                                     // recomputed together from the first block's input); -1 otherwise
  std::vector<OpKind> keep_kinds;    // BlockMode::ops: op kinds whose outputs are kept

  // An explicit (possibly nested, rotor/Revolve-style) schedule, made by the planner. When set,
  // every recomputed block is its own region and recomputation follows this list instead of the
  // segment rule: before the backward of block i, run these forward recomputations in order.
  struct Recompute {
    int32_t block;
    bool keep_all;                   // keep the block's saved tensors (its backward comes next);
                                     // else produce only its output (a checkpoint or the next input)
  };
  std::vector<std::vector<Recompute>> before_backward;  // [n_layers], or empty

  bool is_trivial() const;           // every block kept
  std::string describe() const;      // "full", "every:2", "3 kept, 9 recomputed", ...
};

struct CheckpointPolicy {
  enum class Kind : uint8_t { none, full, every, sqrt, selective, ops, offload, budget, mlp } kind = Kind::none;
  int64_t every = 1;                 // every:K
  std::vector<OpKind> keep_kinds;    // ops:LIST
  int64_t budget_bytes = 0;          // budget:BYTES
  std::string text = "none";         // as written
};

// Parses "none", "full", "every:K", "sqrt", "selective", "ops:mm,softmax", "offload",
// "budget:60GiB", "mlp". Throws InputError("<where>: ...") naming `where` (file:line: key or option).
CheckpointPolicy parse_policy(const std::string& text, const std::string& where);

// The per-block plan of a fixed policy (not budget: the planner makes that one).
BlockPlan block_plan(const CheckpointPolicy& p, int64_t n_layers);

// Parses "60GiB", "60GB", "64424509440", "1.5TiB" into bytes; false if not a size.
bool parse_size(const std::string& text, int64_t& bytes);

// The op kinds ops:LIST may name (forward op kinds).
std::vector<std::string> checkpointable_op_kinds();

}  // namespace actsim::graph
