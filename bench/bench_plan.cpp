// Benchmark: the optimal checkpointing plan for a 96-layer model.
//
//   ./bench/bench_plan
//
// Reports (median of repeated runs): measuring the chain at op granularity (lowering and simulating
// a three-block copy of the model), the rotor DP itself, and the whole `plan --budget` search
// including the simulations that verify the chosen plan (README, "actsim plan": before and after
// figures). Targets: the DP in under 100 ms (issue 3); the search 10x faster than its 5.5 s
// (issue 9; not reached: four simulations of the 96-layer step remain, each a full lowering; the
// whole command is 6-7x below 7733f52 in CPU time, bench/compare_cpu.py).
#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <vector>

#include "actsim/study/planner.hpp"

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
}  // namespace

int main() {
  const study::Scenario s = study::load_scenario(sim::data_dir() + "/seed-gpt2-xl.toml",
                                             {"model.n_layers=96", "training.batch_size=2"});
  study::Chain chain;
  const double t_chain = median_ms(3, [&] { chain = study::measure_chain(s); });
  int64_t total = 0;
  for (size_t i = 0; i < chain.size(); ++i) total += chain.input_bytes[i] + chain.activation_bytes[i];
  const double t_dp = median_ms(7, [&] { study::RotorDP dp(chain, (total + 191) / 192, 192); });
  study::PlanResult r;
  const double t_plan = median_ms(3, [&] { r = study::plan_for_budget(s, 90LL << 30); });
  fmt::print("96-layer seed (batch 2), budget 90 GiB: chain measured in {:.1f} ms, rotor DP ({} blocks x 192 memory "
             "levels) {:.2f} ms, whole plan search {:.1f} ms ({} plans simulated); fits {}, peak {:.2f} GiB, step "
             "{:.1f} ms vs {:.1f} ms without checkpointing\n",
             t_chain, chain.size(), t_dp, t_plan, r.simulations, r.fits, r.peak_bytes / 1073741824.0,
             r.step_time_ns / 1e6, r.baseline_step_time_ns / 1e6);
  return 0;
}
