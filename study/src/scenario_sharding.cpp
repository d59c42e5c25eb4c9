// The combinations ZeRO-3 (DeepSpeed stage 3) and FSDP2 (fully_shard) are not lowered for
// (issue 13), as one-line messages; scenario.cpp asks after the data-parallel keys' own checks.
#include <fmt/format.h>

#include "actsim/graph/profile.hpp"
#include "scenario_values.hpp"

namespace actsim::study::scenario_detail {

std::optional<std::string> sharding_problem(const Scenario& sc) {
  auto problem = [](const std::string& where, const std::string& msg) { return std::optional<std::string>(where + ": " + msg); };
  const auto& m = sc.model;
  const auto& t = sc.training;
  const bool fsdp2 = t.parallel.sharding == graph::Sharding::fsdp2;
  // ZeRO-3 gathers each block's parameters around the reference models' block loops only.
  if (t.parallel.sharding == graph::Sharding::zero3) {
    if (t.parallel.tp > 1)
      return problem(blame(sc, {"parallel.tp", "parallel.sharding"}),
                     "zero3 with tensor parallelism is not lowered (its parameters would be sharded twice); use "
                     "sharding = \"zero1\" or \"zero2\" with tp, or tp = 1");
    if (t.parallel.pp > 1)
      return problem(blame(sc, {"parallel.pp", "parallel.sharding"}),
                     "zero3 with pipeline stages is not lowered; use sharding = \"zero1\" or \"zero2\" with pp, or pp = 1");
    if (graph::is_hf(m.family))
      return problem(blame(sc, {"model.hf_config", "parallel.sharding"}),
                     "zero3 is lowered for the reference gpt2 and llama families only");
  }
  // ---- fsdp2 (issue 13): FSDP2's fully_shard, checked against it on the CPU (measure_dist.py) ----
  if (sc.origin.count("parallel.reshard_after_forward") && !fsdp2) {
    return problem(sc.where("parallel.reshard_after_forward"), "reshard_after_forward is FSDP2's (parallel.sharding = \"fsdp2\")");
  }
  if (fsdp2) {
    if (t.parallel.tp > 1)
      return problem(blame(sc, {"parallel.tp", "parallel.sharding"}),
                     "fsdp2 with tensor parallelism (a 2-D mesh) is not lowered; set parallel.tp = 1");
    if (t.parallel.pp > 1)
      return problem(blame(sc, {"parallel.pp", "parallel.sharding"}), "fsdp2 with pipeline stages is not lowered; set parallel.pp = 1");
    if (graph::is_hf(m.family))
      return problem(blame(sc, {"model.hf_config", "parallel.sharding"}),
                     "fsdp2 is lowered for the reference gpt2 and llama families only");
    if (t.master_weights != graph::MasterWeights::none)
      return problem(blame(sc, {"training.master_weights", "parallel.sharding"}),
                     "fsdp2 keeps the optimizer state in the parameters' dtype (its MixedPrecisionPolicy is not lowered); "
                     "set training.master_weights = \"none\"");
    // Uneven dim-0 shards make the ranks differ (rank 0 holds more rows): not lowered.
    const int64_t hd = m.head_dim > 0 ? m.head_dim : m.d_model / m.n_heads;
    const std::vector<std::pair<const char*, int64_t>> dims{
        {"model.vocab_size", m.vocab_size}, {"model.d_model", m.d_model}, {"model.d_ff", m.ff()},
        {"model.n_heads", m.n_heads * hd}, {"model.n_kv_heads", m.kv_heads() * hd},
        {"model.seq_len", m.family == graph::Family::gpt2 ? m.seq_len : t.parallel.dp}};
    for (const auto& [key, n] : dims) {
      if (n % t.parallel.dp != 0)
        return problem(blame(sc, {key, "parallel.dp"}),
                       fmt::format("fsdp2 shards every parameter on dim 0; {} gives a dimension of {}, not divisible "
                                   "by parallel.dp = {} (uneven shards: the ranks would differ, not lowered)",
                                   key, n, t.parallel.dp));
    }
  }
  // ---- end fsdp2 ----
  return std::nullopt;
}

}  // namespace actsim::study::scenario_detail
