// The resolve stage: a scenario's checkpointing (a policy parsed at load, or an explicit plan) made
// into the step's plan; a budget is the one policy that asks the planner.
#include "actsim/study/resolve.hpp"

#include <variant>

#include "actsim/study/planner.hpp"

namespace actsim::study {

ResolvedStep resolve(const Scenario& s) { return resolve(s, s.runtime()); }

ResolvedStep resolve(const Scenario& s, const graph::RuntimeProfile& runtime) {
  ResolvedStep r{.model = s.model, .training = s.training, .runtime = &runtime, .device = s.device, .plan = {}};
  if (const auto* explicit_plan = std::get_if<graph::BlockPlan>(&s.checkpoint)) {
    r.plan = *explicit_plan;
  } else {
    const auto& policy = std::get<graph::CheckpointPolicy>(s.checkpoint);
    // The planner's plan (the least-memory plan when nothing fits the budget); the planner
    // simulates its candidates with simulate_step, never through resolve or analyze.
    r.plan = policy.kind == graph::CheckpointPolicy::Kind::budget ? plan_for_budget(s, policy.budget_bytes).plan
                                                                   : graph::block_plan(policy, s.model.n_layers);
  }
  return r;
}

ResolvedStep resolve(const Scenario& s, graph::BlockPlan plan) {
  return ResolvedStep{.model = s.model, .training = s.training, .runtime = &s.runtime(), .device = s.device,
                      .plan = std::move(plan)};
}

}  // namespace actsim::study
