// Shared helpers of the actsim command-line program: one file per command (cmd_*.cpp), each
// exposing `int cmd_NAME(const std::vector<std::string>& args)`; main.cpp dispatches.
#pragma once

#include <boost/program_options.hpp>
#include <string>
#include <vector>

#include "actsim/sim/output.hpp"
#include "actsim/sim/report.hpp"
#include "actsim/sim/scenario.hpp"

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
sim::Scenario scenario_from(const po::variables_map& vm);

std::string scenario_help();

// The exporter options (--trace, --memviz, --csv, --report, --svg, --max-events, --timeline).
void add_export_options(po::options_description& opts);
// Adds the requested exporter files to `out` (written by out.commit(), all or nothing).
void add_exports_from(const sim::Analysis& a, const po::variables_map& vm, sim::OutputSet& out);

int cmd_simulate(const std::vector<std::string>& args);
int cmd_compare(const std::vector<std::string>& args);
int cmd_plan(const std::vector<std::string>& args);
int cmd_devices(const std::vector<std::string>& args);
int cmd_keys(const std::vector<std::string>& args);
int cmd_fit(const std::vector<std::string>& args);
int cmd_sweep(const std::vector<std::string>& args);
int cmd_replay(const std::vector<std::string>& args);

}  // namespace actsim::cli
