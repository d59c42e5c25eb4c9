// Shared helpers of the actsim command-line program: one file per command (cmd_*.cpp), each
// exposing `int cmd_NAME(const std::vector<std::string>& args)`; main.cpp dispatches.
#pragma once

#include <boost/program_options.hpp>
#include <chrono>
#include <memory>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "actsim/util/output.hpp"
#include "actsim/study/analyze.hpp"
#include "actsim/study/scenario.hpp"

namespace actsim::cli {

namespace po = boost::program_options;

// The scenario options every simulating command shares: [SCENARIO] and --set KEY=VALUE.
void add_scenario_options(po::options_description& opts);
// Parses args with `opts` (+ the positional SCENARIO); throws InputError / po::error on bad input.
po::variables_map parse(const std::vector<std::string>& args, const po::options_description& opts,
                        const char* command);
// Loads the scenario named by the parsed options.
study::Scenario scenario_from(const po::variables_map& vm);

std::string scenario_help();

// The exporter options (--trace, --memviz, --csv, --report, --svg, --max-events, --timeline).
void add_export_options(po::options_description& opts);
// Adds the requested exporter files to `out` (written by out.commit(), all or nothing).
void add_exports_from(const study::Analysis& a, const po::variables_map& vm, util::OutputSet& out);

// Note [Long work]: commands whose work can be large estimate it before starting, from a cost
// per simulated layer (lowering, autodiff and the event loop: kSecondsPerLayer on this class of
// machine, Release). Above kLongWorkSeconds the command stops with one line giving the estimate,
// unless --force is given.
inline constexpr double kSecondsPerLayer = 0.0008;  // one lowering + simulation, per block
inline constexpr double kLongWorkSeconds = 60;
// Throws InputError("WHAT: about N min of work (...); pass --force") when `seconds` is above
// kLongWorkSeconds and --force is not in `vm`.
void check_long_work(const po::variables_map& vm, double seconds, const std::string& what);
void add_force_option(po::options_description& opts);
std::string human_seconds(double s);

// Note [Progress]: long work shows one line on stderr, redrawn in place, only when stderr is a
// terminal (never in a pipe, a file or CI), with an ETA from the rate so far:
//   "[##########--------------------] 512/1000 runs, ETA 12 s"   (sweep)
//   "plan: 5/9 simulations, ETA 12 s"                              (plan)
//   "replay: main run, 1024/5120 entries, ETA 3 s"                 (replay, per stage)
// The line is erased when the work ends (or throws), so what the command prints stays clean.
class ProgressLine {
 public:
  // `label` ("plan", "replay"), `unit` ("simulations"); `bar` draws a bar instead of the label.
  ProgressLine(std::string label, std::string unit, bool bar = false, bool enabled = true);
  ProgressLine(const ProgressLine&) = delete;
  ProgressLine& operator=(const ProgressLine&) = delete;
  ~ProgressLine() { clear(); }
  bool enabled() const { return enabled_; }
  // Starts a new stage (its own count and ETA): "replay: safety check, ...".
  void stage(std::string name);
  void update(int64_t done, int64_t total);
  void clear();  // erases the line (nothing when disabled or nothing drawn)

 private:
  std::string label_, unit_, stage_;
  bool bar_, enabled_, drawn_ = false;
  std::chrono::steady_clock::time_point t0_;
};

// Note [Teardown at exit]: a command's last big structure (the reported analysis: its graph, event
// log and side tables) is handed to keep_until_exit once its output is built: it stays reachable
// from a static until the process ends, which reclaims the memory without running the destructors
// (~6% of simulate's CPU was freeing them one by one). Only after success: on an exception the
// owner frees it as usual. Sanitizer builds free it here, so their checks still see the teardown.
#if defined(__SANITIZE_ADDRESS__)
#define ACTSIM_CLI_SANITIZED 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(leak_sanitizer) || __has_feature(memory_sanitizer)
#define ACTSIM_CLI_SANITIZED 1
#endif
#endif
template <typename Owner>
void keep_until_exit(Owner&& owner) {
#ifdef ACTSIM_CLI_SANITIZED
  Owner freed = std::move(owner);
#else
  static auto* kept = new std::decay_t<Owner>(std::move(owner));  // NOLINT: reachable until exit
  (void)kept;
#endif
}

int cmd_simulate(const std::vector<std::string>& args);
int cmd_compare(const std::vector<std::string>& args);
int cmd_plan(const std::vector<std::string>& args);
int cmd_devices(const std::vector<std::string>& args);
int cmd_keys(const std::vector<std::string>& args);
int cmd_fit(const std::vector<std::string>& args);
int cmd_sweep(const std::vector<std::string>& args);
int cmd_replay(const std::vector<std::string>& args);
int cmd_advise(const std::vector<std::string>& args);

}  // namespace actsim::cli
