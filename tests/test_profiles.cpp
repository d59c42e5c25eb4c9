// The CUDA delta table: torch-cuda is torch2-cpu plus the named deltas and nothing else, and each
// delta changes exactly the bytes it names (and nothing where it does not apply).
#include <catch2/catch.hpp>
#include <fmt/format.h>

#include <string>
#include <vector>

#include "actsim/graph/profile.hpp"
#include "actsim/study/analyze.hpp"
#include "actsim/study/scenario.hpp"

using namespace actsim;
using graph::CudaDelta;
using graph::ProfileId;
using graph::RuntimeProfile;

namespace {

// Every figure of the JSON contract that a profile can move.
struct Figures {
  int64_t saved, outside, params, grads, optimizer, optimizer_host, buffers, inputs, host;
  std::vector<int64_t> per_layer;
  int64_t start, end_forward, end_backward, end_optimizer, end_step, peak;
  bool operator==(const Figures&) const = default;
};

Figures figures(const study::Analysis& a) {
  const sim::SimResult& r = a.result;
  return {a.saved_bytes, a.outside_saved, a.params_bytes, a.grads_bytes, a.optimizer_bytes, a.optimizer_host_bytes,
          a.buffers_bytes, a.inputs_bytes, r.host_bytes, a.per_layer_saved, r.live_step_start, r.live_end_forward,
          r.live_end_backward, r.live_end_optimizer, r.live_end_step, r.peak_bytes};
}

constexpr int64_t B = 2, T = 16, C = 32, H = 4, L = 2;

study::Scenario tiny(std::vector<std::string> sets) {
  std::vector<std::string> all{"model.vocab_size=97", "model.seq_len=16", "model.d_model=32",
                               "model.n_heads=4", "model.n_layers=2", "training.batch_size=2"};
  all.insert(all.end(), sets.begin(), sets.end());
  return study::load_scenario("", all);
}

// torch2-cpu on an AVX-512 machine (the profile the deltas are stated against).
const RuntimeProfile& base() { return graph::profile(ProfileId::torch2_cpu, graph::CpuIsa::avx512); }

RuntimeProfile with(CudaDelta d) {
  const CudaDelta one[] = {d};
  return graph::profile_with(one);
}

struct Pair {
  Figures cpu, delta;
  study::Analysis a;  // under torch2-cpu
};

Pair run(const study::Scenario& s, CudaDelta d) {
  study::Analysis a = study::analyze(s, base());
  Figures cpu = figures(a);
  return {cpu, figures(study::analyze(s, with(d))), std::move(a)};
}

}  // namespace

TEST_CASE("graph::profile: torch-cuda is torch2-cpu plus every CUDA delta, and nothing else", "[graph][profile]") {
  std::vector<CudaDelta> all;
  for (const graph::DeltaInfo& d : graph::cuda_deltas()) {
    all.push_back(d.id);
    CHECK_FALSE(d.name.empty());
    CHECK_FALSE(d.changes.empty());
    CHECK(d.source.find(".") != std::string_view::npos);  // names a source file
  }
  CHECK(all.size() == 8);
  const RuntimeProfile built = graph::profile_with(all);
  const RuntimeProfile& cuda = graph::profile(ProfileId::torch_cuda);
  CHECK(built.dropout == cuda.dropout);
  CHECK(built.layer_norm_stats_fp32 == cuda.layer_norm_stats_fp32);
  CHECK(built.mean_saves_input == cuda.mean_saves_input);
  CHECK(built.step_scalar_location == cuda.step_scalar_location);
  CHECK(built.default_impl == cuda.default_impl);
  CHECK(built.foreach_adam_two_lists == cuda.foreach_adam_two_lists);
  CHECK(built.has_sdpa == cuda.has_sdpa);
  CHECK(built.has_fused_optimizers == cuda.has_fused_optimizers);
  CHECK(built.bernoulli_int_temp == cuda.bernoulli_int_temp);
  CHECK(built.scalar_location == cuda.scalar_location);
  CHECK(built.onednn_bf16_matmul == cuda.onednn_bf16_matmul);
  CHECK(built.alloc_granularity == cuda.alloc_granularity);
  // The very same rule table: no rule of its own.
  CHECK(built.rules.data() == cuda.rules.data());
  CHECK(base().rules.data() == cuda.rules.data());
  // And the whole profile gives the same figures as torch-cuda itself.
  for (const char* fam : {"model.family=gpt2", "model.family=llama"}) {
    const study::Scenario s = tiny({fam, "training.dtype=bf16", "model.dropout=0"});
    CHECK(figures(study::analyze(s, built)) == figures(study::analyze(s)));
  }
}

