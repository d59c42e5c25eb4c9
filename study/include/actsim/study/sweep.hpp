// actsim::study sweeps — a cross product of scenario values, simulated in parallel, with the Pareto
// frontier of peak memory against step time.
//
//   Scenario base = load_scenario("scenarios/seed-gpt2-xl.toml", {});
//   std::vector<SweepAxis> axes{parse_sweep_axis("training.batch_size=1..8"),
//                               parse_sweep_axis("checkpoint.policy=none,full,sqrt")};
//   std::vector<SweepRow> rows = run_sweep(base, axes, {.threads = 2});   // 24 rows, pareto marked
//   write(sweep_csv(axes, rows));
//
// Every row is what study::analyze gives for that scenario (peak, step time, saved bytes). Note
// [Batch scaling] in sweep.cpp explains how rows that differ only in the batch size share work.
#pragma once

#include <cstdint>
#include <functional>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "actsim/study/scenario.hpp"

namespace actsim::study {

// One --vary option: a scenario key and its values, as written ("KEY=V1,V2,..."; a value is
// parsed like --set; LO..HI expands to the integers LO to HI; double quotes protect commas:
// checkpoint.policy=none,"ops:addmm,bmm").
struct SweepAxis {
  std::string text;                        // the option as written, for error messages
  std::string key;
  std::vector<std::string> values;         // in order, each as it would follow --set KEY=
};

// Parses "KEY=V1,V2,...". Throws InputError("--vary TEXT: ...") for an unknown key (with a
// did-you-mean), an empty list or value, or a malformed range. Values are checked by run_sweep.
SweepAxis parse_sweep_axis(const std::string& text);

// One run of the cross product.
struct SweepRow {
  std::vector<std::string> values;         // [axes] the value of each varied key
  int64_t peak_bytes = 0;                  // simulated device peak
  int64_t step_time_ns = 0;
  int64_t saved_bytes = 0;                 // activations kept for backward (Analysis::saved_bytes)
  bool fits = false;                       // peak_bytes <= the device's memory
  bool pareto = false;                     // on the frontier of (peak_bytes, step_time_ns)
};

struct SweepOptions {
  int threads = 1;                         // worker threads, >= 1
  // Called on the calling thread about every 100 ms and once at the end: runs done, runs in all.
  std::function<void(int64_t done, int64_t total)> progress;
};

// How the rows were computed (for benchmarks and tests).
struct SweepStats {
  int64_t analyzed = 0;                    // rows (and reference points) lowered and simulated in full
  int64_t scaled = 0;                      // rows computed from a verified batch-scaling model
};

// Simulates the cross product of `axes` (the last axis varies fastest) on top of `base`. Every
// combination is applied and validated before anything is simulated: bad input throws InputError
// naming the --vary option (and the combination when several keys are varied).
std::vector<SweepRow> run_sweep(const Scenario& base, const std::vector<SweepAxis>& axes, const SweepOptions& opts,
                                SweepStats* stats = nullptr);

// Marks rows that no other row dominates (lower-or-equal peak and step time, one strictly lower).
void mark_pareto(std::vector<SweepRow>& rows);

// Header: the varied keys, peak_bytes, step_time_ns, saved_bytes, fits, pareto.
std::string sweep_csv(const std::vector<SweepAxis>& axes, const std::vector<SweepRow>& rows);
// A list of objects with the same fields; varied values typed as --set parses them.
nlohmann::json sweep_json(const std::vector<SweepAxis>& axes, const std::vector<SweepRow>& rows);
// An aligned text table (frontier rows marked with '*').
std::string sweep_table(const std::vector<SweepAxis>& axes, const std::vector<SweepRow>& rows);

}  // namespace actsim::study
