// actsim::report sweep formats — a sweep's rows (study/sweep.hpp) as CSV, JSON or a text table.
//
//   std::vector<SweepRow> rows = study::run_sweep(base, axes, {.threads = 2});
//   std::string csv = sweep_csv(axes, rows);
//   std::cout << sweep_table(axes, rows);
#pragma once

#include <nlohmann/json_fwd.hpp>
#include <string>
#include <vector>

#include "actsim/study/sweep.hpp"

namespace actsim::report {

// Header: the varied keys, peak_bytes, step_time_ns, saved_bytes, fits, pareto.
std::string sweep_csv(const std::vector<study::SweepAxis>& axes, const std::vector<study::SweepRow>& rows);
// A list of objects with the same fields; varied values typed as --set parses them.
nlohmann::json sweep_json(const std::vector<study::SweepAxis>& axes, const std::vector<study::SweepRow>& rows);
// An aligned text table (frontier rows marked with '*').
std::string sweep_table(const std::vector<study::SweepAxis>& axes, const std::vector<study::SweepRow>& rows);

}  // namespace actsim::report
