// Benchmark: `actsim advise` on the seed model (issue 12: under 2 s on this machine).
//
//   ./bench/bench_advise [THREADS]
//
// Reports (median of 5 runs) the whole advise search of scenarios/seed-gpt2-xl.toml at the
// device's memory (every candidate fits: one simulation each), and at batch 8 (nothing fits
// without a plan: the planner runs) at the device's memory and under 60 GiB, and, once the key
// exists, at batch 4 with 2 accumulation steps (the micro-batch axis), with the counts of the search. THREADS defaults to the hardware's concurrency, as the command's.
#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <string>
#include <vector>

#include "actsim/study/advise.hpp"
#include "actsim/util/parallel.hpp"

using namespace actsim;
using Clock = std::chrono::steady_clock;

namespace {

template <typename F>
double median_ms(int reps, F&& f) {
  std::vector<double> t;
  for (int i = 0; i < reps; ++i) {
    auto a = Clock::now();
    f();
    t.push_back(std::chrono::duration<double, std::milli>(Clock::now() - a).count());
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

void run(const char* what, const std::vector<std::string>& sets, int64_t budget, int threads) {
  const study::Scenario s = study::load_scenario(sim::data_dir() + "/seed-gpt2-xl.toml", sets);
  study::AdviseResult r;
  const double ms = median_ms(5, [&] { r = study::advise(s, {.budget_bytes = budget, .threads = threads}); });
  fmt::print("seed-gpt2-xl, {}: advise {:.0f} ms on {} threads ({} candidates, {} fit, {} simulations, {} planner "
             "searches, {} skipped); fastest {:.1f} tokens/s{}\n",
             what, ms, threads, r.candidates, r.fitting, r.simulations, r.plans, r.pruned,
             r.ranked.empty() ? 0.0 : r.ranked[0].tokens_per_second,
             r.ranked.empty() ? "" : fmt::format(" ({})", fmt::join(r.ranked[0].changes, " ")));
}

}  // namespace

int main(int argc, char** argv) {
  const int threads = argc > 1 ? std::max(1, std::atoi(argv[1])) : util::hardware_threads();
  run("device memory", {}, 0, threads);
  run("batch 8, device memory", {"training.batch_size=8"}, 0, threads);
  run("batch 8, budget 60 GiB", {"training.batch_size=8"}, 60LL << 30, threads);
  // Once training.grad_accum_steps exists: the micro-batch axis (1x8, 2x4, 4x2, 8x1).
  const auto& keys = study::scenario_keys();
  if (std::find(keys.begin(), keys.end(), "training.grad_accum_steps") != keys.end()) {
    run("batch 4 x 2 micro-batches", {"training.batch_size=4", "training.grad_accum_steps=2"}, 0, threads);
  }
  return 0;
}
