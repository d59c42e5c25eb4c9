// actsim::report advisor formats — an advise result (study/advise.hpp) as the documented JSON
// object (README, "The advise --json contract") or a ranked text table.
//
//   study::AdviseResult r = study::advise(s, {});
//   std::cout << advise_table(s, r, "actsim simulate scenarios/x.toml");
//   std::cout << advise_json(s, r).dump(2);
#pragma once

#include <nlohmann/json.hpp>
#include <string>

#include "actsim/study/advise.hpp"

namespace actsim::report {

// One candidate: changes, overrides, micro_batch, grad_accum_steps, checkpoint, checkpointed,
// fits, peak_bytes, step_time_ns, tokens_per_second (and speedup against `as_given` when given).
nlohmann::json advise_candidate_json(const study::AdviseCandidate& c, const study::AdviseCandidate* as_given);
// The whole answer: scenario, device, budget_bytes, global_batch, seq_len, fits, searched, search,
// as_given, ranked, least_peak.
nlohmann::json advise_json(const study::Scenario& s, const study::AdviseResult& r);
// The header, the scenario as given, the ranked table and the command that reproduces the fastest
// (`simulate_command`, e.g. "actsim simulate scenarios/x.toml", followed by its --set options).
std::string advise_table(const study::Scenario& s, const study::AdviseResult& r, const std::string& simulate_command);

}  // namespace actsim::report
