// The tensor- and sequence-parallel keys of a scenario (issue 13): parallel.tp, parallel.sp and
// parallel.tp_impl, parsed where they are written, and the combinations Megatron-LM refuses.
#include <fmt/format.h>

#include "actsim/graph/profile.hpp"
#include "scenario_values.hpp"

namespace actsim::study::scenario_detail {

using graph::Family;

// ---- issue 13: tensor and sequence parallelism ----------------------------------------------
bool set_tp_key(Scenario& sc, const std::string& key, const Value& v, const std::string& where) {
  graph::ParallelConfig& pc = sc.training.parallel;
  if (key == "parallel.tp") {
    const int64_t t = as_int(v, where);
    if (t < 1 || t > 4096) fail(where, fmt::format("must be a tensor-parallel degree from 1 to 4096, got {}", t));
    pc.tp = t;
  } else if (key == "parallel.sp") {
    pc.sp = as_bool(v, where);
  } else if (key == "parallel.tp_impl") {
    pc.tp_impl = pick<graph::TpImpl>(as_str(v, where), {{"megatron", graph::TpImpl::megatron}, {"dtensor", graph::TpImpl::dtensor}},
                                     where, "tensor-parallel implementation");
  } else {
    return false;
  }
  return true;
}

std::optional<std::string> tp_problem(const Scenario& sc) {
  auto problem = [](const std::string& where, const std::string& msg) { return std::optional<std::string>(where + ": " + msg); };
  auto blame = [&sc](std::initializer_list<const char*> keys) {
    for (const char* k : keys) {
      if (sc.origin.count(k)) return sc.where(k);
    }
    return sc.where(*keys.begin());
  };
  const graph::ParallelConfig& pc = sc.training.parallel;
  const graph::ModelConfig& m = sc.model;
  const graph::TrainingConfig& t = sc.training;
  const int64_t tp = pc.tp;
  if (pc.sp && tp < 2) return problem(blame({"parallel.sp", "parallel.tp"}), "sequence parallelism needs parallel.tp > 1");
  if (tp < 2) {
    if (sc.origin.count("parallel.tp_impl")) return problem(sc.where("parallel.tp_impl"), "tp_impl needs parallel.tp > 1");
    return std::nullopt;
  }
  const bool dtensor = pc.tp_impl == graph::TpImpl::dtensor;
  if (dtensor) {  // issue 13: DTensor as torchtitan applies it (lower_dtensor.cpp)
    if (m.family != Family::llama) {
      return problem(blame({"parallel.tp_impl", "model.family", "model.hf_config"}),
                     fmt::format("DTensor tensor parallelism is lowered for the llama family (torchtitan's plan), not {}; "
                                 "use parallel.tp_impl = \"megatron\"", graph::to_string(m.family)));
    }
    if (sc.profile != graph::ProfileId::torch_cuda && sc.profile != graph::ProfileId::torch2_cpu) {
      return problem(blame({"runtime.profile", "parallel.tp_impl"}),
                     "DTensor tensor parallelism needs PyTorch 2: use runtime.profile = \"torch-cuda\" or \"torch2-cpu\"");
    }
    if (m.vocab_size % tp != 0) {
      return problem(blame({"parallel.tp", "model.vocab_size"}),
                     fmt::format("parallel.tp = {} does not divide model.vocab_size = {} (DTensor shards the embedding and "
                                 "lm_head in equal parts; uneven shards are not lowered)", tp, m.vocab_size));
    }
    if (pc.dp > 1 || pc.pp > 1) {
      return problem(blame({"parallel.tp_impl", "parallel.dp", "parallel.pp"}),
                     "DTensor tensor parallelism on a 2-D mesh (with parallel.dp or parallel.pp) is not lowered yet; "
                     "use parallel.tp_impl = \"megatron\"");
    }
    const graph::OptimizerImpl impl = t.optimizer_impl == graph::OptimizerImpl::profile_default
                                          ? graph::profile(sc.profile).default_impl : t.optimizer_impl;
    if (!pc.sp && impl == graph::OptimizerImpl::foreach) {
      return problem(blame({"training.optimizer_impl", "parallel.sp", "parallel.tp_impl"}),
                     "the foreach optimizer fails on DTensor tensor parallelism without sp (the norms stay plain tensors: "
                     "\"got mixed torch.Tensor and DTensor\"); set parallel.sp = true or training.optimizer_impl = \"for_loop\"");
    }
    if (sc.checkpoint_text() != "none") {
      return problem(blame({"checkpoint.policy", "parallel.tp_impl"}),
                     "activation checkpointing with DTensor tensor parallelism is not lowered yet; set checkpoint.policy = \"none\"");
    }
  }
  if (!dtensor && m.family != Family::gpt2 && m.family != Family::llama) {
    return problem(blame({"parallel.tp", "model.family", "model.hf_config"}),
                   fmt::format("tensor parallelism is lowered for the gpt2 and llama families (Megatron-LM's layers), not {}",
                               graph::to_string(m.family)));
  }
  if (!dtensor && sc.profile != graph::ProfileId::torch_cuda) {
    return problem(blame({"runtime.profile", "parallel.tp"}),
                   "Megatron-LM's tensor parallelism runs on CUDA: use runtime.profile = \"torch-cuda\"");
  }
  if (m.n_heads % tp != 0) {
    return problem(blame({"parallel.tp", "model.n_heads"}),
                   fmt::format("parallel.tp = {} does not divide model.n_heads = {} (each rank holds n_heads / tp heads)", tp, m.n_heads));
  }
  if (m.kv_heads() % tp != 0) {
    return problem(blame({"parallel.tp", "model.n_kv_heads"}),
                   fmt::format("parallel.tp = {} does not divide the {} key/value heads (Megatron-LM shards the query "
                               "groups, num_query_groups % tp == 0; they are not replicated)", tp, m.kv_heads()));
  }
  const int64_t ff = m.ff();
  if (ff % tp != 0) {
    return problem(blame({"parallel.tp", "model.d_ff", "model.d_model"}),
                   fmt::format("parallel.tp = {} does not divide the MLP width {} (ColumnParallelLinear shards it)", tp, ff));
  }
  if (pc.sp && m.seq_len % tp != 0) {
    return problem(blame({"parallel.sp", "model.seq_len", "parallel.tp"}),
                   fmt::format("sequence parallelism splits the sequence: parallel.tp = {} does not divide model.seq_len = {}",
                               tp, m.seq_len));
  }
  if (t.autocast_on()) {
    return problem(blame({"training.autocast", "parallel.tp"}),
                   "autocast with tensor parallelism is not lowered (Megatron-LM trains in the model dtype); set "
                   "training.autocast = \"none\" and training.dtype");
  }
  if (t.trainable.mode != graph::Trainable::all) {
    return problem(blame({"training.trainable", "parallel.tp"}),
                   "frozen parameters or LoRA with tensor parallelism are not lowered yet; set training.trainable = \"all\"");
  }
  if (t.grad_accum_steps > 1) {
    return problem(blame({"training.grad_accum_steps", "parallel.tp"}),
                   "gradient accumulation with tensor parallelism is not lowered yet; set training.grad_accum_steps = 1");
  }
  return std::nullopt;
}
// ---- end tensor and sequence parallelism ----

}  // namespace actsim::study::scenario_detail
