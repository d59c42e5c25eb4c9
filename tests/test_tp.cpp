// Tests of tensor and sequence parallelism (issue 13, Megatron-LM's layers, lower_tp.cpp):
// Korthikanti et al.'s activations per layer, term by term, from actsim's simulated per-layer
// saved bytes; the per-rank parameters; the collectives; bad combinations of keys.
#include <catch2/catch.hpp>
#include <fmt/format.h>

#include <string>
#include <vector>

#include "actsim/study/analyze.hpp"
#include "actsim/study/make_schedule.hpp"
#include "actsim/study/pipeline.hpp"  // pprank: tp inside pipeline stages
#include "actsim/study/scenario.hpp"
#include "actsim/sim/engine.hpp"
#include "actsim/util/error.hpp"

using namespace actsim;

namespace {

study::Analysis run(const std::vector<std::string>& sets) { return study::analyze(study::load_scenario("", sets)); }

// Megatron-LM's setting (as tests/test_checkpoint.cpp's): gpt2, fp16, dropout > 0 with 1-byte
// masks (torch-cuda), eager attention; t ranks of tensor parallelism, with or without sp.
std::vector<std::string> megatron(int64_t s, int64_t h, int64_t a, int64_t b, int64_t t, bool sp) {
  std::vector<std::string> v{"model.family=gpt2", "runtime.profile=torch-cuda", "training.dtype=fp16",
                             "model.dropout=0.1", "model.attention=eager", "model.vocab_size=512",
                             "model.n_layers=2", "model.seq_len=" + std::to_string(s),
                             "model.d_model=" + std::to_string(h), "model.n_heads=" + std::to_string(a),
                             "training.batch_size=" + std::to_string(b), "device.name=H100-SXM-80GB"};
  if (t > 1) v.push_back(fmt::format("parallel.tp={}", t));
  if (sp) v.push_back("parallel.sp=true");
  return v;
}

struct Size {
  int64_t s, h, a, b;
};
const Size kSizes[] = {{128, 256, 8, 2}, {64, 512, 16, 1}, {256, 384, 24, 3}};

std::string error_of(const std::vector<std::string>& sets) {
  try {
    (void)study::load_scenario("", sets);
  } catch (const InputError& e) {
    return e.what();
  }
  return "";
}

}  // namespace

TEST_CASE("Korthikanti et al.: sbh(10 + 24/t + 5as/(ht)) per layer with tensor parallelism", "[tp]") {
  for (const Size& z : kSizes) {
    for (int64_t t : {1, 2, 4, 8}) {
      const auto [s, h, a, b] = z;
      INFO("s=" << s << " h=" << h << " a=" << a << " b=" << b << " t=" << t);
      const study::Analysis an = run(megatron(s, h, a, b, t, false));
      // Replicated on every rank (10 sbh): the two LayerNorms' inputs (4), their outputs read by
      // QKV and fc1 (4), the two dropout masks after the projections (2).
      const int64_t replicated = 10 * s * b * h;
      // Sharded over t (24 sbh / t): Q, K (4), V (2), the projection's input (2), fc1's output
      // (the GELU's input, 8) and the GELU's output (fc2's input, 8).
      const int64_t sharded = 24 * s * b * h / t;
      // The attention core on a/t heads (5 as^2 b / t): scores (2), softmax (2), its dropout mask (1).
      const int64_t core = 5 * a * s * s * b / t;
      // The reference's extras: the LayerNorms' fp32 mean and rstd (16 sb), and the s^2 bool mask.
      const int64_t extras = 16 * s * b + s * s;
      REQUIRE(s * b * h * 10 + 24 * s * b * h / t + 5 * a * s * s * b / t == replicated + sharded + core);
      for (int64_t kept : an.per_layer_saved) CHECK(kept == replicated + sharded + core + extras);
    }
  }
}

