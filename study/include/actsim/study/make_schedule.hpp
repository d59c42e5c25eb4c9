// actsim::study::make_schedule — the simulated step of an analysis as a schedule (docs/schedule-format.md).
//
//   Schedule s = make_schedule(analyze(load_scenario("gpt2.toml", {})));
//   std::string text = emit_schedule(a);            // JSON lines
#pragma once

#include <string>

#include "actsim/schedule/schedule.hpp"
#include "actsim/study/analyze.hpp"

namespace actsim::study {

// The schedule of an analysed scenario (re-runs the engine with a recording observer).
schedule::Schedule make_schedule(const Analysis& a);
// The same as text.
std::string emit_schedule(const Analysis& a);

}  // namespace actsim::study
