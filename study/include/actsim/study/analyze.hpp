// actsim::study::Analysis — a scenario lowered, simulated and summarised.
//
//   Scenario s = load_scenario("scenarios/seed-gpt2-xl.toml", {});
//   Analysis a = analyze(s);
//   int64_t b = max_batch_size(s);        // the largest batch that fits the device
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "actsim/graph/lower.hpp"
#include "actsim/sim/calibration.hpp"
#include "actsim/sim/engine.hpp"
#include "actsim/study/scenario.hpp"

namespace actsim::study {

struct Analysis {
  Scenario scenario;
  graph::BlockPlan block_plan;             // per block: kept, recomputed, offloaded
  std::unique_ptr<graph::StepGraph> step;  // stable address: the plan refers to its graph
  std::unique_ptr<sim::Plan> plan;
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
};

// The per-block plan of the scenario's checkpoint policy (or its explicit plan).
graph::BlockPlan block_plan_of(const Scenario& s);

// Lowers and simulates one scenario.
Analysis analyze(const Scenario& s);
// ... under the given rules instead of the scenario's profile (tests of the CUDA delta table).
Analysis analyze(const Scenario& s, const graph::RuntimeProfile& runtime);

// The largest batch size whose simulated peak fits the device's memory (0 if none does).
int64_t max_batch_size(const Scenario& s);

// Rebuilds the analysis's step tables with a calibration and simulates again (memory figures do
// not depend on durations on one stream; the times do).
void apply_calibration(Analysis& a, const sim::Calibration& c);

}  // namespace actsim::study
