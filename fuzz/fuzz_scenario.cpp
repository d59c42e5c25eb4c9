// libFuzzer harness: the scenario parser with --set overrides, and for small models the lowering,
// the simulation, the JSON report, the schedule and every exporter (in memory).
//
// Input: TOML text, optionally followed by a NUL byte and newline-separated KEY=VALUE overrides.
// Bad input must be an InputError; anything else (a crash, a sanitizer report, another
// exception) is a finding.
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "actsim/util/error.hpp"
#include "actsim/report/export.hpp"
#include "actsim/study/analyze.hpp"
#include "actsim/study/scenario.hpp"
#include "actsim/schedule/schedule.hpp"
#include "actsim/report/summary.hpp"
#include "actsim/study/make_schedule.hpp"

using namespace actsim;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string in(reinterpret_cast<const char*>(data), size);
  const size_t nul = in.find('\0');
  const std::string toml = in.substr(0, nul);
  std::vector<std::string> sets;
  if (nul != std::string::npos) {
    std::string rest = in.substr(nul + 1), cur;
    for (char c : rest) {
      if (c == '\n') sets.push_back(cur), cur.clear();
      else cur += c;
    }
    if (!cur.empty()) sets.push_back(cur);
  }
  try {
    study::Scenario s = study::load_scenario_text(toml, "fuzz.toml", sets);
    const auto& m = s.model;
    // Only small models go further: the point is the code paths, not the sizes.
    const bool small = m.n_layers <= 2 && m.d_model <= 64 && m.seq_len <= 32 && m.vocab_size <= 256 &&
                       s.training.batch_size <= 2 && m.n_heads <= 16 && (m.d_ff <= 256) &&
                       !s.is_budget();
    if (!small) return 0;
    study::Analysis a = study::analyze(s);
    (void)report::to_json(a, -1).dump();
    (void)report::to_table(a, -1);
    const report::Timeline t = report::record_timeline(a);
    (void)report::chrome_trace_json(a, t, 50);
    (void)report::memviz_pickle(a, t, 50);
    (void)report::timeline_csv(a, t, 0);
    (void)report::report_html(a, t);
    (void)study::emit_schedule(a);
  } catch (const InputError&) {
  }
  return 0;
}
