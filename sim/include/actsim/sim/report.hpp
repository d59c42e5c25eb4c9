// actsim::sim::Analysis — a scenario lowered, simulated and summarised.
//
//   Scenario s = load_scenario("scenarios/seed-gpt2-xl.toml", {});
//   Analysis a = analyze(s);
//   fmt::print("{}", to_table(a, max_batch_size(s)));
//   nlohmann::json j = to_json(a);       // the `simulate --json` contract
#pragma once

#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "actsim/graph/lower.hpp"
#include "actsim/sim/engine.hpp"
#include "actsim/sim/scenario.hpp"

namespace actsim::sim {

struct Analysis {
  Scenario scenario;
  graph::BlockPlan block_plan;             // per block: kept, recomputed, offloaded
  std::unique_ptr<graph::StepGraph> step;  // stable address: the plan refers to its graph
  std::unique_ptr<Plan> plan;
  SimResult result;
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

// A group of storages live at the peak.
struct PeakGroup {
  graph::Category category;
  int32_t layer;                           // -1 outside blocks
  std::string op;                          // producing op ("(before the step)" for persistent ones)
  int64_t bytes = 0;
  int64_t count = 0;
};
// Storages live at the peak grouped by category, layer and producing op, largest first.
std::vector<PeakGroup> peak_groups(const Analysis& a);

nlohmann::json to_json(const Analysis& a, int64_t max_batch = -1);
// The model's configuration as JSON (the `model` object of every output that names a model).
nlohmann::json model_json(const graph::ModelConfig& m);
std::string to_table(const Analysis& a, int64_t max_batch = -1);

// "7.92 GiB", "512 B"
std::string human_bytes(int64_t bytes);

}  // namespace actsim::sim
