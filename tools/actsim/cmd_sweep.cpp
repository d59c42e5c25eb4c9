// actsim sweep [SCENARIO] --vary KEY=V1,V2,... [--vary ...]: the cross product simulated in
// parallel, with the Pareto frontier of peak memory against step time.
#include <fmt/format.h>
#include <unistd.h>

#if defined(__GLIBC__)
#include <malloc.h>
#endif

#include <chrono>
#include <cstdlib>
#include <iostream>
#include <nlohmann/json.hpp>
#include <thread>

#include "actsim/util/error.hpp"
#include "actsim/report/sweep_format.hpp"
#include "actsim/study/sweep.hpp"
#include "actsim/util/output.hpp"
#include "actsim/util/parallel.hpp"
#include "cli.hpp"

namespace actsim::cli {

namespace {

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}


}  // namespace

int cmd_sweep(const std::vector<std::string>& args) {
  po::options_description opts("actsim sweep [SCENARIO] --vary KEY=V1,V2,... [options]");
  opts.add_options()("help,h", "show this help");
  add_scenario_options(opts);
  add_force_option(opts);
  opts.add_options()
      ("vary", po::value<std::vector<std::string>>()->composing(),
       "KEY=V1,V2,...: a scenario key and its values (repeatable; the runs are the cross product). "
       "Values parse like --set; LO..HI is the integers LO to HI; double quotes keep a comma inside a "
       "value: checkpoint.policy=none,\"ops:addmm,bmm\"")
      ("threads", po::value<int64_t>(), "worker threads (default: the hardware's concurrency)")
      ("out", po::value<std::string>(), "FILE.csv or FILE.json: write the results there (atomically) instead of a table")
      ("json", "print the results as JSON instead of a table")
      ("no-progress", "never draw the progress bar (it is drawn on stderr only when stderr is a terminal)");
  po::variables_map vm = parse(args, opts, "sweep");
  if (vm.count("help")) {
    std::cout << opts
              << "\nColumns: the varied keys, peak_bytes, step_time_ns, saved_bytes, fits (peak <= device memory),\n"
                 "pareto (no other run has lower-or-equal peak and step time, one strictly lower).\n\n"
              << scenario_help();
    return 0;
  }
  if (!vm.count("vary")) throw InputError("sweep: --vary KEY=V1,V2,... is required (at least one)");
  int64_t threads = util::hardware_threads();
  if (vm.count("threads")) {
    threads = vm["threads"].as<int64_t>();
    if (threads < 1 || threads > 1024) throw InputError(fmt::format("--threads {}: must be between 1 and 1024", threads));
  }
  std::string out;
  if (vm.count("out")) {
    out = vm["out"].as<std::string>();
    if (!ends_with(out, ".csv") && !ends_with(out, ".json")) {
      throw InputError(fmt::format("--out {}: the file name must end in .csv or .json", out));
    }
  }
  const std::string input = vm.count("scenario") ? vm["scenario"].as<std::string>() : "";
  if (!out.empty()) util::check_output_path("--out", out, {input});  // before hours of work, not after
  std::vector<study::SweepAxis> axes;
  for (const std::string& v : vm["vary"].as<std::vector<std::string>>()) axes.push_back(study::parse_sweep_axis(v));
  const study::Scenario base = scenario_from(vm);
  {
    // Rows that differ only in batch size are mostly scaled from three references (Note [Batch
    // scaling]); every other row is a lowering and a simulation.
    double runs = 1, layers = static_cast<double>(base.model.n_layers), batches = 1;
    for (const study::SweepAxis& ax : axes) {
      runs *= static_cast<double>(ax.values.size());
      if (ax.key == "training.batch_size") batches = static_cast<double>(ax.values.size());
      if (ax.key == "model.n_layers") {
        double sum = 0;
        for (const std::string& v : ax.values) sum += std::max(1.0, std::atof(v.c_str()));
        layers = sum / static_cast<double>(ax.values.size());
      }
    }
    const double full = runs / batches * std::min(batches, 3.0);
    check_long_work(vm, full * layers * kSecondsPerLayer / static_cast<double>(threads),
                    fmt::format("sweep of {:.0f} runs at {:.0f} layers on average", runs, layers));
  }

#if defined(__GLIBC__)
  // Each run lowers a graph of ~10^5 small allocations and frees it again; glibc's default trims
  // and re-faults those pages every time (~15% of a sweep). Keep them mapped instead.
  mallopt(M_TRIM_THRESHOLD, 1 << 30);
  mallopt(M_TOP_PAD, 256 << 20);
  mallopt(M_MMAP_THRESHOLD, 1 << 30);
#endif
  study::SweepOptions so;
  so.threads = static_cast<int>(threads);
  ProgressLine progress("sweep", "runs", /*bar=*/true, !vm.count("no-progress"));
  if (progress.enabled()) so.progress = [&](int64_t done, int64_t total) { progress.update(done, total); };
  study::SweepStats stats;
  const auto t0 = std::chrono::steady_clock::now();
  std::vector<study::SweepRow> rows;
  try {
    rows = study::run_sweep(base, axes, so, &stats);
  } catch (...) {
    progress.clear();
    throw;
  }
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  progress.clear();

  int64_t n_pareto = 0;
  for (const study::SweepRow& r : rows) n_pareto += r.pareto;
  if (!out.empty()) {
    util::OutputSet files;
    files.protect(input);
    files.add("--out", out, ends_with(out, ".csv") ? report::sweep_csv(axes, rows) : report::sweep_json(axes, rows).dump(2) + "\n");
    files.commit();
  }
  if (vm.count("json")) {
    std::cout << report::sweep_json(axes, rows).dump(2) << "\n";
  } else if (out.empty()) {
    std::cout << report::sweep_table(axes, rows);
  } else {
    std::cout << fmt::format("{}: {} runs, {} on the Pareto frontier; {:.2f} s on {} threads ({} analyzed in full, "
                             "{} from batch scaling)\n",
                             out, rows.size(), n_pareto, secs, threads, stats.analyzed, stats.scaled);
  }
  return 0;
}

}  // namespace actsim::cli
