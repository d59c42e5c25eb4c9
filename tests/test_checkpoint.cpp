// Tests of checkpointing (issue 3) against published results: Megatron-LM's per-layer activation
// formula and what its selective and full recompute leave (Korthikanti et al. 2022), Chen et al.
// 2016's sqrt(L) segments; every policy against `none`; bad policies; and sweeps (sim/sweep),
// whose batch-scaling rows must equal study::analyze to the byte and nanosecond.
#include <catch2/catch.hpp>
#include <fmt/format.h>
#include <fmt/ranges.h>

#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <queue>
#include <set>
#include <string>
#include <vector>

#include "actsim/graph/checkpoint.hpp"
#include "actsim/graph/cuts.hpp"
#include "actsim/graph/lower.hpp"
#include "actsim/util/error.hpp"
#include "actsim/study/analyze.hpp"
#include "actsim/study/scenario.hpp"
#include "actsim/study/sweep.hpp"

using namespace actsim;

namespace {

study::Analysis run(const std::vector<std::string>& sets) { return study::analyze(study::load_scenario("", sets)); }

// Megatron-LM's setting: gpt2 (LayerNorm, fused QKV, GELU, dropout after softmax, attention
// projection and MLP), 16-bit activations, dropout > 0 with 1-byte masks (torch-cuda's bool
// masks), eager attention.
std::vector<std::string> megatron(int64_t s, int64_t h, int64_t a, int64_t b, const std::string& policy) {
  return {"model.family=gpt2", "runtime.profile=torch-cuda", "training.dtype=fp16", "model.dropout=0.1",
          "model.attention=eager", "model.vocab_size=512", "model.n_layers=3",
          "model.seq_len=" + std::to_string(s), "model.d_model=" + std::to_string(h),
          "model.n_heads=" + std::to_string(a), "training.batch_size=" + std::to_string(b),
          "checkpoint.policy=" + policy};
}

// The most activation and temporary device bytes live at once during the step.
int64_t most_activation_bytes(const study::Analysis& a) {
  struct Watch : sim::Observer {
    const graph::Graph& g;
    int64_t live = 0, most = 0;
    explicit Watch(const graph::Graph& graph) : g(graph) {}
    void add(int64_t b) { live += b, most = std::max(most, live); }
    bool counts(graph::StorageId s) const {
      const graph::Storage& st = g.storage(s);
      return st.location == graph::Location::device &&
             (st.category == graph::Category::activation || st.category == graph::Category::temporary);
    }
    void on_alloc(graph::StorageId s, graph::OpId, int64_t, int64_t) override {
      if (counts(s)) add(g.storage(s).bytes);
    }
    void on_free(graph::StorageId s, graph::OpId, int64_t, int64_t) override {
      if (counts(s)) live -= g.storage(s).bytes;
    }
    void on_workspace(graph::OpId, int64_t bytes, int64_t, int64_t) override { add(bytes); }
  } w(a.step->graph);
  sim::Observer* obs[] = {&w};
  (void)sim::simulate(*a.tables, obs);
  return w.most;
}

struct Size {
  int64_t s, h, a, b;
};
const Size kMegatronSizes[] = {{128, 256, 4, 2}, {256, 512, 8, 3}, {64, 192, 3, 1}};

}  // namespace

TEST_CASE("checkpoint: Megatron-LM's sbh(34 + 5as/h) per layer, with the reference's extras listed", "[checkpoint]") {
  for (const Size& z : kMegatronSizes) {
    const auto [s, h, a, b] = z;
    INFO("s=" << s << " h=" << h << " a=" << a << " b=" << b);
    const study::Analysis an = run(megatron(s, h, a, b, "none"));
    // Korthikanti et al. 2022, eq. (1): 34 sbh of d-wide tensors (inputs of the LayerNorms, QKV,
    // projections and MLP, GELU input, dropout masks) and 5as^2b of attention core (QK^T scores
    // fed to softmax, softmax output, its dropout mask and output).
    const int64_t megatron_terms = s * b * h * 34 + 5 * a * s * s * b;
    // The reference implementation's extras, exactly:
    const int64_t layer_norm_stats = 2 * (2 * s * b * 4);  // two LayerNorms, fp32 mean and rstd (s*b each)
    const int64_t causal_mask = s * s;                      // the per-layer bool mask `bias == 0` (1 byte)
    REQUIRE(layer_norm_stats == 16 * s * b);
    for (int64_t kept : an.per_layer_saved) CHECK(kept == megatron_terms + layer_norm_stats + causal_mask);
  }
}

