// Benchmark: time to lower and to simulate one training step, and events per second.
//
//   ./bench/bench_simulate            # seed-gpt2-xl and a synthetic 400-layer llama
//
// Reports the median of repeated runs (after a warm-up) on one core; under each model, the lowering
// stamped (Note [Block stamping] in graph/src/stamp.cpp) against every block lowered, named and
// unnamed (the batch search's probes). Targets (issue 2): the seed
// step simulated in under 2 ms; at least 10 million events per second. Then the seed's batch
// search (the model-guided one, its two simulations on two threads) against doubling then
// bisection over full simulations, after the same analysis.
#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <optional>
#include <vector>

#include "actsim/graph/lower.hpp"
#include "actsim/graph/profile.hpp"
#include "actsim/sim/engine.hpp"
#include "actsim/study/analyze.hpp"
#include "actsim/study/batch_search.hpp"
#include "actsim/study/resolve.hpp"
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
  // Block stamping (Note [Block stamping] in graph/src/stamp.cpp) against lowering every block,
  // and the unnamed lowering the batch search's probes use.
  graph::StepGraph full;
  const double t_full = median_seconds(reps, [&] {
    full = graph::lower_training_step(s.model, s.training, prof, nullptr, {.stamp = false});
  });
  const double t_unnamed = median_seconds(reps, [&] {
    (void)graph::lower_training_step(s.model, s.training, prof, nullptr, {.names = false, .validate = false});
  });
  const double t_unnamed_full = median_seconds(reps, [&] {
    (void)graph::lower_training_step(s.model, s.training, prof, nullptr, {.names = false, .validate = false, .stamp = false});
  });
  sim::StepTables* tables = nullptr;
  const double t_tables = median_seconds(reps, [&] {
    delete tables;
    tables = new sim::StepTables(step.graph, s.device);
  });
  sim::SimResult r;
  const double t_sim = median_seconds(reps, [&] { r = sim::simulate(*tables); });
  delete tables;
  fmt::print("{:<28} ops {:>8}  events {:>9}  lower+autodiff {:8.3f} ms  tables {:7.3f} ms  simulate {:7.3f} ms  "
             "{:6.1f} M events/s  per layer {:6.3f} ms  (peak {} B)\n",
             label, step.graph.n_ops(), r.events, t_lower * 1e3, t_tables * 1e3, t_sim * 1e3,
             static_cast<double>(r.events) / t_sim / 1e6, (t_lower + t_tables + t_sim) * 1e3 / s.model.n_layers,
             r.peak_bytes);
  fmt::print("{:<28} stamped {:8.3f} ms, every block lowered {:8.3f} ms ({:.2f}x); unnamed {:8.3f} ms against {:8.3f} ms ({:.2f}x){}\n",
             "", t_lower * 1e3, t_full * 1e3, t_full / t_lower, t_unnamed * 1e3, t_unnamed_full * 1e3,
             t_unnamed_full / t_unnamed, full.graph.n_ops() == step.graph.n_ops() ? "" : "  (op counts differ!)");
}

// The batch search of `actsim simulate` (Note [Batch search]) against doubling then bisection
// over full simulations (what it replaced), both after the same analysis, in one run.
void bench_search(const char* label, const study::Scenario& s, int reps) {
  const study::Analysis a = study::analyze(s);
  int64_t guided = 0, bisected = 0;
  const double t_analyze = median_seconds(reps, [&] { (void)study::analyze(s); });
  const double t_guided = median_seconds(reps, [&] { guided = study::max_batch_size(a); });
  const double t_bisect = median_seconds(reps, [&] {
    bisected = study::largest_fitting([&](int64_t b) {
      study::Scenario t = s;
      t.training.batch_size = b;
      const std::optional<sim::SimResult> r = study::try_simulate_step(study::resolve(t));
      return r && r->peak_bytes <= t.device.memory_bytes;
    });
  });
  fmt::print("{:<28} analyze {:8.3f} ms  batch search {:8.3f} ms (max batch {})  doubling+bisection {:8.3f} ms "
             "(max batch {})  analyze+search {:.2f}x faster\n",
             label, t_analyze * 1e3, t_guided * 1e3, guided, t_bisect * 1e3, bisected,
             (t_analyze + t_bisect) / (t_analyze + t_guided));
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
  bench_search("seed-gpt2-xl", study::load_scenario(dir + "/seed-gpt2-xl.toml", {}), 7);
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