TEST_CASE("study::analyze: dropout_bool_mask swaps each dropout's noise for a bool mask", "[sim][profile]") {
  Pair p = run(tiny({"model.family=gpt2", "model.dropout=0.1"}), CudaDelta::dropout_bool_mask);
  // Per block: attention probabilities (B, h, T, T), the attention output and the MLP output
  // (B, T, C); outside: the embedding dropout. Each keeps 1 B/element instead of 4.
  const int64_t per_layer = (B * H * T * T + 2 * B * T * C) * (4 - 1);
  for (size_t i = 0; i < L; ++i) CHECK(p.cpu.per_layer[i] - p.delta.per_layer[i] == per_layer);
  CHECK(p.cpu.outside - p.delta.outside == B * T * C * 3);
  CHECK(p.cpu.saved - p.delta.saved == L * per_layer + B * T * C * 3);
  CHECK(p.cpu.params == p.delta.params);
  CHECK(p.cpu.optimizer == p.delta.optimizer);
  CHECK(p.cpu.start == p.delta.start);
  // Without dropout it does not apply: identical figures.
  Pair q = run(tiny({"model.family=gpt2"}), CudaDelta::dropout_bool_mask);
  CHECK(q.cpu == q.delta);
}

TEST_CASE("study::analyze: layer_norm_stats_fp32 widens only 16-bit LayerNorm statistics", "[sim][profile]") {
  Pair p = run(tiny({"model.family=gpt2", "training.dtype=bf16"}), CudaDelta::layer_norm_stats_fp32);
  // mean and rstd, (B, T, 1) each, 2 -> 4 bytes: two LayerNorms per block, ln_f outside.
  for (size_t i = 0; i < L; ++i) CHECK(p.delta.per_layer[i] - p.cpu.per_layer[i] == 2 * 2 * B * T * 2);
  CHECK(p.delta.outside - p.cpu.outside == 2 * B * T * 2);
  CHECK(p.cpu.params == p.delta.params);
  CHECK(p.cpu.start == p.delta.start);
  // fp32 statistics are fp32 already; llama has no LayerNorm (RMSNorm is elementary ops).
  Pair q = run(tiny({"model.family=gpt2", "training.dtype=fp32"}), CudaDelta::layer_norm_stats_fp32);
  CHECK(q.cpu == q.delta);
  Pair r = run(tiny({"model.family=llama", "training.dtype=bf16"}), CudaDelta::layer_norm_stats_fp32);
  CHECK(r.cpu == r.delta);
}

TEST_CASE("study::analyze: host_scalars moves wrapped Python numbers off the device", "[sim][profile]") {
  for (const char* fam : {"model.family=gpt2", "model.family=llama"}) {
    INFO(fam);
    Pair p = run(tiny({fam}), CudaDelta::host_scalars);
    // `att * (1/sqrt(hd))` (gpt2) and `scores / sqrt(hd)` (llama): one saved 0-dim float64 per block.
    for (size_t i = 0; i < L; ++i) CHECK(p.cpu.per_layer[i] - p.delta.per_layer[i] == 8);
    CHECK(p.cpu.outside == p.delta.outside);
    CHECK(p.delta.host >= L * 8);
    CHECK(p.cpu.host == 0);
    CHECK(p.cpu.params == p.delta.params);
    CHECK(p.cpu.optimizer == p.delta.optimizer);
    CHECK(p.cpu.start == p.delta.start);
    CHECK(p.delta.peak < p.cpu.peak);  // the transient casts leave the device too
  }
}