TEST_CASE("checkpoint: selective removes exactly the attention core (5as^2b) and the causal mask", "[checkpoint]") {
  for (const Size& z : kMegatronSizes) {
    const auto [s, h, a, b] = z;
    INFO("s=" << s << " h=" << h << " a=" << a << " b=" << b);
    const study::Analysis none = run(megatron(s, h, a, b, "none"));
    const study::Analysis sel = run(megatron(s, h, a, b, "selective"));
    REQUIRE(sel.per_layer_saved.size() == none.per_layer_saved.size());
    // The mask is recomputed with the core; the contiguous copies of q, k, v (6sbh) the core reads
    // are swapped for the c_attn output they are made from (6sbh): no change in bytes.
    for (size_t i = 0; i < none.per_layer_saved.size(); ++i) {
      CHECK(none.per_layer_saved[i] - sel.per_layer_saved[i] == 5 * a * s * s * b + s * s);
    }
    CHECK(sel.outside_saved == none.outside_saved);
    CHECK(sel.result.peak_bytes <= none.result.peak_bytes);
  }
}

TEST_CASE("checkpoint: full keeps exactly each block's input, 2sbh per layer", "[checkpoint]") {
  for (const Size& z : kMegatronSizes) {
    const auto [s, h, a, b] = z;
    INFO("s=" << s << " h=" << h << " a=" << a << " b=" << b);
    const study::Analysis none = run(megatron(s, h, a, b, "none"));
    const study::Analysis full = run(megatron(s, h, a, b, "full"));
    for (int64_t kept : full.per_layer_saved) CHECK(kept == 2 * s * b * h);
    CHECK(full.outside_saved == none.outside_saved);
    CHECK(full.result.step_time_ns > none.result.step_time_ns);
  }
}

TEST_CASE("checkpoint: Chen et al.'s sqrt(L) segments keep ~2 sqrt(L) blocks for one extra forward", "[checkpoint]") {
  constexpr int64_t L = 100;
  const std::vector<std::string> chain{"model.family=llama", "model.n_layers=100", "model.d_model=64",
                                       "model.n_heads=4", "model.vocab_size=64", "model.seq_len=32",
                                       "training.batch_size=8", "training.optimizer=sgd"};
  auto with = [&](const std::string& policy) {
    std::vector<std::string> s = chain;
    s.push_back("checkpoint.policy=" + policy);
    return run(s);
  };
  const study::Analysis none = with("none");
  const study::Analysis sq = with("sqrt");
  const int64_t block = none.per_layer_saved[0];  // one block's activations under `none`
  for (int64_t kept : none.per_layer_saved) REQUIRE(kept == block);

  // Kept activations: what the blocks keep through the forward pass (the segment inputs), plus the
  // largest segment's recomputed activations, alive together while backward walks that segment.
  const graph::Graph& g = sq.step->graph;
  const graph::BlockPlan& bp = sq.block_plan;
  std::map<int32_t, int64_t> recomputed;          // segment -> bytes its recompute ops produce and backward reads
  std::vector<bool> read_by_backward(g.storages().size(), false);
  for (const graph::Op& op : g.ops()) {
    if (op.phase != graph::Phase::backward || op.recompute) continue;
    for (graph::TensorId t : op.inputs) read_by_backward[graph::index(g.tensor(t).storage)] = true;
  }
  std::vector<bool> seen(g.storages().size(), false);
  for (const graph::Op& op : g.ops()) {
    if (!op.recompute || op.layer < 0) continue;
    for (graph::TensorId t : op.outputs) {
      const size_t st = graph::index(g.tensor(t).storage);
      if (g.tensor(t).is_view || seen[st] || !read_by_backward[st]) continue;
      seen[st] = true;
      recomputed[bp.segment[static_cast<size_t>(op.layer)]] += g.storages()[st].bytes;
    }
  }
  int64_t largest = 0;
  for (auto& [seg, bytes] : recomputed) largest = std::max(largest, bytes);
  const int64_t kept = sq.saved_bytes - sq.outside_saved + largest;
  const double root = std::sqrt(static_cast<double>(L));
  INFO("block " << block << ", kept " << kept << ", largest segment " << largest);
  CHECK(recomputed.size() == 10);
  // A segment of sqrt(L) = 10 blocks recomputes them all but its first input (the checkpoint).
  CHECK(largest <= 10 * block);
  CHECK(largest >= 9 * block);
  CHECK(kept <= static_cast<int64_t>(2 * root) * block + block);
  CHECK(kept >= static_cast<int64_t>(root) * block);
  CHECK(none.saved_bytes - none.outside_saved == L * block);

  // One extra forward: the recompute costs the blocks' forward time, within 10%.
  sim::StepTables plan(none.step->graph, none.scenario.device);
  int64_t forward_blocks_ns = 0;
  for (size_t i = 0; i < none.step->graph.n_ops(); ++i) {
    const graph::Op& op = none.step->graph.ops()[i];
    if (op.phase == graph::Phase::forward && op.layer >= 0) forward_blocks_ns += plan.duration_ns(graph::OpId{static_cast<uint32_t>(i)});
  }
  const int64_t extra_ns = sq.result.step_time_ns - none.result.step_time_ns;
  INFO("forward of the blocks " << forward_blocks_ns << " ns, extra step time " << extra_ns << " ns");
  CHECK(std::abs(static_cast<double>(extra_ns - forward_blocks_ns)) <= 0.10 * static_cast<double>(forward_blocks_ns));
  // The simulation agrees: the most activation (and temporary) bytes live at once under sqrt is
  // the kept activations plus at most a block's transient backward buffers.
  const int64_t most = most_activation_bytes(sq);
  INFO("most activation bytes live: sqrt " << most << ", none " << most_activation_bytes(none));
  CHECK(most >= kept);
  CHECK(most <= kept + 2 * block);
  CHECK(sq.result.peak_bytes < none.result.peak_bytes);
}

