// actsim plan [SCENARIO] --budget 60GiB: the fastest checkpointing plan whose peak fits.
#include <fmt/format.h>
#include <unistd.h>

#if defined(__GLIBC__)
#include <malloc.h>
#endif

#include <chrono>
#include <iostream>
#include <nlohmann/json.hpp>

#include "actsim/util/error.hpp"
#include "actsim/report/export.hpp"
#include "actsim/study/planner.hpp"
#include "actsim/util/units.hpp"
#include "actsim/report/summary.hpp"
#include "actsim/util/output.hpp"
#include "cli.hpp"

namespace actsim::cli {

namespace {

// Per block: how its forward keeps activations, and how often it is recomputed.
nlohmann::json blocks_json(const graph::BlockPlan& p) {
  nlohmann::json out = nlohmann::json::array();
  std::vector<int> recomputed(p.mode.size(), 0);
  for (const auto& list : p.before_backward) {
    for (const auto& rc : list) ++recomputed[static_cast<size_t>(rc.block)];
  }
  for (size_t i = 0; i < p.mode.size(); ++i) {
    const bool rec = p.mode[i] == graph::BlockMode::recompute;
    int times = rec ? (p.before_backward.empty() ? 1 : recomputed[i]) : 0;
    std::vector<std::string> recomputed_what;
    if (rec) recomputed_what.push_back("block");
    if (p.mode[i] == graph::BlockMode::selective) recomputed_what.push_back("attention core");
    if (p.mode[i] == graph::BlockMode::mlp) recomputed_what.push_back("MLP sublayer");
    out.push_back({{"block", i},
                   {"mode", graph::to_string(p.mode[i])},
                   {"kept", rec ? "input (checkpoint)" : p.mode[i] == graph::BlockMode::offload ? "nothing on device" : "activations"},
                   {"recomputed", recomputed_what},
                   {"recompute_count", times},
                   {"offloaded", p.mode[i] == graph::BlockMode::offload}});
  }
  return out;
}


}  // namespace

int cmd_plan(const std::vector<std::string>& args) {
  po::options_description opts("actsim plan [SCENARIO] --budget SIZE [options]");
  opts.add_options()("help,h", "show this help");
  add_scenario_options(opts);
  opts.add_options()
      ("budget", po::value<std::string>(), "memory budget: 60GiB, 60GB or bytes (default: the device's memory)")
      ("offload", "also consider offloading blocks to host memory (the answer is simulated and never slower, "
                  "but a larger budget is then not guaranteed to give a plan at least as fast)")
      ("timings", "add the planner's own wall-clock time (planner.dp_ns) to the JSON")
      ("no-selective", "plan keep/recompute only (no selective attention-core recompute inside blocks)")
      ("json", "print one JSON object (fits, budget_bytes, peak, step_time_ns, baseline_step_time_ns, "
               "min_peak_bytes, blocks)");
  add_export_options(opts);
  add_force_option(opts);
  po::variables_map vm = parse(args, opts, "plan");
  if (vm.count("help")) {
    std::cout << opts << "\nThe plan recomputes blocks in rotor/Revolve-style nested segments; see README.md.\n";
    return 0;
  }
  util::OutputSet files;
  if (vm.count("scenario")) files.protect(vm["scenario"].as<std::string>());
  for (const char* k : {"trace", "memviz", "csv", "report", "svg"}) {
    if (vm.count(k)) util::check_output_path(std::string("--") + k, vm[k].as<std::string>(),
                                            {vm.count("scenario") ? vm["scenario"].as<std::string>() : ""});
  }
  study::Scenario s = scenario_from(vm);
  int64_t budget = s.device.memory_bytes;
  if (vm.count("budget")) {
    const std::string b = vm["budget"].as<std::string>();
    if (!study::parse_size(b, budget) || budget <= 0) {
      throw InputError(fmt::format("--budget {}: not a size (60GiB, 60GB and 64424509440 are sizes)", b));
    }
  }
  {
    // About 8 lowerings and simulations of the step (the baseline, least-memory, full and
    // most-memory plans, a few probes of the budget search), with recomputations, and a DP
    // quadratic in the layers.
    const double L = static_cast<double>(s.model.n_layers);
    check_long_work(vm, 8 * 1.5 * L * kSecondsPerLayer + (L + 1) * (L + 1) * 193 * 4e-9,
                    fmt::format("plan at {} layers", s.model.n_layers));
  }
#if defined(__GLIBC__)
  // Each verification lowers a graph of ~10^5 small allocations and frees it again: keep the
  // pages mapped instead of trimming and re-faulting them (as sweep does).
  mallopt(M_TRIM_THRESHOLD, 1 << 30);
  mallopt(M_TOP_PAD, 256 << 20);
  mallopt(M_MMAP_THRESHOLD, 1 << 30);
#endif
  study::PlanOptions po{.selective = vm.count("no-selective") == 0, .offload = vm.count("offload") > 0};
  ProgressLine progress("plan", "simulations");
  if (progress.enabled()) po.progress = [&](int64_t done, int64_t estimate) { progress.update(done, estimate); };
  study::PlanResult r;
  try {
    r = study::plan_for_budget(s, budget, po);
  } catch (...) {
    progress.clear();
    throw;
  }
  progress.clear();
  // The search simulated the answer already (usually): its analysis is the one to report.
  std::shared_ptr<const study::Analysis> kept = r.analysis;
  if (!kept) {
    study::Scenario chosen = s;
    chosen.checkpoint = r.plan;
    kept = std::make_shared<const study::Analysis>(study::analyze(chosen));
  }
  r.analysis.reset();
  const study::Analysis& a = *kept;
  add_exports_from(a, vm, files);
  files.commit();
  nlohmann::json j = report::to_json(a);
  j["fits"] = r.fits;
  j["budget_bytes"] = budget;
  j["step_time_ns"] = r.step_time_ns;
  j["baseline_step_time_ns"] = r.baseline_step_time_ns;
  j["baseline_peak_bytes"] = r.baseline_peak_bytes;
  j["min_peak_bytes"] = r.min_peak_bytes;
  j["blocks"] = blocks_json(r.plan);
  // The planner's own wall-clock time only on request: the JSON is otherwise the same on every run.
  j["planner"] = {{"simulations", r.simulations}};
  if (vm.count("timings")) j["planner"]["dp_ns"] = r.dp_ns;
  if (vm.count("timeline")) j["timeline"] = report::timeline_json(a);
  keep_until_exit(std::move(kept));  // Note [Teardown at exit]: `a` is not read past here
  if (vm.count("json")) {
    std::cout << j.dump(2) << "\n";
    return 0;
  }
  fmt::print("actsim plan: {} under a budget of {}\n\n", s.name, util::human_bytes(budget));
  if (!r.fits) {
    fmt::print("  nothing fits: the least memory any plan reaches is {} ({} over the budget),\n"
               "  with {} ({} step).\n",
               util::human_bytes(r.min_peak_bytes), util::human_bytes(r.min_peak_bytes - budget), r.plan.describe(),
               fmt::format("{:.3f} ms", r.step_time_ns / 1e6));
    return 0;
  }
  fmt::print("  plan: {}\n", r.plan.describe());
  fmt::print("  peak {} (no checkpointing: {}), step {:.3f} ms (no checkpointing: {:.3f} ms, +{:.1f}%)\n",
             util::human_bytes(r.peak_bytes), util::human_bytes(r.baseline_peak_bytes), r.step_time_ns / 1e6,
             r.baseline_step_time_ns / 1e6,
             100.0 * static_cast<double>(r.step_time_ns - r.baseline_step_time_ns) / static_cast<double>(r.baseline_step_time_ns));
  fmt::print("  least memory any plan reaches: {}\n\n  block  forward keeps          recomputed\n", util::human_bytes(r.min_peak_bytes));
  for (const auto& b : j["blocks"]) {
    fmt::print("  {:>5}  {:<22} {}\n", b["block"].get<int>(), b["kept"].get<std::string>(),
               b["recompute_count"].get<int>() ? fmt::format("{}x", b["recompute_count"].get<int>()) : "-");
  }
  fmt::print("\n  (DP {:.2f} ms, {} plans simulated)\n", r.dp_ns / 1e6, r.simulations);
  return 0;
}

}  // namespace actsim::cli
