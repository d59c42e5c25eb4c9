// actsim simulate [SCENARIO]: lower, simulate one step, report the memory table or JSON.
#include <fmt/format.h>

#include <iostream>

#include "actsim/graph/error.hpp"
#include "actsim/sim/report.hpp"
#include "cli.hpp"

namespace actsim::cli {

int cmd_simulate(const std::vector<std::string>& args) {
  po::options_description opts("actsim simulate [SCENARIO] [options]");
  opts.add_options()("help,h", "show this help");
  add_scenario_options(opts);
  opts.add_options()
      ("json", "print one JSON object (the contract in README.md) instead of the table")
      ("out", po::value<std::string>(), "also write the JSON to this file (atomically)")
      ("no-fit", "skip the search for the largest batch size that fits the device");
  po::variables_map vm = parse(args, opts, "simulate");
  if (vm.count("help")) {
    std::cout << opts << "\nSCENARIO is a TOML file (see scenarios/); without one, defaults plus --set make one.\n\n"
              << scenario_help();
    return 0;
  }
  sim::Scenario s = scenario_from(vm);
  sim::Analysis a = sim::analyze(s);
  const int64_t max_batch = vm.count("no-fit") ? -1 : sim::max_batch_size(s);
  nlohmann::json j = sim::to_json(a, max_batch);
  if (vm.count("out")) write_atomic(vm["out"].as<std::string>(), j.dump(2) + "\n");
  if (vm.count("json")) std::cout << j.dump(2) << "\n";
  else std::cout << sim::to_table(a, max_batch);
  return 0;
}

int cmd_devices(const std::vector<std::string>& args) {
  if (!args.empty()) throw InputError(fmt::format("devices: unexpected argument \"{}\" (it takes none)", args[0]));
  for (const sim::DeviceSpec& d : sim::devices()) {
    fmt::print("{:<16} {:>10}  fp32 {:.1f} TFLOP/s, bf16 {:.1f} TFLOP/s, {:.2f} TB/s, host link {:.0f} GB/s\n"
               "    source: {}\n",
               d.name, sim::human_bytes(d.memory_bytes), d.flops_fp32 / 1e12, d.flops_bf16 / 1e12,
               d.mem_bandwidth / 1e12, d.host_bandwidth / 1e9, d.source);
  }
  return 0;
}

int cmd_keys(const std::vector<std::string>& args) {
  if (!args.empty()) throw InputError(fmt::format("keys: unexpected argument \"{}\" (it takes none)", args[0]));
  std::cout << scenario_help();
  return 0;
}

}  // namespace actsim::cli
