// Benchmark: time to lower and to simulate one training step, and events per second.
//
//   ./bench/bench_simulate            # seed-gpt2-xl and a synthetic 400-layer llama
//
// Reports the median of repeated runs (after a warm-up) on one core. Targets (issue 2): the seed
// step simulated in under 2 ms; at least 10 million events per second.
#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <vector>

#include "actsim/graph/lower.hpp"
#include "actsim/graph/profile.hpp"
#include "actsim/sim/engine.hpp"
#include "actsim/study/scenario.hpp"

using namespace actsim;
using Clock = std::chrono::steady_clock;

namespace {

template <typename F>
double median_seconds(int reps, F&& f) {
  std::vector<double> t;
  f();  // warm-up
  for (int i = 0; i < reps; ++i) {
    auto a = Clock::now();
    f();
    t.push_back(std::chrono::duration<double>(Clock::now() - a).count());
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

void bench(const char* label, const study::Scenario& s, int reps) {
  const auto& prof = graph::profile(s.profile);
  graph::StepGraph step;
  const double t_lower =
      median_seconds(reps, [&] { step = graph::lower_training_step(s.model, s.training, prof); });
  sim::Plan* plan = nullptr;
  const double t_plan = median_seconds(reps, [&] {
    delete plan;
    plan = new sim::Plan(step.graph, s.device);
  });
  sim::SimResult r;
  const double t_sim = median_seconds(reps, [&] { r = sim::simulate(*plan); });
  delete plan;
  fmt::print("{:<28} ops {:>8}  events {:>9}  lower+autodiff {:8.3f} ms  plan {:7.3f} ms  simulate {:7.3f} ms  "
             "{:6.1f} M events/s  (peak {} B)\n",
             label, step.graph.n_ops(), r.events, t_lower * 1e3, t_plan * 1e3, t_sim * 1e3,
             static_cast<double>(r.events) / t_sim / 1e6, r.peak_bytes);
}

}  // namespace

int main() {
  const std::string dir = sim::data_dir();
  bench("seed-gpt2-xl", study::load_scenario(dir + "/seed-gpt2-xl.toml", {}), 21);
  bench("seed-gpt2-xl (torch-cpu)", study::load_scenario(dir + "/seed-gpt2-xl.toml", {"runtime.profile=torch-cpu"}), 21);
  bench("synthetic llama, 400 layers",
        study::load_scenario("", {"model.family=llama", "model.n_layers=400", "model.d_model=1024", "model.n_heads=16",
                                "model.seq_len=2048", "model.vocab_size=32000", "training.batch_size=4",
                                "training.dtype=bf16"}),
        7);
  return 0;
}
