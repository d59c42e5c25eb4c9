// actsim — command-line program. Dispatches to one command per cmd_*.cpp and turns every failure
// into one line on stderr and an exit code (2 bad input, 1 a device or internal error).
// Boost.Program_options lives only in this folder.
#include <fmt/format.h>

#include <cstdio>
#include <iostream>
#include <map>
#include <string>
#include <string_view>
#include <vector>

#include "actsim/util/error.hpp"
#include "actsim/util/text.hpp"
#include "cli.hpp"

using namespace actsim;

namespace {

constexpr const char* kUsage = R"(actsim -- simulate the memory of one transformer training step

usage: actsim <command> [options]

commands:
  simulate [SCENARIO]   lower, simulate one step, and report peak memory and what makes it up
  plan [SCENARIO] --budget SIZE
                        the fastest checkpointing plan whose peak fits the budget
  compare A.json B.json --report FILE.html
                        overlay the memory timelines of several runs (simulate --json --timeline)
  devices               list the device specs (scenarios/devices.toml) and their sources
  keys                  list every scenario key
  fit [SCENARIO]        the largest batch (--vary-seq: and seq_len) that fits, per checkpoint policy
  sweep [SCENARIO] --vary KEY=V1,V2,...  the cross product in parallel, with the Pareto frontier
  replay [SCENARIO|SCHEDULE]  run the step for real (cpu/cuda) and confirm the simulation
  advise [SCENARIO] [--budget SIZE] [--allow lora]
                        the fastest way to train it: checkpointing, autocast, attention,
                        micro-batch and accumulation (LoRA if allowed), ranked by tokens/s

Run `actsim <command> --help` for the options of a command.
)";

using Command = int (*)(const std::vector<std::string>&);

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> args(argv + 1, argv + argc);
  const std::map<std::string, Command> commands{
      {"simulate", cli::cmd_simulate},
      {"compare", cli::cmd_compare},
      {"plan", cli::cmd_plan},
      {"devices", cli::cmd_devices},
      {"keys", cli::cmd_keys},
      {"fit", cli::cmd_fit},
      {"sweep", cli::cmd_sweep},
      {"replay", cli::cmd_replay},
      {"advise", cli::cmd_advise},
  };
  try {
    if (args.empty()) throw InputError("no command given (see actsim --help)");
    if (args[0] == "--help" || args[0] == "-h" || args[0] == "help") {
      std::cout << kUsage;
      return 0;
    }
    auto it = commands.find(args[0]);
    if (it == commands.end()) throw InputError(fmt::format("unknown command \"{}\" (see actsim --help)", args[0]));
    args.erase(args.begin());
    return it->second(args);
  } catch (const cli::po::error& e) {
    std::cerr << "actsim: error: " << util::one_line(e.what()) << "\n";
    return 2;
  } catch (...) {
    // Everything else (bad input, a device error, our own bug) ends in one line and an exit code.
    const Failure f = describe_failure(std::current_exception());
    std::fputs(f.line.empty() ? "actsim: internal error\n" : (f.line + "\n").c_str(), stderr);
    return f.exit_code;
  }
}
