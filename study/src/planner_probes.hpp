// The planner's internals shared by its files (study/src only): how a candidate plan is simulated
// (planner_pipeline.cpp) and the search over a stage with its candidates verified on a pipeline
// (planner_search.cpp).
#pragma once

#include <cstdint>
#include <memory>

#include "actsim/study/planner.hpp"

namespace actsim::study {

// A simulated plan's figures.
struct PlanProbe {
  int64_t peak;
  int64_t time;
};

// The planner simulates a plan in one of two ways. A plan that may be the answer: the step lowered
// with plan `bp`, run by the engine, with the report's figures (kept: the answer's is what
// `actsim plan` prints).
std::shared_ptr<const Analysis> simulate_plan(const Scenario& s, const graph::BlockPlan& bp);
// A plan that is the answer only when little else fits (the least-memory plans): its peak and step
// time alone (the same figures: the engine reads no names), lowered without names and freed at
// once by the thread that built it, whose next lowering reuses the memory.
PlanProbe simulate_figures(const Scenario& s, const graph::BlockPlan& bp);

// The search on stage scenario `s`, its candidates simulated on `pipeline` when not null (issue 13).
PlanResult plan_for_budget(const Scenario& s, int64_t budget, const PlanOptions& options, const Scenario* pipeline);

}  // namespace actsim::study
