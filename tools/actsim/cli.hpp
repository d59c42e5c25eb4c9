// Shared helpers of the actsim command-line program: one file per command (cmd_*.cpp), each
// exposing `int cmd_NAME(const std::vector<std::string>& args)`; main.cpp dispatches.
#pragma once

#include <boost/program_options.hpp>
#include <string>
#include <vector>

#include "actsim/util/output.hpp"
#include "actsim/study/analyze.hpp"
#include "actsim/study/scenario.hpp"

namespace actsim::cli {

namespace po = boost::program_options;

// Writes `text` to `path` atomically (temporary file beside it, then rename): an error never
// leaves a half-written file. Throws InputError naming the path.
void write_atomic(const std::string& path, const std::string& text);

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

int cmd_simulate(const std::vector<std::string>& args);
int cmd_compare(const std::vector<std::string>& args);
int cmd_plan(const std::vector<std::string>& args);
int cmd_devices(const std::vector<std::string>& args);
int cmd_keys(const std::vector<std::string>& args);
int cmd_fit(const std::vector<std::string>& args);
int cmd_sweep(const std::vector<std::string>& args);
int cmd_replay(const std::vector<std::string>& args);

}  // namespace actsim::cli
