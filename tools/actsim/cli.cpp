#include "cli.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <iostream>
#include <unistd.h>

#include <filesystem>
#include <fstream>

#include "actsim/util/error.hpp"
#include "actsim/util/output.hpp"

namespace actsim::cli {

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

ProgressLine::ProgressLine(std::string label, std::string unit, bool bar, bool enabled)
    : label_(std::move(label)), unit_(std::move(unit)), bar_(bar), enabled_(enabled && ::isatty(STDERR_FILENO)),
      t0_(std::chrono::steady_clock::now()) {}

void ProgressLine::stage(std::string name) {
  stage_ = std::move(name);
  t0_ = std::chrono::steady_clock::now();
}

void ProgressLine::update(int64_t done, int64_t total) {
  if (!enabled_) return;
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0_).count();
  const std::string eta =
      done > 0 && done < total
          ? fmt::format(", ETA {}", human_seconds(secs * static_cast<double>(total - done) / static_cast<double>(done)))
          : "";
  std::string head;
  if (bar_) {
    constexpr int kWidth = 30;
    const int filled = total > 0 ? static_cast<int>(kWidth * std::min(done, total) / total) : kWidth;
    head = fmt::format("[{}{}] ", std::string(static_cast<size_t>(filled), '#'),
                       std::string(static_cast<size_t>(kWidth - filled), '-'));
  } else {
    head = label_ + ": " + (stage_.empty() ? "" : stage_ + ", ");
  }
  std::cerr << fmt::format("\r{}{}/{} {}{}\033[K", head, done, total, unit_, eta) << std::flush;
  drawn_ = true;
}

void ProgressLine::clear() {
  if (!drawn_) return;
  std::cerr << "\r\033[K" << std::flush;
  drawn_ = false;
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
