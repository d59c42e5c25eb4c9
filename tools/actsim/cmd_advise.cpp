// actsim advise [SCENARIO] [--budget SIZE] [--allow lora] [--json]: the fastest way to train the
// scenario's model on its device, ranked by simulated tokens/s (study/advise.hpp).
#include <fmt/format.h>

#if defined(__GLIBC__)
#include <malloc.h>
#endif

#include <iostream>
#include <nlohmann/json.hpp>

#include "actsim/report/advise_format.hpp"
#include "actsim/study/advise.hpp"
#include "actsim/sim/device.hpp"
#include "actsim/util/error.hpp"
#include "actsim/util/parallel.hpp"
#include "actsim/util/text.hpp"
#include "cli.hpp"

namespace actsim::cli {

namespace {

constexpr const char* kAdviseHelp = R"(
What is searched (each axis only when this build has its scenario key; `actsim keys` lists them):
  training.trainable   the scenario's own, and lora (its lora.* keys or their defaults), with --allow lora
  training.autocast    none, bf16, fp16 (values the profile rules out are dropped)
  model.attention      eager, flash (flash needs PyTorch 2.x: torch-cuda or torch2-cpu)
  micro-batch          training.batch_size = b and training.grad_accum_steps = G / b for every
                       divisor b of the global batch G = batch_size x grad_accum_steps
                       (without training.grad_accum_steps: the scenario's batch size only)
  checkpoint.policy    none, or the planner's plan for the budget (budget:SIZE) where none does
                       not fit
A candidate fits when its simulated peak is at most the budget. Fitting candidates are ranked by
tokens/s = global batch x seq_len / simulated step time (all micro-batches, recomputation and the
optimizer step included); the top 10 are printed with the --set options that reproduce each one
in `actsim simulate`. When nothing fits, one line says so with the least peak found (exit code 0,
"fits": false in the JSON). README, "Advisor", documents the JSON.
)";

}  // namespace

int cmd_advise(const std::vector<std::string>& args) {
  po::options_description opts("actsim advise [SCENARIO] [options]");
  opts.add_options()("help,h", "show this help");
  add_scenario_options(opts);
  opts.add_options()
      ("budget", po::value<std::string>(), "memory budget: 80GiB, 80GB or bytes (default: the device's memory)")
      ("allow", po::value<std::vector<std::string>>()->composing(),
       "LIST: also search changes to what is trained; one value: lora (training.trainable=lora)")
      ("threads", po::value<int64_t>(), "worker threads (default: the hardware's concurrency)")
      ("json", "print one JSON object (README, \"Advisor\": scenario, device, budget_bytes, global_batch, seq_len, "
               "fits, searched, search, as_given, ranked, least_peak)");
  add_force_option(opts);
  po::variables_map vm = parse(args, opts, "advise");
  if (vm.count("help")) {
    std::cout << opts << kAdviseHelp;
    return 0;
  }
  study::AdviseOptions ao;
  if (vm.count("allow")) {
    for (const std::string& list : vm["allow"].as<std::vector<std::string>>()) {
      for (const std::string& v : util::split_list(list)) {
        if (v == "lora") {
          ao.allow_lora = true;
          continue;
        }
        const std::string hint = sim::closest(v, {"lora"});
        throw InputError(fmt::format("--allow {}: unknown value \"{}\"{} (one of: lora)", list, v,
                                     hint.empty() ? "" : "; did you mean \"lora\"?"));
      }
    }
  }
  if (vm.count("threads")) {
    const int64_t t = vm["threads"].as<int64_t>();
    if (t < 1 || t > 1024) throw InputError(fmt::format("--threads {}: must be between 1 and 1024", t));
    ao.threads = static_cast<int>(t);
  }
  if (vm.count("budget")) {
    const std::string b = vm["budget"].as<std::string>();
    if (!study::parse_size(b, ao.budget_bytes) || ao.budget_bytes <= 0) {
      throw InputError(fmt::format("--budget {}: not a size (80GiB, 80GB and 85899345920 are sizes)", b));
    }
  }
  const study::Scenario s = scenario_from(vm);
  {
    // About one simulation per candidate (2 attentions x 3 autocasts x the divisors of the global
    // batch, twice with LoRA), a planner search (~8) for a few of them.
    const int64_t g = study::global_batch(s);
    const double points = 6.0 * static_cast<double>(study::divisors(g).size()) * (ao.allow_lora ? 2 : 1);
    const double threads = ao.threads > 0 ? ao.threads : util::hardware_threads();
    check_long_work(vm, points * 2 * static_cast<double>(s.model.n_layers) * kSecondsPerLayer / threads,
                    fmt::format("advise over {} candidates at {} layers", points, s.model.n_layers));
  }
#if defined(__GLIBC__)
  // Each simulation lowers a graph of ~10^5 small allocations and frees it again (as sweep does).
  mallopt(M_TRIM_THRESHOLD, 1 << 30);
  mallopt(M_TOP_PAD, 256 << 20);
  mallopt(M_MMAP_THRESHOLD, 1 << 30);
#endif
  ProgressLine progress("advise", "simulations");
  if (progress.enabled()) ao.progress = [&](int64_t done, int64_t estimate) { progress.update(done, estimate); };
  study::AdviseResult r;
  try {
    r = study::advise(s, ao);
  } catch (...) {
    progress.clear();
    throw;
  }
  progress.clear();
  if (vm.count("json")) {
    std::cout << report::advise_json(s, r).dump(2) << "\n";
    return 0;
  }
  std::string command = "actsim simulate";
  if (!s.file.empty()) command += " " + s.file;
  if (vm.count("set")) {
    for (const std::string& o : vm["set"].as<std::vector<std::string>>()) command += " --set " + o;
  }
  std::cout << report::advise_table(s, r, command);
  return 0;
}

}  // namespace actsim::cli