TEST_CASE("checkpoint: every policy lowers, validates and never peaks above none (offload: its prefetch)", "[checkpoint]") {
  std::string all_kinds = "ops:";
  for (const std::string& k : graph::checkpointable_op_kinds()) all_kinds += (all_kinds.size() > 4 ? "," : "") + k;
  const std::vector<std::vector<std::string>> models{
      {"model.family=gpt2", "model.n_layers=4", "model.d_model=128", "model.n_heads=4", "model.vocab_size=256",
       "model.seq_len=64", "training.batch_size=2", "model.dropout=0.1", "training.dtype=bf16"},
      {"model.family=llama", "model.n_layers=5", "model.d_model=128", "model.n_heads=4", "model.n_kv_heads=2",
       "model.vocab_size=256", "model.seq_len=64", "training.batch_size=3"},
      {"model.family=llama", "model.n_layers=4", "model.d_model=128", "model.n_heads=4", "model.vocab_size=256",
       "model.seq_len=64", "training.batch_size=2", "model.attention=flash", "training.dtype=bf16"},
      {"model.family=gpt2", "model.n_layers=3", "model.d_model=64", "model.n_heads=2", "model.vocab_size=128",
       "model.seq_len=32", "training.batch_size=2", "model.dropout=0.1", "runtime.profile=torch-cpu"},
  };
  const std::vector<std::string> policies{"none",      "full",    "every:2", "every:3",   "every:100", "sqrt",
                                          "selective", "offload", "ops:mm",  "ops:addmm,bmm", all_kinds};
  for (const auto& m : models) {
    auto with = [&](const std::string& p) {
      std::vector<std::string> s = m;
      s.push_back("checkpoint.policy=" + p);
      return run(s);
    };
    const study::Analysis none = with("none");
    for (const std::string& p : policies) {
      INFO(fmt::format("{} | {}", fmt::join(m, " "), p));
      const study::Analysis a = with(p);
      a.step->graph.validate();
      CHECK(a.result.step_time_ns >= none.result.step_time_ns);
      if (p == "offload") {
        // Saved activations go to the host as forward runs, and come back one block ahead of
        // backward: at most one block more than `none` is in flight.
        CHECK(a.result.peak_bytes <= none.result.peak_bytes + none.per_layer_saved[0]);
      } else if (p == all_kinds) {
        // Selective activation checkpointing that saves every op keeps every output, needed by
        // backward or not (its cache; measured on PyTorch 2.x by tests/torch): at least what
        // `none` keeps is kept.
        CHECK(a.saved_bytes >= none.saved_bytes);
        CHECK(a.result.peak_bytes >= none.result.peak_bytes);
      } else {
        // A checkpoint call keeps a little of its own (as PyTorch does): its RNG stash on CPU
        // runtimes, and its arguments (llama's 128 B token positions) until its backward ends.
        int64_t frame = 0;
        for (const graph::Op& op : a.step->graph.ops()) {
          if (op.kind != graph::OpKind::rng_stash) continue;
          const graph::Storage& st = a.step->graph.storage(a.step->graph.tensor(op.outputs[0]).storage);
          if (st.location == graph::Location::device) frame += st.bytes;
        }
        CHECK(a.result.peak_bytes <= none.result.peak_bytes + frame + 512);
      }
    }
  }
}

