// actsim simulate [SCENARIO]: lower, simulate one step, report the memory table or JSON.
#include <fmt/format.h>

#include <iostream>
#include <nlohmann/json.hpp>

#include "actsim/util/error.hpp"
#include "actsim/report/export.hpp"
#include "actsim/sim/calibration.hpp"
#include "actsim/study/analyze.hpp"
#include "actsim/study/batch_search.hpp"
#include "actsim/schedule/schedule.hpp"
#include "actsim/util/units.hpp"
#include "actsim/report/summary.hpp"
#include "actsim/study/make_schedule.hpp"
#include "actsim/util/output.hpp"
#include "cli.hpp"

namespace actsim::cli {

using sim::simulate;
using sim::devices;
using report::coarsen;

namespace {
// --hf PATH: model.hf_config = PATH before the --set overrides (a TOML literal string unless the
// path has a quote or a line break, then the bare text).
study::Scenario scenario_with_hf(const po::variables_map& vm, const std::string& path) {
  if (path.empty()) throw InputError("--hf \"\": an empty path is not a config.json");
  const bool literal = path.find_first_of("'\n\r") == std::string::npos;
  std::vector<std::string> sets{"model.hf_config=" + (literal ? "'" + path + "'" : path)};
  if (vm.count("set")) {
    for (const std::string& o : vm["set"].as<std::vector<std::string>>()) sets.push_back(o);
  }
  return study::load_scenario(vm.count("scenario") ? vm["scenario"].as<std::string>() : "", sets);
}
}  // namespace

int cmd_simulate(const std::vector<std::string>& args) {
  po::options_description opts("actsim simulate [SCENARIO] [options]");
  opts.add_options()("help,h", "show this help");
  add_scenario_options(opts);
  opts.add_options()
      ("json", "print one JSON object (the contract in README.md) instead of the table")
      ("out", po::value<std::string>(), "also write the JSON to this file (atomically)")
      ("hf", po::value<std::string>(), "a Hugging Face config.json (as model.hf_config; --set applies on top)")
      ("no-fit", "skip the search for the largest batch size that fits the device")
      ("emit-schedule", po::value<std::string>(), "write the step's alloc/run/free schedule to FILE (JSON lines, docs/schedule-format.md)")
      ("calibration", po::value<std::string>(), "op times measured by `actsim replay --calibration-out FILE`");
  add_export_options(opts);
  add_force_option(opts);
  po::variables_map vm = parse(args, opts, "simulate");
  if (vm.count("help")) {
    std::cout << opts << "\nSCENARIO is a TOML file (see scenarios/); without one, defaults plus --set make one.\n\n"
              << scenario_help();
    return 0;
  }
  // Every output is checked before the work and written together after it (all or nothing).
  util::OutputSet files;
  if (vm.count("scenario")) files.protect(vm["scenario"].as<std::string>());
  if (vm.count("calibration")) files.protect(vm["calibration"].as<std::string>());
  for (const char* k : {"out", "emit-schedule", "trace", "memviz", "csv", "report", "svg"}) {
    if (vm.count(k)) util::check_output_path(std::string("--") + k, vm[k].as<std::string>(),
                                            {vm.count("scenario") ? vm["scenario"].as<std::string>() : "",
                                             vm.count("calibration") ? vm["calibration"].as<std::string>() : ""});
  }
  if (vm.count("hf")) files.protect(vm["hf"].as<std::string>());
  study::Scenario s = vm.count("hf") ? scenario_with_hf(vm, vm["hf"].as<std::string>()) : scenario_from(vm);
  // One lowering and simulation, and about 14 more for the batch search (Note [Long work]).
  check_long_work(vm, (vm.count("no-fit") ? 1 : 15) * static_cast<double>(s.model.n_layers) * kSecondsPerLayer,
                  fmt::format("simulate at {} layers{}", s.model.n_layers, vm.count("no-fit") ? "" : " with the batch search (--no-fit skips it)"));
  std::unique_ptr<study::Analysis> owned(new study::Analysis(study::analyze(s)));
  study::Analysis& a = *owned;
  if (a.pipeline) {  // issue 13: a pipeline's figures are its stages' replay, not one event log
    // --trace writes one process per rank class; --memviz, --csv, --report and --svg hold one
    // device: refused with one line before any work (report::check_pipeline_exports).
    report::check_pipeline_exports(a, {.memviz = vm.count("memviz") ? "-" : "", .csv = vm.count("csv") ? "-" : "",
                                       .report = vm.count("report") ? "-" : "", .svg = vm.count("svg") ? "-" : ""});
    for (const char* k : {"calibration", "emit-schedule", "timeline"}) {
      if (vm.count(k)) {
        throw InputError(fmt::format("--{}: not written for a pipeline yet ({}); simulate a stage alone without parallel.pp",
                                     k, s.where("parallel.pp")));
      }
    }
  }
  if (vm.count("calibration")) study::apply_calibration(a, sim::load_calibration(vm["calibration"].as<std::string>()));
  if (vm.count("emit-schedule")) files.add("--emit-schedule", vm["emit-schedule"].as<std::string>(), study::emit_schedule(a));
  const int64_t max_batch = vm.count("no-fit") ? -1 : study::max_batch_size(a);
  nlohmann::json j = report::to_json(a, max_batch);
  if (vm.count("timeline")) {
    j["timeline"] = report::timeline_json(a);
    j["memory_events"] = report::record_timeline(a).events.size();  // device memory events (CSV rows)
  }
  add_exports_from(a, vm, files);
  if (vm.count("out")) files.add("--out", vm["out"].as<std::string>(), j.dump(2) + "\n");
  files.commit();
  if (vm.count("json")) std::cout << j.dump(2) << "\n";
  else std::cout << report::to_table(a, max_batch);
  keep_until_exit(std::move(owned));  // Note [Teardown at exit]
  return 0;
}

void add_export_options(po::options_description& opts) {
  opts.add_options()
      ("trace", po::value<std::string>(), "FILE.json: Chrome trace (Perfetto, chrome://tracing): memory counters per "
                                          "category, op slices per stream, the peak; on a pipeline one process per "
                                          "rank class")
      ("memviz", po::value<std::string>(), "FILE.pickle: snapshot for PyTorch's memory viewer (pytorch.org/memory_viz)")
      ("csv", po::value<std::string>(), "FILE.csv: one row per memory event with live bytes per category")
      ("report", po::value<std::string>(), "FILE.html: self-contained report (stacked memory chart, peak, tables)")
      ("svg", po::value<std::string>(), "FILE.svg: the report's chart alone")
      ("max-events", po::value<int64_t>()->default_value(0), "coarsen timelines to about N memory events (0 = all)")
      ("timeline", "add the memory timeline to the JSON (for `actsim compare`)");
}

void add_exports_from(const study::Analysis& a, const po::variables_map& vm, util::OutputSet& out) {
  auto get = [&](const char* k) { return vm.count(k) ? vm[k].as<std::string>() : std::string{}; };
  report::ExportRequest r{.trace = get("trace"), .memviz = get("memviz"), .csv = get("csv"), .report = get("report"),
                       .svg = get("svg"), .max_events = vm["max-events"].as<int64_t>()};
  if (r.max_events < 0) throw InputError(fmt::format("--max-events {}: must be 0 or positive", r.max_events));
  report::add_exports(a, r, out);
}

int cmd_compare(const std::vector<std::string>& args) {
  po::options_description opts("actsim compare A.json B.json [...] --report FILE.html");
  opts.add_options()("help,h", "show this help")(
      "report", po::value<std::string>(), "FILE.html: the runs' memory over time overlaid in one page");
  po::options_description hidden;
  hidden.add_options()("runs", po::value<std::vector<std::string>>());
  po::positional_options_description pos;
  pos.add("runs", -1);
  po::options_description all;
  all.add(opts).add(hidden);
  po::variables_map vm;
  po::store(po::command_line_parser(args).options(all).positional(pos).run(), vm);
  po::notify(vm);
  if (vm.count("help")) {
    std::cout << opts << "\nEach input is the output of `actsim simulate --json --timeline` (or plan, replay).\n";
    return 0;
  }
  if (!vm.count("report")) throw InputError("compare: --report FILE.html is required");
  std::vector<std::string> runs = vm.count("runs") ? vm["runs"].as<std::vector<std::string>>() : std::vector<std::string>{};
  return report::compare_runs(runs, vm["report"].as<std::string>());
}

int cmd_devices(const std::vector<std::string>& args) {
  if (!args.empty()) throw InputError(fmt::format("devices: unexpected argument \"{}\" (it takes none)", args[0]));
  for (const sim::DeviceSpec& d : sim::devices()) {
    fmt::print("{:<16} {:>10}  fp32 {:.1f} TFLOP/s, bf16 {:.1f} TFLOP/s, {:.2f} TB/s, host link {:.0f} GB/s\n"
               "    source: {}\n",
               d.name, util::human_bytes(d.memory_bytes), d.flops_fp32 / 1e12, d.flops_bf16 / 1e12,
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
