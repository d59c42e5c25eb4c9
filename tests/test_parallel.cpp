// Tests of data parallelism (issue 13): the ZeRO paper's model-state bytes per GPU (Rajbhandari et
// al. 2020, section 5.1 and figure 1) from actsim's per-rank simulation, term by term; DDP's
// buckets; the per-rank JSON; bad combinations of keys.
#include <catch2/catch.hpp>
#include <fmt/format.h>

#include <cmath>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "actsim/report/export.hpp"
#include "actsim/report/summary.hpp"
#include "actsim/study/analyze.hpp"
#include "actsim/study/scenario.hpp"
#include "actsim/util/error.hpp"

using namespace actsim;

namespace {

study::Analysis run(const std::vector<std::string>& sets) { return study::analyze(study::load_scenario("", sets)); }

// A llama (untied embeddings, no biases) of 7,512,559,616 parameters: the ZeRO paper's example is
// 7.5B. bf16 parameters and gradients, Adam with an fp32 master copy (K = 12), torch-cuda.
std::vector<std::string> zero_model(int64_t dp, const std::string& sharding) {
  std::vector<std::string> s{"model.family=llama", "model.d_model=4096", "model.n_heads=32", "model.n_layers=36",
                             "model.vocab_size=32000", "model.seq_len=16", "training.batch_size=1",
                             "training.dtype=bf16", "training.optimizer=adam", "training.master_weights=fp32",
                             "runtime.profile=torch-cuda", "device.name=H100-SXM-80GB"};
  if (dp > 1) {
    s.push_back(fmt::format("parallel.dp={}", dp));
    s.push_back("parallel.sharding=" + sharding);
  }
  if (dp > 1 && sharding == "none") s.push_back("parallel.gradient_as_bucket_view=true");
  return s;
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The one-line error loading `sets` gives, or "no error".
std::string message(const std::vector<std::string>& sets) {
  try {
    (void)study::load_scenario("", sets);
  } catch (const InputError& e) {
    return std::string(e.what());
  }
  return std::string("no error");
}

}  // namespace

TEST_CASE("ZeRO paper: model-state bytes per GPU, term by term (K = 12)", "[parallel][zero]") {
  const int64_t N = 64;
  // The paper's own figures for psi = 7.5B, N = 64: 120, 31.4, 16.6 and 1.9 GB.
  const double psi_paper = 7.5e9;
  CHECK(std::round(16 * psi_paper / 1e9) == 120);
  CHECK(std::round((4 * psi_paper + 12 * psi_paper / N) / 1e8) == 314);
  CHECK(std::round((2 * psi_paper + 14 * psi_paper / N) / 1e8) == 166);
  CHECK(std::round(16 * psi_paper / N / 1e8) == 19);

  // actsim's simulated rank: parameters, gradients and optimizer state, each a term of the formula.
  // The reference model's extras, named: Adam's 'step' (one fp32 scalar, 4 bytes, on the device
  // with FusedAdam), the flat partition's padding to a multiple of N (ceil(psi / N) elements per
  // rank), and under ZeRO-2 each gradient's own shard padding (ceil(numel / N) per tensor). No
  // buffers count: the llama's RoPE tables are buffers, not model state (buffers_bytes).
  const study::Analysis base = run(zero_model(1, "none"));
  const int64_t psi = base.param_count;
  REQUIRE(psi == 7'512'559'616);
  const int64_t step = 4;
  const int64_t part = ceil_div(psi, N);

  SECTION("baseline data parallelism (DDP, gradients as bucket views): 2 + 2 + K = 16 psi") {
    const study::Analysis a = run(zero_model(N, "none"));
    CHECK(a.params_bytes == 2 * psi);
    CHECK(a.grads_bytes == 2 * psi);  // the DDP buckets, of which .grad are views
    CHECK(a.optimizer_bytes == 12 * psi + step);
    CHECK(a.params_bytes + a.grads_bytes + a.optimizer_bytes - step == 16 * psi);
    // the same model state without data parallelism
    CHECK(base.params_bytes + base.grads_bytes + base.optimizer_bytes - step == 16 * psi);
  }
  SECTION("P_os (ZeRO-1): 4 psi + 12 psi / N") {
    const study::Analysis a = run(zero_model(N, "zero1"));
    CHECK(a.params_bytes == 2 * psi);
    CHECK(a.grads_bytes == 2 * psi);
    CHECK(a.optimizer_bytes == 12 * part + step);
    CHECK(a.params_bytes + a.grads_bytes + a.optimizer_bytes - step - 12 * (part * N - psi) / N ==
          4 * psi + 12 * psi / N);
    CHECK(std::round((a.params_bytes + a.grads_bytes + a.optimizer_bytes) / 1e8) == 315);  // 31.5 GB at 7.51B
  }
  SECTION("P_os+g (ZeRO-2): 2 psi + 14 psi / N") {
    const study::Analysis a = run(zero_model(N, "zero2"));
    int64_t grad_shards = 0;  // the per-tensor shards of the gradients
    const auto& g = a.step->graph;
    for (auto p : a.step->params) grad_shards += 2 * ceil_div(graph::numel(g.tensor(p).shape), N);
    CHECK(a.params_bytes == 2 * psi);
    CHECK(a.grads_bytes == grad_shards);
    CHECK(grad_shards - 2 * psi / N < 2 * static_cast<int64_t>(a.step->params.size()));  // padding < 1 element each
    CHECK(a.optimizer_bytes == 12 * part + step);
    CHECK(a.params_bytes + 2 * psi / N + a.optimizer_bytes - step - 12 * (part * N - psi) / N ==
          2 * psi + 14 * psi / N);
  }
  // fsdp: ZeRO-3
  SECTION("P_os+g+p (ZeRO-3): 16 psi / N") {
    const study::Analysis a = run(zero_model(N, "zero3"));
    const auto& g = a.step->graph;
    // DeepSpeed stage 3 partitions each parameter of at least stage3_param_persistence_threshold
    // (1e5) elements, ceil(numel / N) per rank; the smaller ones (here the 73 RMSNorm weights of
    // 4,096) stay whole on every rank. The extras, named: those persistent parameters, each
    // tensor's own partition padding (< 1 element), Adam's step.
    int64_t part3 = 0, persistent = 0, partitioned = 0, n_persistent = 0;
    for (auto p : a.step->params) {
      const int64_t n = graph::numel(g.tensor(p).shape);
      part3 += ceil_div(n, N);
      if (n < 100000) {
        persistent += n;
        ++n_persistent;
      } else {
        partitioned += ceil_div(n, N);
      }
    }
    CHECK(n_persistent == 2 * 36 + 1);
    CHECK(persistent == n_persistent * 4096);
    CHECK(a.params_bytes == 2 * (partitioned + persistent));
    CHECK(a.grads_bytes == 2 * part3);
    CHECK(a.optimizer_bytes == 12 * part3 + step);
    CHECK(part3 - psi / N < static_cast<int64_t>(a.step->params.size()));  // padding < 1 element each
    // 2 psi / N + 2 psi / N + 12 psi / N, term by term, less the extras
    const int64_t pad = part3 * N - psi;  // the partitions' padding over all ranks (elements)
    const int64_t n_params = static_cast<int64_t>(a.step->params.size());
    const int64_t params_padding = (a.params_bytes - 2 * persistent) * N - 2 * (psi - persistent);
    CHECK(params_padding >= 0);
    CHECK(params_padding < 2 * N * n_params);  // < 1 element of each partitioned tensor on each rank
    CHECK(a.grads_bytes * N - 2 * pad == 2 * psi);
    CHECK((a.optimizer_bytes - step) * N - 12 * pad == 12 * psi);
    CHECK(std::round((a.params_bytes + a.grads_bytes + a.optimizer_bytes) / 1e8) == 19);  // 1.9 GB, as the paper
    // Extras during the step, named: a block's parameters gathered around its forward and its
    // backward (2 bytes x its partitioned elements, all-gathered), the root unit's (embedding and
    // head, 2 x 32000 x 4096 each, gathered from the forward's start to the end of backward).
    int64_t block0 = 0, root = 0;
    for (auto p : a.step->params) {
      const int64_t n = graph::numel(g.tensor(p).shape);
      if (n < 100000) continue;
      const int32_t layer = g.storage(g.tensor(p).storage).layer;
      if (layer == 0) block0 += n;
      if (layer < 0) root += n;
    }
    CHECK(root == 2 * 32000 * 4096);
    int gathers0 = 0;
    for (const auto& op : g.ops()) {
      if (op.name == "zero3.blocks.0.all_gather") {
        ++gathers0;
        CHECK(op.bytes_moved == 2 * block0);
      }
      if (op.name == "zero3.root.all_gather") CHECK(op.bytes_moved == 2 * root);
      CHECK(op.name != "zero.params.all_gather");  // ZeRO-3's parameters stay partitioned after the step
    }
    CHECK(gathers0 == 2);  // before its forward and before its backward
    CHECK(a.result.peak_bytes > a.params_bytes + a.grads_bytes + a.optimizer_bytes + 2 * root + 2 * block0);
  }
  // end fsdp
}

// fsdp: ZeRO-3's gathered parameters
TEST_CASE("ZeRO-3: a block's gathered parameters live around its forward, the root's to the end of backward", "[parallel][zero]") {
  // gpt2 (wte tied with lm_head: one root parameter), 2 blocks, 4 ranks, fp32, Adam.
  const std::vector<std::string> base{"model.d_model=512", "model.n_heads=8", "model.n_layers=2", "model.seq_len=64",
                                      "model.vocab_size=50257", "training.batch_size=1", "training.optimizer=adam",
                                      "runtime.profile=torch-cuda", "parallel.dp=4"};
  auto with = [&](const std::string& sharding) {
    std::vector<std::string> s = base;
    s.push_back("parallel.sharding=" + sharding);
    return run(s);
  };
  const study::Analysis z2 = with("zero2"), z3 = with("zero3");
  const auto& g = z3.step->graph;
  int64_t root = 0, partitioned = 0, persistent = 0;
  for (auto p : z3.step->params) {
    const int64_t n = graph::numel(g.tensor(p).shape);
    if (n < 100000) {
      persistent += n;
      continue;
    }
    partitioned += ceil_div(n, 4);
    if (g.storage(g.tensor(p).storage).layer < 0) root += n;
  }
  CHECK(root == (50257 + 0) * 512);  // wte (and the tied head); wpe (64 x 512) is persistent
  CHECK(z3.params_bytes == 4 * (partitioned + persistent));
  // Same activations and gradients: the end of forward differs by the parameters (partitions, not
  // whole) and the root unit's gathered copy, nothing of the blocks.
  CHECK(z3.result.live_end_forward - z3.result.live_step_start ==
        z2.result.live_end_forward - z2.result.live_step_start + 4 * root);
  // By the end of backward the root's copy and every block's backward copy are freed: the same
  // gradient shards (and loss) as ZeRO-2 are all that is new, and after zero_grad nothing is.
  CHECK(z3.grads_bytes == z2.grads_bytes);
  CHECK(z3.result.live_end_backward - z3.result.live_step_start ==
        z2.result.live_end_backward - z2.result.live_step_start);
  CHECK(z3.result.live_end_step - z3.result.live_step_start == z2.result.live_end_step - z2.result.live_step_start);
}
// end fsdp

TEST_CASE("DDP: buckets are persistent gradients, gradient_as_bucket_view drops the copies", "[parallel][ddp]") {
  const std::vector<std::string> base{"runtime.profile=torch2-cpu", "model.vocab_size=97", "model.seq_len=16",
                                      "model.d_model=32", "model.n_heads=4", "model.n_layers=2",
                                      "training.batch_size=2", "training.optimizer_impl=for_loop"};
  const study::Analysis one = run(base);
  auto with = [&](std::vector<std::string> more) {
    std::vector<std::string> s = base;
    s.insert(s.end(), more.begin(), more.end());
    return run(s);
  };
  const study::Analysis ddp = with({"parallel.dp=2"});
  // DDP's flat bucket holds a copy of every gradient, all step long; the buffers' broadcast is a
  // transient. Measured by tests/torch/test_parallel.py to the byte.
  CHECK(ddp.result.live_step_start == one.result.live_step_start + one.params_bytes);
  CHECK(ddp.result.live_end_backward == one.result.live_end_backward + one.params_bytes);
  CHECK(ddp.result.peak_bytes == one.result.peak_bytes + one.params_bytes);
  const study::Analysis view = with({"parallel.dp=2", "parallel.gradient_as_bucket_view=true"});
  // after backward: what was there at step start, and the loss (kept past the step)
  CHECK(view.result.live_end_backward == ddp.result.live_step_start + (one.result.live_end_step - one.result.live_step_start));
  CHECK(view.result.peak_bytes < ddp.result.peak_bytes);
  // Collectives run on the communication stream and take time from the link figures.
  int n_all_reduce = 0;
  for (const auto& op : ddp.step->graph.ops()) {
    if (op.kind == graph::OpKind::all_reduce) {
      ++n_all_reduce;
      CHECK(op.stream == 2);
    }
  }
  CHECK(n_all_reduce == 1);  // everything fits the 1 MiB first bucket
  const nlohmann::json j = report::to_json(ddp, -1);
  REQUIRE(j.contains("ranks"));
  CHECK(j["ranks"].size() == 1);
  CHECK(j["ranks"][0]["count"] == 2);
  CHECK(j["ranks"][0]["figures"]["peak"] == j["peak"]);
  CHECK_FALSE(report::to_json(one, -1).contains("ranks"));
}

TEST_CASE("DDP buckets: 1 MiB first, then bucket_cap_mb, in the order gradients become ready", "[parallel][ddp]") {
  const study::Analysis a = run({"model.d_model=256", "model.n_heads=4", "model.n_layers=2", "model.seq_len=16", "training.batch_size=1",
                                 "parallel.dp=8", "parallel.bucket_cap_mb=2"});
  std::vector<int64_t> sizes;
  const auto& g = a.step->graph;
  for (const auto& st : g.storages()) {
    if (g.tensor(st.first).name.rfind("ddp.bucket", 0) == 0) sizes.push_back(st.bytes);
  }
  REQUIRE(sizes.size() >= 3);
  int64_t total = 0;
  for (int64_t s : sizes) total += s;
  CHECK(total == a.params_bytes);
  CHECK(sizes[0] >= 1024 * 1024);
  CHECK(sizes[0] < 1024 * 1024 + 256 * 50257 * 4);
  for (size_t i = 1; i + 1 < sizes.size(); ++i) CHECK(sizes[i] >= 2 * 1024 * 1024);
  // A step over 8 ranks inside a node takes longer than one without data parallelism.
  const study::Analysis one = run({"model.d_model=256", "model.n_heads=4", "model.n_layers=2", "model.seq_len=16", "training.batch_size=1"});
  CHECK(a.result.step_time_ns > one.result.step_time_ns);
}

TEST_CASE("bad parallel combinations are one-line errors naming the key", "[parallel][scenario]") {
  CHECK_THAT(message({"parallel.dp=0"}), Catch::Contains("parallel.dp") && Catch::Contains("positive"));
  CHECK_THAT(message({"parallel.dp=2", "parallel.sharding=zero9"}), Catch::Contains("parallel.sharding"));
  CHECK_THAT(message({"parallel.sharding=zero2"}), Catch::Contains("parallel.sharding") && Catch::Contains("dp > 1"));
  CHECK_THAT(message({"training.master_weights=fp32"}), Catch::Contains("training.master_weights"));
  CHECK_THAT(message({"training.master_weights=fp32", "training.dtype=bf16", "training.optimizer=sgd"}),
             Catch::Contains("training.optimizer"));
  CHECK_THAT(message({"parallel.bucket_cap_mb=5"}), Catch::Contains("parallel.bucket_cap_mb"));
  CHECK_THAT(message({"parallel.dp=2", "parallel.sharding=zero1", "parallel.gradient_as_bucket_view=true"}),
             Catch::Contains("parallel.gradient_as_bucket_view"));
  CHECK_THAT(message({"parallel.dp=2", "parallel.bucket_cap_mb=0"}), Catch::Contains("parallel.bucket_cap_mb"));
  // dp2: no_sync belongs to DDP with accumulation; ZeRO with accumulation is not lowered
  CHECK_THAT(message({"parallel.dp=2", "parallel.no_sync=false"}),
             Catch::Contains("parallel.no_sync") && Catch::Contains("grad_accum_steps > 1"));
  CHECK_THAT(message({"parallel.dp=2", "parallel.sharding=zero1", "training.grad_accum_steps=2", "training.dtype=bf16",
                      "training.master_weights=fp32"}),
             Catch::Contains("parallel.sharding") && Catch::Contains("accumulation"));
  CHECK_THAT(message({"parallel.dp=2", "parallel.sharding=zero2", "training.autocast=bf16"}),
             Catch::Contains("autocast"));
  CHECK(message({"parallel.dp=2", "training.grad_accum_steps=2", "parallel.no_sync=false"}) == "no error");
  // fsdp: ZeRO-3 without tensor or pipeline parallelism; FSDP2 not lowered yet
  CHECK_THAT(message({"parallel.dp=2", "parallel.sharding=zero3", "parallel.tp=2"}),
             Catch::Contains("parallel.tp") && Catch::Contains("zero3"));
  CHECK_THAT(message({"parallel.dp=2", "parallel.sharding=zero3", "parallel.pp=2"}),
             Catch::Contains("parallel.pp") && Catch::Contains("zero3"));
  CHECK_THAT(message({"parallel.dp=2", "parallel.sharding=fsdp2"}),  // fsdp2: gpt2's vocabulary 50257 on 2 ranks
             Catch::Contains("model.vocab_size") && Catch::Contains("not lowered"));
  CHECK_THAT(message({"parallel.sharding=zero3"}), Catch::Contains("dp > 1"));
  CHECK(message({"parallel.dp=2", "parallel.sharding=zero3"}) == "no error");
  // end fsdp
  CHECK(message({"parallel.dp=2", "training.autocast=bf16", "training.trainable=frozen:wte"}) == "no error");
  for (const auto& m : {message({"parallel.dp=0"}), message({"parallel.sharding=zero2"}),
                        message({"parallel.dp=2", "parallel.no_sync=false"})}) {
    CHECK(m.find('\n') == std::string::npos);
  }
}

TEST_CASE("DDP with gradient accumulation: no_sync reduces in the last micro-batch only", "[parallel][ddp]") {
  // Checked to the byte by tests/torch/test_parallel.py (DDP + accumulation, LoRA-style frozen
  // parameters, autocast); here the structure: which backwards all-reduce.
  const std::vector<std::string> base{"runtime.profile=torch2-cpu", "model.vocab_size=97", "model.seq_len=16",
                                      "model.d_model=32", "model.n_heads=4", "model.n_layers=2",
                                      "training.batch_size=2", "training.optimizer_impl=for_loop", "parallel.dp=2",
                                      "training.grad_accum_steps=3"};
  auto with = [&](std::vector<std::string> more) {
    std::vector<std::string> s = base;
    s.insert(s.end(), more.begin(), more.end());
    return run(s);
  };
  auto count = [](const study::Analysis& a, graph::OpKind kind, const std::string& name) {
    int n = 0;
    for (const auto& op : a.step->graph.ops()) n += op.kind == kind && op.name.find(name) != std::string::npos;
    return n;
  };
  const study::Analysis quiet = with({});
  const study::Analysis loud = with({"parallel.no_sync=false"});
  // two micro-batches are lowered (the first, and one standing for the later ones)
  CHECK(count(quiet, graph::OpKind::all_reduce, "ddp.bucket") == 1);     // the last backward's only
  CHECK(count(loud, graph::OpKind::all_reduce, "ddp.bucket") == 2);      // every backward's
  CHECK(count(quiet, graph::OpKind::all_gather, "ddp.broadcast_buffers") == 1);  // the first forward's
  CHECK(count(loud, graph::OpKind::all_gather, "ddp.broadcast_buffers") == 2);
  CHECK(count(loud, graph::OpKind::bucket_copy, "ddp.finalize") == 2);
  // the same persistent buckets either way
  CHECK(quiet.grads_bytes == loud.grads_bytes);
  CHECK(quiet.result.live_step_start == loud.result.live_step_start);
  // frozen parameters get no bucket space: the bucket holds the trainable parameters' gradients
  const study::Analysis frozen = with({"training.trainable=frozen:wte,wpe"});
  int64_t bucket = 0;
  const auto& g = frozen.step->graph;
  for (const auto& st : g.storages()) {
    if (g.tensor(st.first).name.rfind("ddp.bucket", 0) == 0) bucket += st.bytes;
  }
  int64_t trainable = 0;
  for (auto p : frozen.step->params) {
    if (g.tensor(p).requires_grad) trainable += g.storage(g.tensor(p).storage).bytes;
  }
  CHECK(bucket == trainable);
  CHECK(bucket < frozen.params_bytes);
}

// ---- zero_redundancy (issue 13): torch's ZeroRedundancyOptimizer ----------------------------
TEST_CASE("ZeroRedundancyOptimizer: the greedy partition of whole parameters, largest first", "[parallel][zero_redundancy]") {
  // _partition_parameters: sorted by numel (largest first, stable), each to the rank with the fewest
  // elements so far, the lowest such rank on a tie.
  CHECK(graph::zero_redundancy_partition({10, 30, 20, 30}, 2) == std::vector<int64_t>{1, 0, 0, 1});
  CHECK(graph::zero_redundancy_partition({1, 1, 4}, 2) == std::vector<int64_t>{1, 1, 0});  // not round-robin in order
  CHECK(graph::zero_redundancy_partition({5, 5, 5}, 4) == std::vector<int64_t>{0, 1, 2});  // rank 3 gets none
  CHECK(graph::zero_redundancy_partition({}, 2).empty());
}

TEST_CASE("ZeroRedundancyOptimizer: this rank's state only, in the parameters' dtype, a class per partition",
          "[parallel][zero_redundancy]") {
  const std::vector<std::string> base{"runtime.profile=torch2-cpu", "model.vocab_size=97", "model.seq_len=16",
                                      "model.d_model=32", "model.n_heads=4", "model.n_layers=2",
                                      "training.batch_size=2", "training.optimizer_impl=for_loop", "parallel.dp=2"};
  auto with = [&](std::vector<std::string> more) {
    std::vector<std::string> s = base;
    s.insert(s.end(), more.begin(), more.end());
    return run(s);
  };
  const study::Analysis ddp = with({});
  const study::Analysis zr = with({"parallel.sharding=zero1", "parallel.zero_impl=torch"});
  REQUIRE(zr.zero_ranks);
  const auto& classes = zr.zero_ranks->classes;
  REQUIRE(classes.size() == 2);  // the two ranks' partitions differ
  auto of = [&](size_t c) -> const study::Analysis& { return classes[c].analysis ? *classes[c].analysis : zr; };
  // Measured by tests/torch/test_parallel.py (gpt2 base, fp32 AdamW, 2 ranks): 116,552 and 116,264
  // bytes of state (exp_avg, exp_avg_sq in fp32 and a 4-byte 'step' per parameter of the partition).
  CHECK(of(0).optimizer_bytes == 116'552);
  CHECK(of(1).optimizer_bytes == 116'264);
  CHECK(of(0).optimizer_bytes + of(1).optimizer_bytes == ddp.optimizer_bytes);
  CHECK(classes[0].params + classes[1].params == ddp.param_count);
  for (size_t c = 0; c < 2; ++c) {
    // DDP's full gradients and buckets on every rank; only the state differs
    CHECK(of(c).grads_bytes == ddp.grads_bytes);
    CHECK(of(c).result.live_step_start == ddp.result.live_step_start - ddp.optimizer_bytes + of(c).optimizer_bytes);
  }
  CHECK(zr.zero_ranks->worst == 0);  // rank 0 holds more state, the same activations
  const nlohmann::json j = report::to_json(zr, -1);
  REQUIRE(j["ranks"].size() == 2);
  CHECK(j["ranks"][1]["coordinates"]["dp_ranks"] == nlohmann::json::array({1}));
  CHECK(j["ranks"][1]["figures"]["optimizer_bytes"] == 116'264);
  CHECK(j["peak"] == j["ranks"][j["peak_rank_class"].get<int>()]["figures"]["peak"]);
  CHECK(j["parallel"]["zero_impl"] == "torch");
  // The state is in the parameters' dtype (no fp32 master copy): bf16 moments, fp32 'step' scalars.
  const study::Analysis bf = with({"parallel.sharding=zero1", "parallel.zero_impl=torch", "training.dtype=bf16"});
  int64_t state = 0, n = 0;
  for (const auto& k : bf.zero_ranks->classes) state += (k.analysis ? *k.analysis : bf).optimizer_bytes;
  for (auto p : bf.step->params) n += bf.step->graph.tensor(p).requires_grad;
  CHECK(state == 2 * bf.params_bytes + 4 * n);
  // the updated parameters are broadcast from their owners after the local step, on stream 2
  int broadcasts = 0;
  for (const auto& op : zr.step->graph.ops()) {
    if (op.name.find(".params.broadcast") != std::string::npos) broadcasts += op.stream == 2;
  }
  CHECK(broadcasts == 2);
}

TEST_CASE("ZeroRedundancyOptimizer: ranks with equal partitions share a class", "[parallel][zero_redundancy]") {
  const study::Analysis a = run({"runtime.profile=torch2-cpu", "model.vocab_size=97", "model.seq_len=16",
                                 "model.d_model=32", "model.n_heads=4", "model.n_layers=4", "training.batch_size=2",
                                 "parallel.dp=8", "parallel.sharding=zero1", "parallel.zero_impl=torch"});
  REQUIRE(a.zero_ranks);
  int64_t ranks = 0, elements = 0;
  std::vector<int64_t> numels;
  for (auto p : a.step->params) numels.push_back(graph::numel(a.step->graph.tensor(p).shape));
  const std::vector<int64_t> part = graph::zero_redundancy_partition(numels, 8);
  for (const auto& k : a.zero_ranks->classes) {
    ranks += static_cast<int64_t>(k.ranks.size());
    elements += k.params * static_cast<int64_t>(k.ranks.size());
    for (int64_t r : k.ranks) {
      int64_t mine = 0;
      for (size_t i = 0; i < numels.size(); ++i) mine += part[i] == r ? numels[i] : 0;
      CHECK(mine == k.params);
    }
  }
  CHECK(ranks == 8);
  CHECK(elements == a.param_count);
  CHECK(a.zero_ranks->classes.size() < 8);  // some ranks hold the same sizes
}

TEST_CASE("ZeroRedundancyOptimizer: the trace has one process per rank class, its peak the class's", "[parallel][zero_redundancy][trace]") {
  const study::Analysis a = run({"runtime.profile=torch2-cpu", "model.vocab_size=97", "model.seq_len=16",
                                 "model.d_model=32", "model.n_heads=4", "model.n_layers=4", "training.batch_size=2",
                                 "parallel.dp=8", "parallel.sharding=zero1", "parallel.zero_impl=torch"});
  REQUIRE(a.zero_ranks);
  const size_t n = a.zero_ranks->classes.size();
  REQUIRE(n > 1);
  const nlohmann::json j = report::to_json(a, -1);
  const nlohmann::json tr = nlohmann::json::parse(report::zero_redundancy_trace_json(a));
  std::map<int64_t, std::string> names;
  std::map<int64_t, int64_t> peak, marker, slices;
  for (const auto& e : tr["traceEvents"]) {
    const int64_t pid = e["pid"];
    if (e["ph"] == "M" && e["name"] == "process_name") names[pid] = e["args"]["name"];
    if (e["ph"] == "C" && e["name"] == "memory.total") peak[pid] = std::max(peak[pid], e["args"]["bytes"].get<int64_t>());
    if (e["ph"] == "i") marker[pid] = e["args"]["bytes"];
    if (e["ph"] == "X") ++slices[pid];
  }
  REQUIRE(names.size() == n);
  bool differ = false;
  for (size_t c = 0; c < n; ++c) {
    const int64_t pid = static_cast<int64_t>(c) + 1;
    const int64_t want = j["ranks"][c]["figures"]["peak"]["bytes"];
    CHECK_THAT(names[pid], Catch::StartsWith(fmt::format("rank class {}: dp {}", c, a.zero_ranks->classes[c].ranks.front())));
    CHECK(peak[pid] == want);
    CHECK(marker[pid] == want);
    CHECK(slices[pid] > 0);
    differ = differ || want != j["ranks"][0]["figures"]["peak"]["bytes"].get<int64_t>();
  }
  CHECK(differ);  // the classes are told apart, not one process drawn n times
  CHECK(tr["metadata"]["peak_bytes"] == j["peak"]["bytes"]);
  CHECK(tr["metadata"]["rank_classes"] == n);
}

TEST_CASE("ZeroRedundancyOptimizer: bad combinations are one-line errors naming the key", "[parallel][zero_redundancy][scenario]") {
  CHECK_THAT(message({"parallel.dp=2", "parallel.zero_impl=torch"}),
             Catch::Contains("parallel.zero_impl") && Catch::Contains("zero1"));
  CHECK_THAT(message({"parallel.dp=2", "parallel.sharding=zero1", "parallel.zero_impl=megatron"}),
             Catch::Contains("parallel.zero_impl") && Catch::Contains("deepspeed"));
  CHECK_THAT(message({"parallel.dp=2", "parallel.sharding=zero1", "parallel.zero_impl=torch", "training.dtype=bf16",
                      "training.master_weights=fp32"}),
             Catch::Contains("training.master_weights"));
  CHECK_THAT(message({"parallel.dp=2", "parallel.sharding=zero1", "parallel.zero_impl=torch", "parallel.tp=2"}),
             Catch::Contains("parallel.tp"));
  CHECK_THAT(message({"parallel.dp=2", "parallel.sharding=zero1", "parallel.zero_impl=torch", "parallel.pp=2"}),
             Catch::Contains("parallel.pp"));
  // DDP's own keys and the local optimizer's implementation are torch's to choose
  CHECK(message({"parallel.dp=2", "parallel.sharding=zero1", "parallel.zero_impl=torch",
                 "parallel.gradient_as_bucket_view=true", "training.optimizer_impl=foreach"}) == "no error");
  CHECK(message({"parallel.dp=2", "parallel.sharding=zero1", "parallel.zero_impl=deepspeed"}) == "no error");
}

// ---- fsdp2 (issue 13): FSDP2's fully_shard (lower_fsdp.cpp) ----
TEST_CASE("FSDP2: shards P/N, optimizer 2P/N + 4k, and what each phase adds", "[parallel][fsdp2]") {
  // tests/torch/test_parallel.py's gpt2 (vocab 96, divisible by the 2 ranks), fp32 AdamW for-loop,
  // torch2-cpu: measured to the byte by measure_dist.py parallel=fsdp2 (README, Data parallelism).
  const std::vector<std::string> base{"runtime.profile=torch2-cpu", "model.vocab_size=96", "model.seq_len=16",
                                      "model.d_model=32", "model.n_heads=4", "model.n_layers=2",
                                      "training.batch_size=2", "training.optimizer_impl=for_loop"};
  auto with = [&](std::vector<std::string> more) {
    std::vector<std::string> s = base;
    s.insert(s.end(), more.begin(), more.end());
    return run(s);
  };
  const study::Analysis one = run(base);
  const study::Analysis f = with({"parallel.dp=2", "parallel.sharding=fsdp2"});
  const study::Analysis keep = with({"parallel.dp=2", "parallel.sharding=fsdp2", "parallel.reshard_after_forward=false"});
  const int64_t P = one.params_bytes, k = static_cast<int64_t>(one.step->params.size());
  CHECK(P == 116224);
  CHECK(f.params_bytes == P / 2);
  CHECK(f.optimizer_bytes == 2 * (P / 2) + 4 * k);  // exp_avg, exp_avg_sq on the shard; a 4-byte step each
  CHECK(f.grads_bytes == P / 2);                    // the reduce-scatter outputs' views
  // step start: parameters, buffers, optimizer state, inputs and the device mesh's rank map (N int32)
  CHECK(f.result.live_step_start ==
        f.params_bytes + f.optimizer_bytes + one.buffers_bytes + one.inputs_bytes + 4 * 2);
  CHECK(f.result.live_step_start == 177016);
  // end of forward: the activations of one rank (resharded: no parameter left unsharded); without
  // resharding every unit's unsharded parameters stay (P more)
  CHECK(f.result.live_end_forward - f.result.live_step_start ==
        one.result.live_end_forward - one.result.live_step_start);
  CHECK(keep.result.live_end_forward == f.result.live_end_forward + P);
  // end of backward: the gradient shards and the loss
  CHECK(f.result.live_end_backward == f.result.live_step_start + P / 2 + 4);
  CHECK(keep.result.live_end_backward == f.result.live_end_backward);
  CHECK(f.result.live_end_step == f.result.live_step_start + 4);
  // The peaks measured: block 0's prefetch (its flat output and gloo's temporary of the same
  // size, 2 x 50,816) while block 1's backward starts; without resharding, the forward's loss.
  CHECK(f.result.peak_bytes == 509840);
  CHECK(f.result.peak_phase == graph::Phase::backward);
  CHECK(keep.result.peak_bytes == 526224);
  CHECK(keep.result.peak_phase == graph::Phase::forward);
  // Collectives on the communication stream: the root and each block gathered before its forward
  // and again (resharded) in backward, one reduce-scatter per unit; none gathered again without
  // resharding.
  auto count = [](const study::Analysis& a, graph::OpKind kind) {
    int n = 0;
    for (const auto& op : a.step->graph.ops()) {
      if (op.kind == kind) {
        ++n;
        CHECK(op.stream == 2);
      }
    }
    return n;
  };
  CHECK(count(f, graph::OpKind::all_gather) == 6);
  CHECK(count(f, graph::OpKind::reduce_scatter) == 3);
  CHECK(count(keep, graph::OpKind::all_gather) == 3);
  CHECK(count(keep, graph::OpKind::reduce_scatter) == 3);
}

TEST_CASE("FSDP2: bad combinations are one-line errors naming the key", "[parallel][fsdp2][scenario]") {
  const std::vector<std::string> ok{"parallel.dp=2", "parallel.sharding=fsdp2", "model.vocab_size=96"};
  auto plus = [&](std::initializer_list<std::string> more) {
    std::vector<std::string> s = ok;
    s.insert(s.end(), more);
    return message(s);
  };
  CHECK(message(ok) == "no error");
  CHECK(plus({"parallel.reshard_after_forward=false"}) == "no error");
  CHECK_THAT(message({"parallel.dp=2", "parallel.reshard_after_forward=false"}),
             Catch::Contains("parallel.reshard_after_forward") && Catch::Contains("fsdp2"));
  CHECK_THAT(message({"parallel.dp=2", "parallel.sharding=fsdp2", "model.vocab_size=97"}),
             Catch::Contains("model.vocab_size") && Catch::Contains("not divisible"));
  CHECK_THAT(plus({"parallel.tp=2"}), Catch::Contains("parallel.tp"));
  CHECK_THAT(plus({"parallel.pp=2"}), Catch::Contains("parallel.pp"));
  CHECK_THAT(plus({"training.grad_accum_steps=2"}), Catch::Contains("accumulation"));
  CHECK_THAT(plus({"training.autocast=bf16"}), Catch::Contains("autocast"));
  CHECK_THAT(plus({"training.trainable=frozen:wte"}), Catch::Contains("training.trainable"));
  CHECK_THAT(plus({"training.optimizer=sgd"}), Catch::Contains("training.optimizer"));
  CHECK_THAT(plus({"training.dtype=bf16", "training.master_weights=fp32"}), Catch::Contains("training.master_weights"));
  for (const auto& m : {message({"parallel.dp=2", "parallel.sharding=fsdp2"}), plus({"parallel.tp=2"})}) {
    CHECK(m.find('\n') == std::string::npos);
  }
}
// ---- end fsdp2 ----
