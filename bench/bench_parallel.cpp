// Benchmark (issue 13): a 70B-class llama trained on 4,096 GPUs, simulated per rank class.
//
//   ./build/bench/bench_parallel
//
// Llama with 80 layers, d_model 8192, 64 heads, 8 kv heads, d_ff 28672, seq 4096, vocab 128256,
// bf16 with fp32 master weights, AdamW, flash attention, batch 1 per micro-batch, torch-cuda;
// data parallel 64 (ZeRO-1) x tensor parallel 8 (Megatron-LM's layers, sequence parallel) x
// pipeline 8 (1F1B, 64 micro-batches): 4,096 GPUs. Ranks identical by symmetry are simulated once:
// tensor parallelism divides each stage's lowering, not the classes, so the classes are the 8
// stages (each 64 dp x 8 tp ranks), lowered as three kinds (first, middle, last) of 10 layers. Reports
// the median wall time of analyze() (resolve, lower, simulate, replay the schedule) over 5 runs
// after a warm-up; the target is under 1 s.
#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <string>
#include <vector>

#include "actsim/study/analyze.hpp"
#include "actsim/study/pipeline.hpp"
#include "actsim/study/scenario.hpp"
#include "actsim/util/units.hpp"

using namespace actsim;
using Clock = std::chrono::steady_clock;

int main() {
  std::vector<std::string> set = {"model.family=llama", "model.n_layers=80", "model.d_model=8192", "model.n_heads=64",
                                  "model.n_kv_heads=8", "model.d_ff=28672", "model.seq_len=4096",
                                  "model.vocab_size=128256", "model.attention=flash", "training.batch_size=1",
                                  "training.dtype=bf16", "training.optimizer=adamw", "training.master_weights=fp32",
                                  "device.name=H100-SXM-80GB", "parallel.dp=64", "parallel.sharding=zero1",
                                  "parallel.pp=8", "parallel.pp_schedule=1f1b", "parallel.microbatches=64",
                                  "parallel.tp=8", "parallel.sp=true", "runtime.profile=torch-cuda"};
  const study::Scenario s = study::load_scenario("", set);
  std::vector<double> t;
  study::Analysis a = study::analyze(s);  // warm-up
  for (int i = 0; i < 5; ++i) {
    auto t0 = Clock::now();
    a = study::analyze(s);
    t.push_back(std::chrono::duration<double>(Clock::now() - t0).count());
  }
  std::sort(t.begin(), t.end());
  const study::Pipeline& pl = *a.pipeline;
  const graph::ParallelConfig& p = s.training.parallel;
  const int64_t ranks = p.dp * p.tp * p.pp;
  fmt::print("llama 80 layers d 8192 (70B class), dp {} x tp {} (sp) x pp {} ({} GPUs), 1F1B, {} micro-batches\n", p.dp, p.tp,
             p.pp, ranks, p.pp_micro());
  fmt::print("  rank classes simulated: {} (stages, {} ranks each), lowerings: {}\n", pl.result.stages.size(), p.dp * p.tp,
             pl.kinds.size());
  fmt::print("  analyze(): median {:.3f} s over {} runs (min {:.3f}, max {:.3f})\n", t[t.size() / 2], t.size(), t.front(),
             t.back());
  fmt::print("  step {:.1f} ms, bubble {:.1f} ms; worst stage {} peak {}\n", pl.result.step_time_ns / 1e6,
             pl.result.bubble_ns / 1e6, pl.worst, util::human_bytes(pl.result.stages[static_cast<size_t>(pl.worst)].peak_bytes));
  for (size_t st = 0; st < pl.result.stages.size(); ++st) {
    const auto& r = pl.result.stages[st];
    fmt::print("    stage {}: peak {:>12}, {} in flight, busy {:.1f} ms\n", st, util::human_bytes(r.peak_bytes), r.max_in_flight,
               r.busy_ns / 1e6);
  }
  return 0;
}
