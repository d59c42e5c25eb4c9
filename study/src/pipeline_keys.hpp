// Internal to study/: the pipeline-parallel scenario keys (issue 13, pp helper): parallel.pp,
// parallel.microbatches, parallel.pp_schedule, and the combinations refused with one line.
#pragma once

#include <optional>
#include <string>

#include "scenario_values.hpp"

namespace actsim::study::scenario_detail {

// parallel.pp, parallel.microbatches, parallel.pp_schedule: false if `key` is none of them.
bool set_pipeline_key(Scenario& sc, const std::string& key, const Value& v, const std::string& where);
// The first pipeline combination that is refused (file:line:key and why); nullopt if none.
std::optional<std::string> pipeline_problem(const Scenario& sc);

}  // namespace actsim::study::scenario_detail