TEST_CASE("Korthikanti et al.: (sbh/t)(34 + 5as/h) per layer with sequence parallelism", "[tp]") {
  for (const Size& z : kSizes) {
    for (int64_t t : {2, 4, 8}) {
      const auto [s, h, a, b] = z;
      INFO("s=" << s << " h=" << h << " a=" << a << " b=" << b << " t=" << t);
      const study::Analysis an = run(megatron(s, h, a, b, t, true));
      // Every term divided by t: the norms, their inputs and dropouts run on s/t tokens; QKV and
      // fc1 save the sequence shard of their input (Megatron gathers it again in backward).
      const int64_t megatron_terms = s * b * h * 34 / t + 5 * a * s * s * b / t;
      const int64_t extras = 16 * s * b / t + s * s;  // LayerNorm statistics on s/t; the mask is not divided
      for (int64_t kept : an.per_layer_saved) CHECK(kept == megatron_terms + extras);
      // The gathered inputs are not saved: what sequence parallelism saves is exactly 1/t of the
      // 10 sbh that tensor parallelism alone replicates, and of the LayerNorm statistics.
      const study::Analysis no_sp = run(megatron(s, h, a, b, t, false));
      CHECK(no_sp.per_layer_saved[0] - an.per_layer_saved[0] == (10 * s * b * h + 16 * s * b) * (t - 1) / t);
    }
  }
}

TEST_CASE("tensor parallelism with checkpointing: full keeps each block's input shard, 2sbh/t", "[tp]") {
  const int64_t s = 64, h = 256, a = 8, b = 2, t = 4;
  std::vector<std::string> v = megatron(s, h, a, b, t, true);
  v.push_back("checkpoint.policy=full");
  const study::Analysis full = run(v);
  for (int64_t kept : full.per_layer_saved) CHECK(kept == 2 * s * b * h / t);
  // selective: the attention core (5as^2b/t) and the mask are recomputed
  v.back() = "checkpoint.policy=selective";
  const study::Analysis sel = run(v);
  const study::Analysis none = run(megatron(s, h, a, b, t, true));
  for (size_t i = 0; i < sel.per_layer_saved.size(); ++i) {
    CHECK(none.per_layer_saved[i] - sel.per_layer_saved[i] == 5 * a * s * s * b / t + s * s);
  }
}

TEST_CASE("tensor parallelism: per-rank parameters as Megatron-LM shards them", "[tp]") {
  // gpt2: the column/row-parallel weights and the column-parallel biases divided by t; the
  // LayerNorms, the row-parallel biases and the position embedding replicated; the word
  // embedding (tied lm_head) padded to a multiple of 128 t rows and divided.
  const int64_t s = 64, h = 256, a = 8, b = 1, L = 2, V = 512, ff = 4 * h;
  for (int64_t t : {1, 2, 4}) {
    INFO("t=" << t);
    const study::Analysis an = run(megatron(s, h, a, b, t, false));
    const int64_t Vp = t == 1 ? V : (V + 128 * t - 1) / (128 * t) * (128 * t);
    const int64_t per_block_sharded = (3 * h * h + 3 * h + h * h + ff * h + ff + h * ff) / t;
    const int64_t per_block_replicated = 4 * h /* two LayerNorms */ + 2 * h /* c_proj, mlp.c_proj biases */;
    const int64_t expected = Vp / t * h + s * h + L * (per_block_sharded + per_block_replicated) + 2 * h;
    CHECK(an.param_count == expected);
    CHECK(an.params_bytes == 2 * expected);
    CHECK(an.grads_bytes == 2 * expected);
  }
  // llama with grouped-query attention: q, k, v, o, w1, w2, w3 and the embeddings divided by t
  // (kv heads sharded), the RMSNorms replicated.
  const std::vector<std::string> llama{"model.family=llama", "runtime.profile=torch-cuda", "training.dtype=bf16",
                                       "model.d_model=256", "model.n_heads=8", "model.n_kv_heads=4",
                                       "model.n_layers=2", "model.vocab_size=1000", "model.seq_len=32",
                                       "training.batch_size=1"};
  const study::Analysis one = run(llama);
  std::vector<std::string> tp4 = llama;
  tp4.push_back("parallel.tp=4");
  tp4.push_back("parallel.sp=true");
  const study::Analysis four = run(tp4);
  const int64_t d = 256, kv = 4 * 32, ffl = 688;  // llama's default d_ff for d_model 256: 8 ceil(8d/3 / 8)
  const int64_t block = (d * d + 2 * kv * d + d * d + 3 * ffl * d) / 4 + 2 * d;
  CHECK(four.param_count == 2 * (1024 / 4) * d + 2 * block + d);
  CHECK(one.param_count == 2 * 1000 * d + 2 * (d * d + 2 * kv * d + d * d + 3 * ffl * d + 2 * d) + d);
  CHECK(four.result.peak_bytes < one.result.peak_bytes);
}

