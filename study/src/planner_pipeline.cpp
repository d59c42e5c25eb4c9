// The planner's entry (a pipeline planned on its worst stage, issue 13) and how it simulates a
// candidate plan (planner_probes.hpp).
#include <memory>

#include "actsim/study/planner.hpp"
#include "actsim/study/pipeline.hpp"  // issue 13: a pipeline planned on its worst stage
#include "planner_probes.hpp"

namespace actsim::study {

PlanResult plan_for_budget(const Scenario& s, int64_t budget, const PlanOptions& options) {
  // issue 13 (pprank): a pipeline is planned on its worst stage (the highest peak under the
  // replayed schedule, without checkpointing): the chain is that stage's blocks, the plan covers
  // each stage's L/(pV) blocks (every stage runs it), and every candidate is verified by
  // simulating the whole pipeline with it, so the micro-batches in flight are counted.
  if (s.training.parallel.pp > 1 && !s.training.parallel.pp_stage()) {
    Scenario none = s;
    none.checkpoint = graph::CheckpointPolicy{};
    const Analysis base = analyze(none);
    const Pipeline& pl = *base.pipeline;
    Scenario stage = pl.kinds[static_cast<size_t>(pl.stage_kinds[static_cast<size_t>(pl.worst)][0])]->scenario;
    return plan_for_budget(stage, budget, options, &none);
  }
  return plan_for_budget(s, budget, options, nullptr);
}

std::shared_ptr<const Analysis> simulate_plan(const Scenario& s, const graph::BlockPlan& bp) {
  Scenario t = s;
  t.checkpoint = bp;
  // issue 13 (pprank): a pipeline's plan is verified on the whole pipeline (every stage's blocks
  // under it, the schedule replayed: the worst stage's peak with its micro-batches in flight).
  if (t.training.parallel.pp > 1 && !t.training.parallel.pp_stage()) return std::make_shared<const Analysis>(analyze(t));
  return std::make_shared<const Analysis>(simulate_step(resolve(t, bp), t));
}

PlanProbe simulate_figures(const Scenario& s, const graph::BlockPlan& bp) {
  if (s.training.parallel.pp > 1 && !s.training.parallel.pp_stage()) {  // issue 13: the replayed pipeline's
    const std::shared_ptr<const Analysis> a = simulate_plan(s, bp);
    return {a->result.peak_bytes, a->result.step_time_ns};
  }
  const sim::SimResult r = simulate_step_result(resolve(s, bp), s);
  return {r.peak_bytes, r.step_time_ns};
}

}  // namespace actsim::study
