// actsim::study resolve — a scenario made concrete before anything is simulated: the model, the
// training step, the runtime profile's rules, the device and the checkpoint plan.
//
//   Scenario s = load_scenario("scenarios/llama-3-8b.toml", {"checkpoint.policy=budget:60GiB"});
//   ResolvedStep r = resolve(s);        // a budget runs the planner here, once: r.plan is its answer
//   Analysis a = simulate_step(r);      // lowers and simulates (analyze.hpp); never plans
//
// The data flow is one way: scenario -> resolve -> simulate_step (lower, step tables, engine). A
// fixed policy's plan is graph::block_plan; an explicit plan (the scenario's) is taken as it is; a
// budget asks the planner, which sits above the simulation and calls simulate_step itself.
#pragma once

#include "actsim/graph/checkpoint.hpp"
#include "actsim/graph/config.hpp"
#include "actsim/graph/profile.hpp"
#include "actsim/sim/device.hpp"
#include "actsim/study/scenario.hpp"

namespace actsim::study {

// One training step, fully described: what simulate_step lowers and simulates.
struct ResolvedStep {
  graph::ModelConfig model;
  graph::TrainingConfig training;
  const graph::RuntimeProfile* runtime = nullptr;  // the profile's rules (static storage; never null)
  sim::DeviceSpec device;
  graph::BlockPlan plan;                           // per block: kept, recomputed, offloaded
};

// The scenario's step under its own runtime profile.
ResolvedStep resolve(const Scenario& s);
// ... under the given rules instead (tests of the CUDA delta table).
ResolvedStep resolve(const Scenario& s, const graph::RuntimeProfile& runtime);

// The scenario's step with the given plan, whatever its policy: the planner's candidates (never
// plans, so the planner can call it for a budget scenario).
ResolvedStep resolve(const Scenario& s, graph::BlockPlan plan);

}  // namespace actsim::study