TEST_CASE("checkpoint: bad policies are InputErrors naming the key", "[checkpoint]") {
  for (const char* bad : {"bogus", "every:0", "every:", "every:-2", "ops:mm,bogus", "ops:", "budget:60 parsecs",
                          "budget:", "budget:-1", "full:2"}) {
    INFO(bad);
    try {
      (void)study::load_scenario("", {std::string("checkpoint.policy=") + bad});
      FAIL("accepted");
    } catch (const InputError& e) {
      const std::string msg = e.what();
      CHECK(msg.find("--set: checkpoint.policy") != std::string::npos);
      CHECK(msg.find('\n') == std::string::npos);
    }
  }
  // In a file, the error names the file and line.
  const std::string path = (std::filesystem::temp_directory_path() /
                            ("actsim_test_checkpoint_" + std::to_string(::getpid()) + ".toml")).string();
  std::ofstream(path) << "[model]\nn_layers = 2\n\n[checkpoint]\npolicy = \"every:0\"\n";
  try {
    (void)study::load_scenario(path, {});
    FAIL("accepted");
  } catch (const InputError& e) {
    CHECK(std::string(e.what()).find(path + ":5: checkpoint.policy") != std::string::npos);
  }
  std::filesystem::remove(path);
}

TEST_CASE("checkpoint: budget sizes parse, non-sizes do not", "[checkpoint]") {
  int64_t bytes = 0;
  CHECK(graph::parse_size("60GB", bytes));
  CHECK(bytes == 60'000'000'000);
  CHECK(graph::parse_size("60GiB", bytes));
  CHECK(bytes == 64424509440);
  CHECK(graph::parse_size("64424509440", bytes));
  CHECK(bytes == 64424509440);
  for (const char* bad : {"60 parsecs", "", "-1", "GiB", "1.5"}) {
    INFO(bad);
    CHECK_FALSE(graph::parse_size(bad, bytes));
  }
  CHECK(graph::parse_policy("budget:60GiB", "checkpoint.policy").budget_bytes == 64424509440);
  CHECK(graph::parse_policy("every:3", "checkpoint.policy").every == 3);
}

TEST_CASE("study::run_sweep: every row equals study::analyze of its scenario (batch scaling included)", "[checkpoint][sweep]") {
  const study::Scenario base = study::load_scenario(
      "", {"model.family=llama", "model.n_layers=3", "model.d_model=64", "model.n_heads=4", "model.vocab_size=128",
           "model.seq_len=128"});  // (B, T, 1) statistics stay whole 512 B blocks under torch-cuda
  const std::vector<study::SweepAxis> axes{study::parse_sweep_axis("training.batch_size=1..7"),
                                         study::parse_sweep_axis("checkpoint.policy=none,full,selective,offload"),
                                         study::parse_sweep_axis("device.name=A100-80GB,RTX-4090-24GB")};
  study::SweepStats stats;
  const std::vector<study::SweepRow> rows = study::run_sweep(base, axes, {.threads = 2}, &stats);
  REQUIRE(rows.size() == 7 * 4 * 2);
  CHECK(stats.scaled > 0);  // the batch-scaling model held for the single-stream policies
  for (const study::SweepRow& r : rows) {
    std::vector<std::string> sets;
    for (size_t k = 0; k < axes.size(); ++k) sets.push_back(axes[k].key + "=" + r.values[k]);
    INFO(fmt::format("{}", fmt::join(sets, " ")));
    study::Scenario s = base;
    study::apply_overrides(s, sets);
    const study::Analysis a = study::analyze(s);
    CHECK(r.peak_bytes == a.result.peak_bytes);
    CHECK(r.step_time_ns == a.result.step_time_ns);
    CHECK(r.saved_bytes == a.saved_bytes);
    CHECK(r.fits == (a.result.peak_bytes <= s.device.memory_bytes));
  }
}

TEST_CASE("study::mark_pareto: dominated rows are off the frontier, ties stay on", "[checkpoint][sweep]") {
  std::vector<study::SweepRow> rows(6);
  const int64_t pts[][2] = {{10, 50}, {20, 40}, {20, 45}, {30, 40}, {10, 50}, {5, 100}};
  for (size_t i = 0; i < rows.size(); ++i) rows[i].peak_bytes = pts[i][0], rows[i].step_time_ns = pts[i][1];
  study::mark_pareto(rows);
  const bool expect[] = {true, true, false, false, true, true};
  for (size_t i = 0; i < rows.size(); ++i) {
    INFO(i);
    CHECK(rows[i].pareto == expect[i]);
  }
}

TEST_CASE("study::parse_sweep_axis: ranges, quoted lists, and one-line errors naming the option", "[checkpoint][sweep]") {
  CHECK(study::parse_sweep_axis("training.batch_size=1..3,8").values == std::vector<std::string>{"1", "2", "3", "8"});
  CHECK(study::parse_sweep_axis("checkpoint.policy=none,\"ops:addmm,bmm\"").values ==
        std::vector<std::string>{"none", "\"ops:addmm,bmm\""});
  auto error_of = [](const std::string& text) -> std::string {
    try {
      (void)study::parse_sweep_axis(text);
    } catch (const InputError& e) {
      return e.what();
    }
    return "(accepted)";
  };
  CHECK(error_of("model.n_layer=2,4").rfind("--vary model.n_layer=2,4: unknown key", 0) == 0);
  CHECK(error_of("model.n_layer=2,4").find("did you mean model.n_layers?") != std::string::npos);
  CHECK(error_of("model.n_layers=").rfind("--vary model.n_layers=: empty value list", 0) == 0);
  CHECK(error_of("model.n_layers=2,,4").rfind("--vary model.n_layers=2,,4: value 2", 0) == 0);
  CHECK(error_of("model.n_layers").rfind("--vary model.n_layers: expected KEY=", 0) == 0);
  CHECK(error_of("training.batch_size=9..2").rfind("--vary training.batch_size=9..2: range", 0) == 0);
  // Values are checked against the scenario when the sweep runs, before anything is simulated.
  const study::Scenario base = study::load_scenario("", {"model.n_layers=2"});
  for (const auto& [text, names] : std::vector<std::pair<std::string, std::string>>{
           {"model.n_layers=2,0", "--vary model.n_layers=2,0: model.n_layers"},
           {"checkpoint.policy=none,every:0", "--vary checkpoint.policy=none,every:0: checkpoint.policy"},
           {"training.batch_size=2,x", "--vary training.batch_size=2,x: training.batch_size"}}) {
    try {
      (void)study::run_sweep(base, {study::parse_sweep_axis(text)}, {.threads = 1});
      FAIL(text << " accepted");
    } catch (const InputError& e) {
      CHECK(std::string(e.what()).rfind(names, 0) == 0);
    }
  }
}

// ---- cut tensors (graph/cuts.hpp) ----------------------------------------------------------------

namespace {

graph::StepGraph small_forward(graph::Family f, graph::ProfileId prof, double dropout, int64_t layers) {
  graph::ModelConfig m;
  m.family = f;
  m.n_layers = layers;
  m.d_model = 64;
  m.n_heads = 4;
  m.seq_len = 16;
  m.vocab_size = 128;
  m.dropout = dropout;
  graph::TrainingConfig t;
  t.batch_size = 2;
  return graph::lower_forward(m, t, graph::profile(prof));
}

// The oracle, by definition: an activation (a tensor that depends on an input leaf) is a cut when
// removing it leaves no undirected path from `source` to `sink` through forward ops and activations.
std::set<uint32_t> brute_force_cuts(const graph::Graph& g, graph::TensorId source, graph::TensorId sink) {
  const size_t n_t = g.tensors().size();
  std::vector<bool> act(n_t, false);
  for (size_t t = 0; t < n_t; ++t) {
    const graph::Tensor& tt = g.tensors()[t];
    act[t] = tt.producer == graph::kNoOp && g.storage(tt.storage).category == graph::Category::input;
  }
  std::vector<std::vector<size_t>> adj(n_t + g.n_ops());  // tensors, then ops
  for (size_t i = 0; i < g.n_ops(); ++i) {
    const graph::Op& op = g.ops()[i];
    if (op.phase != graph::Phase::forward) continue;
    bool reads = false;
    for (graph::TensorId t : op.inputs) reads = reads || act[graph::index(t)];
    if (!reads) continue;
    for (graph::TensorId t : op.outputs) act[graph::index(t)] = true;
    for (const auto* list : {&op.inputs, &op.outputs}) {
      for (graph::TensorId t : *list) {
        if (!act[graph::index(t)]) continue;
        adj[graph::index(t)].push_back(n_t + i);
        adj[n_t + i].push_back(graph::index(t));
      }
    }
  }
  auto connected_without = [&](size_t removed) -> bool {  // not vector<bool>::reference into `seen`
    std::vector<bool> seen(adj.size(), false);
    std::queue<size_t> q;
    q.push(graph::index(source));
    seen[graph::index(source)] = true;
    while (!q.empty()) {
      const size_t x = q.front();
      q.pop();
      for (size_t y : adj[x]) {
        if (y == removed || seen[y]) continue;
        seen[y] = true;
        q.push(y);
      }
    }
    return seen[graph::index(sink)];
  };
  std::set<uint32_t> out;
  for (size_t t = 0; t < n_t; ++t) {
    if (!act[t] || t == graph::index(source) || t == graph::index(sink) || adj[t].empty()) continue;
    if (!connected_without(t)) out.insert(static_cast<uint32_t>(t));
  }
  return out;
}

}  // namespace

TEST_CASE("graph::forward_cuts: gpt2 and llama cut at each block's input and between attention and MLP", "[cuts]") {
  for (const graph::Family fam : {graph::Family::gpt2, graph::Family::llama}) {
    for (const graph::ProfileId prof : {graph::ProfileId::torch_cpu, graph::ProfileId::torch_cuda}) {
      const int64_t L = 3;
      const graph::StepGraph s = small_forward(fam, prof, fam == graph::Family::gpt2 ? 0.1 : 0.0, L);
      const graph::Graph& g = s.graph;
      INFO(graph::to_string(fam) << " " << graph::to_string(prof));
      const std::vector<graph::CutTensor> cuts = graph::forward_cuts(g, graph::kNoTensor, s.loss);
      std::set<uint32_t> cut_set;
      for (const auto& c : cuts) cut_set.insert(graph::index(c.tensor));
      for (int64_t i = 0; i < L; ++i) {
        // The block's input: what its first op reads; the residual between attention and MLP: the
        // output of its first residual add (x + attn(x); llama's RoPE adds are in the attention).
        graph::TensorId input = graph::kNoTensor, mid = graph::kNoTensor;
        int in_block = 0;
        for (size_t k = 0; k < g.n_ops(); ++k) {
          const graph::Op& op = g.ops()[k];
          if (op.layer != i || op.phase != graph::Phase::forward) continue;
          if (input == graph::kNoTensor) input = op.inputs.at(0);
          if (op.kind == graph::OpKind::add && op.name == fmt::format("blocks.{}.add", i) && mid == graph::kNoTensor) {
            mid = op.outputs.at(0);
          }
          for (graph::TensorId t : op.outputs) in_block += cut_set.count(graph::index(t)) > 0;
        }
        INFO("block " << i);
        CHECK(cut_set.count(graph::index(input)));
        CHECK(cut_set.count(graph::index(mid)));
        CHECK(in_block == 2);  // the mid residual and the block's output, nothing else
      }
      // Every cut is one by definition, and every tensor that is one is found.
      graph::TensorId src = graph::kNoTensor;
      for (const graph::Op& op : g.ops()) {
        for (graph::TensorId t : op.inputs) {
          if (src == graph::kNoTensor && g.tensor(t).producer == graph::kNoOp &&
              g.storage(g.tensor(t).storage).category == graph::Category::input) {
            src = t;
          }
        }
        if (src != graph::kNoTensor) break;
      }
      CHECK(cut_set == brute_force_cuts(g, src, s.loss));
    }
  }
}

TEST_CASE("graph::forward_cuts: cuts are in forward order, and the model's tensors are found", "[cuts]") {
  const graph::StepGraph s = small_forward(graph::Family::llama, graph::ProfileId::torch2_cpu, 0.0, 4);
  const std::vector<graph::CutTensor> cuts = graph::forward_cuts(s.graph);
  REQUIRE(cuts.size() >= 2 * 4 + 1);
  for (size_t k = 1; k < cuts.size(); ++k) {
    CHECK(graph::index(cuts[k - 1].producer) < graph::index(cuts[k].producer));
    CHECK(s.graph.tensor(cuts[k].tensor).producer == cuts[k].producer);
  }
  // The positions (arange) and the causal mask feed every block but depend on no input: they
  // are left out, or no block input would be a cut.
  for (const auto& c : cuts) CHECK(s.graph.op(c.producer).kind != graph::OpKind::arange);
}

TEST_CASE("graph::forward_cuts: a parallel-residual block has no cut inside it, a sequential one has", "[cuts]") {
  // x -> embed -> h0; block 0 (parallel, GPT-J/PaLM): out = h0 + attn(ln(h0)) + mlp(ln(h0));
  // block 1 (sequential): mid = out + attn(ln(out)); out2 = mid + mlp(ln(mid)); loss(out2).
  graph::Graph g;
  auto tensor = [&](const std::string& name, graph::Category c = graph::Category::activation) {
    const graph::StorageId st = g.add_storage({.bytes = 64, .category = c});
    return g.add_tensor({.name = name, .shape = {16}, .dtype = graph::DType::f32, .storage = st});
  };
  auto op = [&](const std::string& name, graph::OpKind k, std::vector<graph::TensorId> in, int32_t layer) {
    const graph::TensorId out = tensor(name);
    g.add_op({.kind = k, .phase = graph::Phase::forward, .layer = layer, .name = name, .inputs = std::move(in),
              .outputs = {out}});
    return out;
  };
  const graph::TensorId x = tensor("x", graph::Category::input);
  const graph::TensorId w = tensor("w", graph::Category::parameter);
  const graph::TensorId h0 = op("embed", graph::OpKind::embedding, {w, x}, -1);
  const graph::TensorId a = op("b0.attn", graph::OpKind::softmax, {op("b0.ln", graph::OpKind::layer_norm, {h0}, 0)}, 0);
  const graph::TensorId m = op("b0.mlp", graph::OpKind::gelu_tanh, {op("b0.ln2", graph::OpKind::layer_norm, {h0}, 0)}, 0);
  const graph::TensorId s0 = op("b0.add", graph::OpKind::add, {h0, a}, 0);
  const graph::TensorId out = op("b0.add2", graph::OpKind::add, {s0, m}, 0);
  const graph::TensorId a1 = op("b1.attn", graph::OpKind::softmax, {op("b1.ln", graph::OpKind::layer_norm, {out}, 1)}, 1);
  const graph::TensorId mid = op("b1.add", graph::OpKind::add, {out, a1}, 1);
  const graph::TensorId f1 = op("b1.mlp", graph::OpKind::gelu_tanh, {op("b1.ln2", graph::OpKind::layer_norm, {mid}, 1)}, 1);
  const graph::TensorId out2 = op("b1.add2", graph::OpKind::add, {mid, f1, w}, 1);
  const graph::TensorId loss = op("loss", graph::OpKind::nll_loss, {out2}, -1);
  const std::vector<graph::CutTensor> cuts = graph::forward_cuts(g);
  std::vector<std::string> names;
  for (const auto& c : cuts) names.push_back(g.tensor(c.tensor).name);
  CHECK(names == std::vector<std::string>{"embed", "b0.add2", "b1.add", "b1.add2"});
  CHECK(cuts.back().tensor == out2);
  CHECK(graph::forward_cuts(g, x, loss).size() == cuts.size());
}

TEST_CASE("checkpoint: mlp recomputes Megatron-LM's MLP terms (19sbh) and ln_2's statistics, nothing else",
          "[checkpoint]") {
  for (const Size& z : kMegatronSizes) {
    const auto [s, h, a, b] = z;
    INFO("s=" << s << " h=" << h << " a=" << a << " b=" << b);
    const study::Analysis none = run(megatron(s, h, a, b, "none"));
    const study::Analysis mlp = run(megatron(s, h, a, b, "mlp"));
    REQUIRE(mlp.per_layer_saved.size() == none.per_layer_saved.size());
    // Korthikanti et al. 2022: the MLP keeps 19sbh (c_fc input 2, GELU input 8, c_proj input 8,
    // dropout mask 1); ln_2's input (2sbh) is the checkpoint's input and stays, its fp32 mean and
    // rstd (8sb) go.
    for (size_t i = 0; i < none.per_layer_saved.size(); ++i) {
      CHECK(none.per_layer_saved[i] - mlp.per_layer_saved[i] == 19 * s * b * h + 8 * s * b);
    }
    CHECK(mlp.outside_saved == none.outside_saved);
    CHECK(mlp.result.step_time_ns > none.result.step_time_ns);
    CHECK(mlp.result.peak_bytes <= none.result.peak_bytes);
  }
  for (const char* bad : {"mlp:2", "mlps"}) {
    INFO(bad);
    CHECK_THROWS_AS(study::load_scenario("", {std::string("checkpoint.policy=") + bad}), InputError);
  }
  CHECK(graph::block_plan(graph::parse_policy("mlp", "test"), 3).describe() == "3 mlp-recomputed");
}

TEST_CASE("checkpoint: mlp's checkpoint call is the segment between each block's last two cut tensors",
          "[checkpoint][cuts]") {
  for (const graph::Family fam : {graph::Family::gpt2, graph::Family::llama}) {
    graph::ModelConfig m;
    m.family = fam;
    m.n_layers = 3;
    m.d_model = 64;
    m.n_heads = 4;
    m.seq_len = 16;
    m.vocab_size = 128;
    m.dropout = fam == graph::Family::gpt2 ? 0.1 : 0.0;
    graph::TrainingConfig t;
    t.batch_size = 2;
    const graph::BlockPlan plan = graph::block_plan(graph::parse_policy("mlp", "test"), m.n_layers);
    const graph::StepGraph step =
        graph::lower_training_step(m, t, graph::profile(graph::ProfileId::torch2_cpu), &plan);
    const graph::Graph& g = step.graph;
    const std::vector<graph::CutTensor> cuts = graph::forward_cuts(g, graph::kNoTensor, step.loss);
    std::map<uint32_t, size_t> cut_at;  // tensor -> position among the cuts
    for (size_t k = 0; k < cuts.size(); ++k) cut_at[graph::index(cuts[k].tensor)] = k;
    for (int32_t i = 0; i < m.n_layers; ++i) {
      INFO(graph::to_string(fam) << " block " << i);
      std::vector<size_t> region;
      int32_t id = -1;
      for (size_t k = 0; k < g.n_ops(); ++k) {
        const graph::Op& op = g.ops()[k];
        if (op.phase != graph::Phase::forward || op.layer != i) continue;
        const bool mlp_op = op.name.find(".mlp") != std::string::npos || op.name.find(".ffn") != std::string::npos;
        if (op.region < 0) {
          CHECK_FALSE(mlp_op);  // the whole MLP sublayer is inside the checkpoint call
          continue;
        }
        if (id < 0) id = op.region;
        CHECK(op.region == id);  // one checkpoint call
        region.push_back(k);
      }
      REQUIRE(!region.empty());
      CHECK(region.back() - region.front() + 1 == region.size());  // contiguous in forward order
      // It reads one activation from outside: a cut tensor; it writes the next cut last.
      std::set<uint32_t> own, read;
      for (size_t k : region) {
        for (graph::TensorId o : g.ops()[k].outputs) own.insert(graph::index(g.tensor(o).storage));
      }
      graph::TensorId input = graph::kNoTensor;
      for (size_t k : region) {
        for (graph::TensorId in : g.ops()[k].inputs) {
          const graph::Storage& st = g.storage(g.tensor(in).storage);
          if (own.count(graph::index(g.tensor(in).storage)) || st.category != graph::Category::activation) continue;
          read.insert(graph::index(g.tensor(in).storage));
          input = in;
        }
      }
      REQUIRE(read.size() == 1);
      const graph::TensorId output = g.ops()[region.back()].outputs.at(0);
      REQUIRE(cut_at.count(graph::index(input)));
      REQUIRE(cut_at.count(graph::index(output)));
      CHECK(cut_at[graph::index(output)] == cut_at[graph::index(input)] + 1);
      CHECK(g.op(g.tensor(output).producer).name == fmt::format("blocks.{}.add", i));
    }
  }
}