TEST_CASE("tensor parallelism: collectives per layer and their time", "[tp]") {
  const int64_t s = 64, h = 256, a = 8, b = 2, t = 4;
  const study::Analysis tp = run(megatron(s, h, a, b, t, false));
  const study::Analysis sp = run(megatron(s, h, a, b, t, true));
  auto count = [](const study::Analysis& an, graph::OpKind k, int32_t layer) {
    int n = 0;
    for (const auto& op : an.step->graph.ops()) n += op.kind == k && op.layer == layer && op.kernels > 0;
    return n;
  };
  // Megatron without sp: per layer, forward all-reduces after the attention projection and fc2,
  // backward all-reduces of the QKV and fc1 inputs' gradients: 4.
  CHECK(count(tp, graph::OpKind::all_reduce, 0) == 4);
  CHECK(count(tp, graph::OpKind::all_gather, 0) == 0);
  // with sp: 2 all-gathers and 2 reduce-scatters forward, the same backward (the re-gathers of
  // the saved shards are part of the linear's backward).
  CHECK(count(sp, graph::OpKind::all_reduce, 0) == 0);
  CHECK(count(sp, graph::OpKind::all_gather, 0) == 4);
  CHECK(count(sp, graph::OpKind::reduce_scatter, 0) == 4);
  for (const auto& op : sp.step->graph.ops()) {
    if (graph::is_collective(op.kind) && op.layer >= 0) {
      CHECK(op.params.group_size == t);
      CHECK(op.stream == 0);  // synchronous, on the compute stream
      CHECK(op.bytes_moved == s * b * h * 2);
    }
  }
  // Each collective takes the ring's time over t ranks on NVLink (t <= gpus_per_node): an all-reduce
  // 2(t-1)/t of its bytes in 2(t-1) latency steps, an all-gather or reduce-scatter half that.
  const sim::DeviceSpec& dev = sp.scenario.device;
  REQUIRE(dev.link_bandwidth > 0);
  for (const study::Analysis* an : {&tp, &sp}) {
    int checked = 0;
    for (const auto& op : an->step->graph.ops()) {
      if (!graph::is_collective(op.kind) || op.layer != 0 || op.kernels == 0) continue;
      const int64_t steps = op.kind == graph::OpKind::all_reduce ? 2 * (t - 1) : t - 1;
      const double ns = static_cast<double>(steps) / t * static_cast<double>(op.bytes_moved) / dev.link_bandwidth * 1e9 +
                        0.5 + static_cast<double>(steps * dev.link_latency_ns);
      CHECK(sim::op_time_ns(an->step->graph, op, dev) == static_cast<int64_t>(ns));
      ++checked;
    }
    CHECK(checked == 8 - 4 * (an == &tp));
  }
}

