// actsim — command-line program. Dispatches to one command per cmd_*.cpp and turns bad input
// into one line on stderr and exit code 2. Boost.Program_options lives only in this folder.
#include <fmt/format.h>

#include <iostream>
#include <map>
#include <string>
#include <string_view>
#include <vector>

#include "actsim/util/error.hpp"
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

Run `actsim <command> --help` for the options of a command.
)";

using Command = int (*)(const std::vector<std::string>&);

// One line whatever the input held: a newline, tab or other control character in a key or value
// the message echoes is written as an escape (\n, \t, \xNN), never raw.
std::string one_line(std::string_view msg) {
  std::string out;
  out.reserve(msg.size());
  for (char ch : msg) {
    const auto c = static_cast<unsigned char>(ch);
    if (c == '\n') out += "\\n";
    else if (c == '\t') out += "\\t";
    else if (c == '\r') out += "\\r";
    else if (c < 0x20 || c == 0x7f) out += fmt::format("\\x{:02x}", c);
    else out += ch;
  }
  return out;
}

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
  } catch (const InputError& e) {
    std::cerr << "actsim: error: " << one_line(e.what()) << "\n";
    return 2;
  } catch (const cli::po::error& e) {
    std::cerr << "actsim: error: " << one_line(e.what()) << "\n";
    return 2;
  } catch (const std::bad_alloc&) {
    // Commands check their sizes before allocating; reaching this is a gap in those checks.
    std::cerr << "actsim: error: out of memory (a size check missed this input; please report it)\n";
    return 1;
  } catch (const std::exception& e) {
    std::cerr << "actsim: internal error: " << one_line(e.what()) << "\n";
    return 1;
  }
}
