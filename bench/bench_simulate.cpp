// Benchmark: time to lower and to simulate one training step, and events per second.
//
//   ./bench/bench_simulate            # seed-gpt2-xl, a synthetic 400-layer llama, hf Llama-3.1-8B
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
             "{:6.1f} M events/s  per layer {:6.3f} ms  (peak {} B)\n",
             label, step.graph.n_ops(), r.events, t_lower * 1e3, t_plan * 1e3, t_sim * 1e3,
             static_cast<double>(r.events) / t_sim / 1e6, (t_lower + t_plan + t_sim) * 1e3 / s.model.n_layers,
             r.peak_bytes);
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
  // Issue 11: a Hugging Face config as transformers runs it (DynamicCache, fp32 RMSNorm, rotate_half,
  // the upcast loss): Llama-3.1-8B's 32 layers against the seed's time per layer; and the import.
  const std::string hf = dir + "/hf/llama-3.1-8b.toml";
  bench("hf llama-3.1-8b (32 layers)", study::load_scenario(hf, {}), 11);
  const double t_import = median_seconds(21, [&] { (void)study::load_scenario(hf, {}); });
  const double t_plain = median_seconds(21, [&] { (void)study::load_scenario(dir + "/llama-3-8b.toml", {}); });
  fmt::print("{:<28} load with model.hf_config {:.3f} ms, a TOML scenario {:.3f} ms\n", "hf import", t_import * 1e3,
             t_plain * 1e3);
  return 0;
}
