#include "cli.hpp"

#include <fmt/format.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>

#include "actsim/util/error.hpp"
#include "actsim/util/output.hpp"

namespace actsim::cli {

void write_atomic(const std::string& path, const std::string& text) {
  util::OutputSet out;
  out.add("", path, text);
  out.commit();
}

void add_scenario_options(po::options_description& opts) {
  opts.add_options()("set", po::value<std::vector<std::string>>()->composing(),
                     "KEY=VALUE: override a scenario key (repeatable), e.g. --set training.batch_size=16");
}

po::variables_map parse(const std::vector<std::string>& args, const po::options_description& opts,
                        const char* command) {
  po::options_description hidden;
  hidden.add_options()("scenario", po::value<std::string>());
  po::positional_options_description pos;
  pos.add("scenario", 1);
  po::options_description all;
  all.add(opts).add(hidden);
  po::variables_map vm;
  try {
    po::store(po::command_line_parser(args).options(all).positional(pos).run(), vm);
  } catch (const po::too_many_positional_options_error&) {
    std::vector<std::string> extra;
    for (const std::string& a : args) {
      if (!a.empty() && a[0] != '-' && a.find('=') == std::string::npos) extra.push_back(a);
    }
    throw InputError(fmt::format("{} takes one SCENARIO file, got {} ({})", command, extra.size(),
                                 fmt::join(extra, ", ")));
  }
  po::notify(vm);
  return vm;
}

study::Scenario scenario_from(const po::variables_map& vm) {
  const std::string path = vm.count("scenario") ? vm["scenario"].as<std::string>() : "";
  if (vm.count("scenario") && path.empty()) throw InputError("\"\": an empty path is not a scenario file");
  std::vector<std::string> sets =
      vm.count("set") ? vm["set"].as<std::vector<std::string>>() : std::vector<std::string>{};
  return study::load_scenario(path, sets);
}

std::string human_seconds(double s) {
  if (s < 120) return fmt::format("{:.0f} s", s);
  if (s < 7200) return fmt::format("{:.0f} min", s / 60);
  return fmt::format("{:.1f} h", s / 3600);
}

void add_force_option(po::options_description& opts) {
  opts.add_options()("force", fmt::format("run even when the estimated work is above {:.0f} s (README, \"Reliability\")",
                                          kLongWorkSeconds).c_str());
}

void check_long_work(const po::variables_map& vm, double seconds, const std::string& what) {
  if (seconds <= kLongWorkSeconds || vm.count("force")) return;
  throw InputError(fmt::format("{}: about {} of work by estimate (more than {:.0f} s); pass --force to run it anyway",
                               what, human_seconds(seconds), kLongWorkSeconds));
}

std::string scenario_help() {
  std::string s = "scenario keys (TOML tables, or --set with dotted keys):\n";
  for (const std::string& k : study::scenario_keys()) s += "  " + k + "\n";
  return s;
}

}  // namespace actsim::cli
