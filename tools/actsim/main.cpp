// actsim — command-line program. Parses options (Boost.Program_options lives only here),
// dispatches to a subcommand, and turns bad input into one line on stderr and exit code 2.
#include <boost/program_options.hpp>
#include <fmt/format.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <string>
#include <vector>

#include "actsim/graph/error.hpp"
#include "actsim/sim/report.hpp"
#include "actsim/sim/scenario.hpp"

namespace po = boost::program_options;
using namespace actsim;

namespace {

constexpr const char* kUsage = R"(actsim -- simulate the memory of one transformer training step

usage: actsim <command> [options]

commands:
  simulate [SCENARIO]   lower, simulate one step, and report peak memory and what makes it up
  devices               list the device specs (scenarios/devices.toml) and their sources
  keys                  list every scenario key

Run `actsim <command> --help` for the options of a command.
)";

// Writes `text` to `path` atomically: a temporary file beside it, then a rename, so an error
// never leaves a half-written file.
void write_atomic(const std::string& path, const std::string& text) {
  const std::string tmp = path + ".tmp." + std::to_string(::getpid());
  {
    std::ofstream out(tmp, std::ios::binary);
    if (!out) throw InputError(fmt::format("{}: cannot write the output file", path));
    out << text;
    if (!out.flush()) {
      std::filesystem::remove(tmp);
      throw InputError(fmt::format("{}: cannot write the output file", path));
    }
  }
  std::error_code ec;
  std::filesystem::rename(tmp, path, ec);
  if (ec) {
    std::filesystem::remove(tmp);
    throw InputError(fmt::format("{}: cannot write the output file ({})", path, ec.message()));
  }
}

std::string scenario_help() {
  std::string s = "scenario keys (TOML tables, or --set with dotted keys):\n";
  for (const std::string& k : sim::scenario_keys()) s += "  " + k + "\n";
  return s;
}

int cmd_simulate(const std::vector<std::string>& args) {
  po::options_description opts("actsim simulate [SCENARIO] [options]");
  opts.add_options()
      ("help,h", "show this help")
      ("set", po::value<std::vector<std::string>>()->composing(),
       "KEY=VALUE: override a scenario key (repeatable), e.g. --set training.batch_size=16")
      ("json", "print one JSON object (the contract in README.md) instead of the table")
      ("out", po::value<std::string>(), "also write the JSON to this file (atomically)")
      ("no-fit", "skip the search for the largest batch size that fits the device");
  po::options_description hidden;
  hidden.add_options()("scenario", po::value<std::string>());
  po::positional_options_description pos;
  pos.add("scenario", 1);
  po::options_description all;
  all.add(opts).add(hidden);
  po::variables_map vm;
  size_t n_positional = 0;
  for (const std::string& a : args) n_positional += !a.empty() && a[0] != '-';
  try {
    po::store(po::command_line_parser(args).options(all).positional(pos).run(), vm);
  } catch (const po::too_many_positional_options_error&) {
    std::vector<std::string> extra;
    for (const std::string& a : args) {
      if (!a.empty() && a[0] != '-' && a.find('=') == std::string::npos) extra.push_back(a);
    }
    throw InputError(fmt::format("simulate takes one SCENARIO file, got {} ({})", extra.size(), fmt::join(extra, ", ")));
  }
  (void)n_positional;
  po::notify(vm);
  if (vm.count("help")) {
    std::cout << opts << "\nSCENARIO is a TOML file (see scenarios/); without one, defaults plus --set make one.\n\n"
              << scenario_help();
    return 0;
  }
  const std::string path = vm.count("scenario") ? vm["scenario"].as<std::string>() : "";
  std::vector<std::string> sets = vm.count("set") ? vm["set"].as<std::vector<std::string>>() : std::vector<std::string>{};
  sim::Scenario s = sim::load_scenario(path, sets);
  sim::Analysis a = sim::analyze(s);
  const int64_t max_batch = vm.count("no-fit") ? -1 : sim::max_batch_size(s);
  nlohmann::json j = sim::to_json(a, max_batch);
  if (vm.count("out")) write_atomic(vm["out"].as<std::string>(), j.dump(2) + "\n");
  if (vm.count("json")) std::cout << j.dump(2) << "\n";
  else std::cout << sim::to_table(a, max_batch);
  return 0;
}

int cmd_devices() {
  for (const sim::DeviceSpec& d : sim::devices()) {
    fmt::print("{:<16} {:>10}  fp32 {:.1f} TFLOP/s, bf16 {:.1f} TFLOP/s, {:.2f} TB/s\n    source: {}\n", d.name,
               sim::human_bytes(d.memory_bytes), d.flops_fp32 / 1e12, d.flops_bf16 / 1e12, d.mem_bandwidth / 1e12,
               d.source);
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> args(argv + 1, argv + argc);
  try {
    if (args.empty()) {
      std::cerr << "actsim: error: no command given (see actsim --help)\n";
      return 2;
    }
    if (args[0] == "--help" || args[0] == "-h" || args[0] == "help") {
      std::cout << kUsage;
      return 0;
    }
    const std::string cmd = args[0];
    args.erase(args.begin());
    if (cmd == "simulate") return cmd_simulate(args);
    if (cmd == "devices" || cmd == "keys") {
      if (!args.empty()) {
        std::cerr << fmt::format("actsim: error: {}: unexpected argument \"{}\" (it takes none)\n", cmd, args[0]);
        return 2;
      }
      if (cmd == "devices") return cmd_devices();
      std::cout << scenario_help();
      return 0;
    }
    std::cerr << fmt::format("actsim: error: unknown command \"{}\" (see actsim --help)\n", cmd);
    return 2;
  } catch (const InputError& e) {
    std::cerr << "actsim: error: " << e.what() << "\n";
    return 2;
  } catch (const po::error& e) {
    std::cerr << "actsim: error: " << e.what() << "\n";
    return 2;
  }
}
