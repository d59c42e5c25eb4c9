// Test fixture: writes every export of one scenario into a folder, plus the facts the Python
// checks compare against (summary.json: `simulate --json` with the timeline).
//
//   actsim_export_fixture OUT_DIR [--max-events N] [KEY=VALUE ...]
#include <fmt/format.h>

#include <filesystem>
#include <fstream>
#include <iostream>

#include "actsim/graph/error.hpp"
#include "actsim/sim/export.hpp"

using namespace actsim;

int main(int argc, char** argv) {
  if (argc < 2) {
    std::cerr << "usage: actsim_export_fixture OUT_DIR [--max-events N] [KEY=VALUE ...]\n";
    return 2;
  }
  try {
    const std::filesystem::path dir = argv[1];
    std::filesystem::create_directories(dir);
    int64_t max_events = 0;
    std::vector<std::string> sets;
    for (int i = 2; i < argc; ++i) {
      const std::string arg = argv[i];
      if (arg == "--max-events" && i + 1 < argc) max_events = std::stoll(argv[++i]);
      else sets.push_back(arg);
    }
    const sim::Analysis a = sim::analyze(sim::load_scenario("", sets));
    sim::write_exports(a, {.trace = (dir / "trace.json").string(),
                           .memviz = (dir / "snapshot.pickle").string(),
                           .csv = (dir / "events.csv").string(),
                           .report = (dir / "report.html").string(),
                           .svg = (dir / "chart.svg").string(),
                           .max_events = max_events});
    nlohmann::json j = sim::to_json(a);
    j["timeline"] = sim::timeline_json(a);
    j["memory_events"] = sim::record_timeline(a).events.size();
    sim::write_file_atomic((dir / "summary.json").string(), j.dump() + "\n");
    return 0;
  } catch (const InputError& e) {
    std::cerr << "actsim_export_fixture: error: " << e.what() << "\n";
    return 2;
  }
}
