// actsim::report summary — an analysis as people and programs read it.
//
//   study::Analysis a = study::analyze(study::load_scenario("scenarios/seed-gpt2-xl.toml", {}));
//   fmt::print("{}", to_table(a, study::max_batch_size(a.scenario)));
//   nlohmann::json j = to_json(a);       // the `simulate --json` contract
#pragma once

#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "actsim/study/analyze.hpp"

namespace actsim::report {

// A group of storages live at the peak.
struct PeakGroup {
  graph::Category category;
  int32_t layer;                           // -1 outside blocks
  std::string op;                          // producing op ("(before the step)" for persistent ones)
  int64_t bytes = 0;
  int64_t count = 0;
};
// Storages live at the peak grouped by category, layer and producing op, largest first.
std::vector<PeakGroup> peak_groups(const study::Analysis& a);

nlohmann::json to_json(const study::Analysis& a, int64_t max_batch = -1);
std::string to_table(const study::Analysis& a, int64_t max_batch = -1);

}  // namespace actsim::report
