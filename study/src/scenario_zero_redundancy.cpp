// zero_redundancy (issue 13): parallel.zero_impl, who implements sharding = "zero1" (DeepSpeed's
// ZeRO stage 1, or torch.distributed.optim.ZeroRedundancyOptimizer over DDP), and the combinations
// torch's is not lowered for.
#include <fmt/format.h>

#include "scenario_values.hpp"

namespace actsim::study::scenario_detail {

bool set_zero_redundancy_key(Scenario& sc, const std::string& key, const Value& v, const std::string& where) {
  if (key != "parallel.zero_impl") return false;
  sc.training.parallel.zero_impl = pick<graph::ZeroImpl>(
      as_str(v, where), {{"deepspeed", graph::ZeroImpl::deepspeed}, {"torch", graph::ZeroImpl::torch}}, where,
      "ZeRO implementation");
  return true;
}

std::optional<std::string> zero_redundancy_problem(const Scenario& sc) {
  const graph::TrainingConfig& t = sc.training;
  const graph::ParallelConfig& pc = t.parallel;
  auto problem = [](const std::string& where, const std::string& msg) { return std::optional<std::string>(where + ": " + msg); };
  auto blame = [&sc](std::initializer_list<const char*> keys) {
    for (const char* k : keys) {
      if (sc.origin.count(k)) return sc.where(k);
    }
    return sc.where(*keys.begin());
  };
  if (sc.origin.count("parallel.zero_impl") && pc.sharding != graph::Sharding::zero1) {
    return problem(sc.where("parallel.zero_impl"),
                   fmt::format("zero_impl picks who implements sharding = \"zero1\" (DeepSpeed's ZeRO stage 1 or torch's "
                               "ZeroRedundancyOptimizer); sharding is \"{}\"", graph::to_string(pc.sharding)));
  }
  if (pc.sharding != graph::Sharding::zero1 || pc.zero_impl != graph::ZeroImpl::torch) return std::nullopt;
  if (pc.pp > 1) {
    return problem(blame({"parallel.pp", "parallel.zero_impl"}),
                   "torch's ZeroRedundancyOptimizer with pipeline stages is not lowered; use zero_impl = \"deepspeed\" "
                   "or pp = 1");
  }
  if (pc.tp > 1) {
    return problem(blame({"parallel.tp", "parallel.zero_impl"}),
                   "torch's ZeroRedundancyOptimizer with tensor parallelism is not lowered; use zero_impl = "
                   "\"deepspeed\" or tp = 1");
  }
  if (t.master_weights != graph::MasterWeights::none) {
    return problem(blame({"training.master_weights", "parallel.zero_impl"}),
                   "torch's ZeroRedundancyOptimizer keeps its state in the parameters' dtype (no fp32 master copy); "
                   "set training.master_weights = \"none\" or zero_impl = \"deepspeed\"");
  }
  return std::nullopt;
}

}  // namespace actsim::study::scenario_detail