TEST_CASE("tensor parallelism: bad combinations are one line naming the key", "[tp]") {
  auto base = megatron(64, 256, 8, 1, 1, false);
  auto with = [&](std::vector<std::string> more) {
    std::vector<std::string> v = base;
    v.insert(v.end(), more.begin(), more.end());
    return error_of(v);
  };
  CHECK(with({"parallel.tp=3"}).find("parallel.tp = 3 does not divide model.n_heads = 8") != std::string::npos);
  CHECK(with({"parallel.sp=true"}).find("parallel.sp: sequence parallelism needs parallel.tp > 1") != std::string::npos);
  CHECK(with({"parallel.tp=2", "parallel.tp_impl=dtensor"}).find("parallel.tp_impl: DTensor") != std::string::npos);
  CHECK(with({"parallel.tp=0"}).find("parallel.tp: must be a tensor-parallel degree") != std::string::npos);
  CHECK(with({"parallel.tp=2", "runtime.profile=torch2-cpu"}).find("runs on CUDA") != std::string::npos);
  CHECK(with({"parallel.tp=2", "model.d_ff=1001"}).find("does not divide the MLP width 1001") != std::string::npos);
  CHECK(with({"parallel.tp=4", "parallel.sp=true", "model.seq_len=66"}).find("does not divide model.seq_len = 66") !=
        std::string::npos);
  CHECK(with({"parallel.tp=2", "training.grad_accum_steps=2"}).find("gradient accumulation") != std::string::npos);
  const std::string gqa = error_of({"model.family=llama", "runtime.profile=torch-cuda", "model.d_model=256",
                                    "model.n_heads=8", "model.n_kv_heads=2", "parallel.tp=4"});
  CHECK(gqa.find("does not divide the 2 key/value heads") != std::string::npos);
  // replay and --emit-schedule: one process cannot run the other ranks' collectives
  CHECK_THROWS_WITH(study::make_schedule(run(megatron(64, 256, 8, 1, 2, false))),
                    Catch::Contains("parallel.tp: schedules and replay of tensor-parallel steps"));
  const std::string hf = error_of({"model.family=hf_llama", "runtime.profile=torch-cuda", "parallel.tp=2"});
  CHECK(!hf.empty());
}

// ---- pprank (issue 13): tensor parallelism inside pipeline stages ----
TEST_CASE("tensor parallelism inside pipeline stages: lowered, tp's own refusals still apply", "[tp][pp]") {
  auto with = [](std::vector<std::string> more) {
    std::vector<std::string> v = megatron(64, 256, 8, 1, 1, false);
    v.insert(v.end(), more.begin(), more.end());
    return v;
  };
  for (const char* sp : {"parallel.sp=false", "parallel.sp=true"}) {
    CHECK(error_of(with({"parallel.tp=2", sp, "parallel.pp=2"})).empty());
    // The stage lowerings are one tp rank's: the two stages hold the tp-only lowering's parameters.
    const study::Analysis pp = run(with({"parallel.tp=2", sp, "parallel.pp=2"}));
    const study::Analysis tp = run(with({"parallel.tp=2", sp}));
    REQUIRE(pp.pipeline);
    int64_t params = 0;
    for (size_t st = 0; st < 2; ++st) params += pp.pipeline->kinds[pp.pipeline->stage_kinds[st][0]]->param_count;
    // gpt2 ties lm_head to wte: the last stage holds its own copy of the head's vocabulary shard
    // (512 rows, a multiple of 128 x 2 already: 256 per rank, d 256).
    CHECK(params == tp.param_count + (512 / 2) * 256);
  }
  CHECK(error_of(with({"parallel.tp=3", "parallel.pp=2"})).find("parallel.tp = 3 does not divide model.n_heads = 8") !=
        std::string::npos);
  CHECK(error_of(with({"parallel.tp=4", "parallel.sp=true", "model.seq_len=66", "parallel.pp=2"}))
            .find("does not divide model.seq_len = 66") != std::string::npos);
}
// ---- end pprank ----
