// actsim::study::Analysis — a scenario resolved, lowered, simulated and summarised.
//
//   Scenario s = load_scenario("scenarios/seed-gpt2-xl.toml", {});
//   Analysis a = analyze(s);              // simulate_step(resolve(s)), and the scenario
//   int64_t b = max_batch_size(a);        // the largest batch that fits the device (batch_search.hpp)
//
// simulate_step is the level below: a resolved step (resolve.hpp) lowered and simulated, with no
// scenario and no planning. The planner and the batch search call it; analyze() is for commands.
#pragma once

#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "actsim/graph/lower.hpp"
#include "actsim/sim/calibration.hpp"
#include "actsim/sim/engine.hpp"
#include "actsim/study/resolve.hpp"
#include "actsim/study/scenario.hpp"

namespace actsim::study {

struct Pipeline;  // pipeline.hpp
struct ZeroRedundancyRanks;  // zero_redundancy (issue 13), below

struct Analysis {
  Scenario scenario;                       // empty from simulate_step; analyze() sets it
  graph::BlockPlan block_plan;             // per block: kept, recomputed, offloaded (the resolved plan)
  std::unique_ptr<graph::StepGraph> step;  // stable address: the plan refers to its graph
  std::unique_ptr<sim::StepTables> tables;  // the engine's per-op tables of `step`
  sim::SimResult result;
  int64_t params_bytes = 0;                // parameter storages (tied weights once)
  int64_t param_count = 0;                 // parameter elements
  int64_t grads_bytes = 0;                 // parameter gradients
  int64_t optimizer_bytes = 0;             // optimizer state on the device
  int64_t optimizer_host_bytes = 0;        // optimizer state on the host (CUDA's 'step' scalars)
  int64_t buffers_bytes = 0;
  int64_t inputs_bytes = 0;
  int64_t saved_bytes = 0;                 // distinct non-parameter device storages saved for backward
  std::vector<int64_t> per_layer_saved;    // [n_layers], each storage in the block that first saves it
  int64_t outside_saved = 0;
  // What one block (block 0; every block saves the same) keeps for backward, one entry per saved
  // storage: the op that first saves it (name without the "blocks.0." prefix), shape, dtype, bytes.
  struct SavedItem {
    std::string op;
    std::string tensor;
    graph::Shape shape;
    graph::DType dtype;
    int64_t bytes;
  };
  std::vector<SavedItem> block_saved;
  // issue 13, pipeline parallelism: every stage (pipeline.hpp); null without parallel.pp > 1
  std::shared_ptr<const Pipeline> pipeline;
  // zero_redundancy (issue 13): torch's ZeroRedundancyOptimizer, every distinct rank; null otherwise
  std::shared_ptr<const ZeroRedundancyRanks> zero_ranks;
};

// ---- zero_redundancy (issue 13): torch's ZeroRedundancyOptimizer, rank classes ----------------
// Its ranks hold different parameters' optimizer state (the greedy partition): the ranks whose
// partitions hold the same parameter sizes (numel and element size, in the local optimizer's
// order) step alike, to the byte and the nanosecond, and form one class, simulated once (its
// lowest rank); analyze() returns the class with the highest peak (the lowest rank on a tie).
struct ZeroRankClass {
  std::vector<int64_t> ranks;                 // its dp ranks, ascending
  int64_t params = 0;                         // elements of the parameters in its partition
  std::shared_ptr<const Analysis> analysis;   // null for the class analyze() returned (that Analysis)
};
struct ZeroRedundancyRanks {
  std::vector<ZeroRankClass> classes;         // by lowest rank
  int worst = 0;                              // the class returned
};
Analysis analyze_zero_redundancy(const Scenario& s, const graph::RuntimeProfile& runtime);
// ---- end zero_redundancy ----

// Resolves, lowers and simulates one scenario. A step whose byte or time totals overflow int64 is
// bad input: ByteOverflow naming the scenario keys that size it.
Analysis analyze(const Scenario& s);
// ... under the given rules instead of the scenario's profile (tests of the CUDA delta table).
Analysis analyze(const Scenario& s, const graph::RuntimeProfile& runtime);

// Lowers a resolved step, builds its step tables, simulates it and sums what it keeps: analyze()
// after resolve(), without the scenario. Never plans. Throws ByteOverflow (the engine's message).
Analysis simulate_step(const ResolvedStep& step);
// ... for a scenario whose step is resolved already (the planner's candidates, resolve(s, plan)):
// the analysis keeps `s`, and an overflow names its keys as analyze() does.
Analysis simulate_step(const ResolvedStep& step, const Scenario& s);

// The engine's result alone (the probes of the planner and the batch search); the graph and the
// tables are freed before it returns. `observers` see the run. Throws ByteOverflow.
sim::SimResult simulate_step_result(const ResolvedStep& step, std::span<sim::Observer* const> observers = {});
// ... for a scenario's step (the planner's probes): an overflow names its keys as analyze() does.
sim::SimResult simulate_step_result(const ResolvedStep& step, const Scenario& s);
// ... or nullopt when the step's totals overflow int64 (`why` gets the engine's message): for a
// search over sizes, such a step does not fit.
std::optional<sim::SimResult> try_simulate_step(const ResolvedStep& step,
                                                std::span<sim::Observer* const> observers = {},
                                                std::string* why = nullptr);

// Rebuilds the analysis's step tables with a calibration and simulates again (memory figures do
// not depend on durations on one stream; the times do).
void apply_calibration(Analysis& a, const sim::Calibration& c);

}  // namespace actsim::study