TEST_CASE("study::analyze: host_step moves Adam's step tensors to the host", "[sim][profile]") {
  Pair p = run(tiny({"model.family=llama", "training.optimizer=adamw"}), CudaDelta::host_step);
  const int64_t n_tensors = (p.cpu.optimizer - p.cpu.optimizer_host - 2 * p.cpu.params) / 4;  // one 4-B step each
  REQUIRE(n_tensors > 0);
  CHECK(p.cpu.optimizer - p.delta.optimizer == 4 * n_tensors);
  CHECK(p.delta.optimizer_host - p.cpu.optimizer_host == 4 * n_tensors);
  CHECK(p.cpu.start - p.delta.start == 4 * n_tensors);
  CHECK(p.cpu.saved == p.delta.saved);
  for (const char* other : {"training.optimizer=sgd_momentum", "training.optimizer_impl=fused"}) {
    INFO(other);  // no step tensor, or a fused step kept on the device
    Pair q = run(tiny({"model.family=llama", other}), CudaDelta::host_step);
    CHECK(q.cpu == q.delta);
  }
}

TEST_CASE("study::analyze: foreach_default changes only the default optimizer implementation", "[sim][profile]") {
  Pair p = run(tiny({"model.family=gpt2"}), CudaDelta::foreach_default);  // torch.optim's default
  CHECK(p.cpu.saved == p.delta.saved);
  CHECK(p.cpu.start == p.delta.start);
  CHECK(p.cpu.end_backward == p.delta.end_backward);
  CHECK(p.delta.peak > p.cpu.peak);  // the foreach lists of temporaries
  Pair q = run(tiny({"model.family=gpt2", "training.optimizer_impl=for_loop"}), CudaDelta::foreach_default);
  CHECK(q.cpu == q.delta);
}

TEST_CASE("study::analyze: no_onednn removes only 16-bit matmul scratchpads", "[sim][profile]") {
  Pair p = run(tiny({"model.family=gpt2", "training.dtype=bf16", "model.seq_len=16"}), CudaDelta::no_onednn);
  CHECK(p.cpu.saved == p.delta.saved);
  CHECK(p.cpu.start == p.delta.start);
  CHECK(p.cpu.end_forward == p.delta.end_forward);
  CHECK(p.delta.peak < p.cpu.peak);
  Pair q = run(tiny({"model.family=gpt2"}), CudaDelta::no_onednn);
  CHECK(q.cpu == q.delta);
}

TEST_CASE("study::analyze: block_512 rounds what the allocator counts, never what a tensor holds", "[sim][profile]") {
  Pair p = run(tiny({"model.family=llama"}), CudaDelta::block_512);
  CHECK(p.cpu.saved == p.delta.saved);
  CHECK(p.cpu.per_layer == p.delta.per_layer);
  CHECK(p.cpu.params == p.delta.params);
  CHECK(p.cpu.optimizer == p.delta.optimizer);
  // Live at step start: every storage that exists before the step, each in 512 B blocks.
  int64_t rounded = 0;
  for (const graph::Storage& st : p.a.step->graph.storages()) {
    if (st.producer == graph::kNoOp && st.location == graph::Location::device) rounded += (st.bytes + 511) / 512 * 512;
  }
  CHECK(p.delta.start == rounded);
  CHECK(p.delta.start > p.cpu.start);
  for (int64_t x : {p.delta.end_forward, p.delta.end_backward, p.delta.end_optimizer, p.delta.end_step, p.delta.peak}) {
    CHECK(x % 512 == 0);
  }
  CHECK(p.delta.peak >= p.cpu.peak);
}

TEST_CASE("study::analyze: host_rng_state moves checkpoint's RNG stashes to the host", "[sim][profile]") {
  Pair p = run(tiny({"model.family=gpt2", "checkpoint.policy=full"}), CudaDelta::host_rng_state);
  // One stash per checkpoint call (each block) through the forward pass.
  CHECK(p.cpu.end_forward - p.delta.end_forward == L * graph::kCpuRngStateBytes);
  CHECK(p.delta.host - p.cpu.host >= graph::kCpuRngStateBytes);
  CHECK(p.cpu.saved == p.delta.saved);  // a stash is no saved tensor
  CHECK(p.cpu.start == p.delta.start);
  CHECK(p.cpu.end_step == p.delta.end_step);
  Pair q = run(tiny({"model.family=gpt2"}), CudaDelta::host_rng_state);  // no checkpointing
  CHECK(q.cpu == q.delta);
}
