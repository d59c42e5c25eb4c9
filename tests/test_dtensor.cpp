// Tests of DTensor tensor and sequence parallelism (issue 13, parallel.tp_impl = "dtensor",
// graph/src/lower_dtensor.cpp): what DTensor saves and holds where Megatron-LM's layers do not,
// its collectives, and the combinations refused. tests/torch/test_parallel.py checks the same
// lowering against real DTensor on 2 gloo ranks, to the byte.
#include <catch2/catch.hpp>
#include <fmt/format.h>

#include <string>
#include <vector>

#include "actsim/study/analyze.hpp"
#include "actsim/study/scenario.hpp"
#include "actsim/util/error.hpp"

using namespace actsim;

namespace {

study::Analysis run(const std::vector<std::string>& sets) { return study::analyze(study::load_scenario("", sets)); }

constexpr int64_t kS = 64, kH = 256, kB = 2, kV = 1024;

// llama in bf16 on CUDA, flash attention; t ranks of tensor parallelism as `impl` builds them.
std::vector<std::string> llama(int64_t t, bool sp, const char* impl) {
  std::vector<std::string> v{"model.family=llama", "runtime.profile=torch-cuda", "training.dtype=bf16",
                             "model.attention=flash", "model.d_model=" + std::to_string(kH), "model.n_heads=8",
                             "model.n_layers=2", "model.vocab_size=" + std::to_string(kV),
                             "model.seq_len=" + std::to_string(kS), "training.batch_size=" + std::to_string(kB),
                             "device.name=H100-SXM-80GB",
                             // torch.optim's foreach fails on a mix of DTensor and plain parameters
                             // (the norms without sp): the per-parameter loop, for both
                             "training.optimizer_impl=for_loop"};
  if (t > 1) {
    v.push_back(fmt::format("parallel.tp={}", t));
    v.push_back(fmt::format("parallel.tp_impl={}", impl));
  }
  if (sp) v.push_back("parallel.sp=true");
  return v;
}

std::string error_of(const std::vector<std::string>& sets) {
  try {
    (void)study::load_scenario("", sets);
  } catch (const InputError& e) {
    return e.what();
  }
  return "";
}

int count(const study::Analysis& an, graph::OpKind k, int32_t layer) {
  int n = 0;
  for (const auto& op : an.step->graph.ops()) n += op.kind == k && op.layer == layer && op.kernels > 0;
  return n;
}

}  // namespace

TEST_CASE("DTensor with sp saves the all-gathered input of q/k/v and w1/w3: t times Megatron's shard", "[dtensor]") {
  for (int64_t t : {2, 4, 8}) {
    INFO("t=" << t);
    const study::Analysis meg = run(llama(t, true, "megatron"));
    const study::Analysis dt = run(llama(t, true, "dtensor"));
    // Megatron saves the [b, s/t, h] shard and gathers it again in backward; DTensor's matmuls
    // save the gathered [b, s, h] (PrepareModuleInput's all-gather), once for q/k/v and once for
    // w1/w3: per layer 2 sbh (1 - 1/t) more elements, in bf16.
    const int64_t shard = kB * kS / t * kH * 2, full = kB * kS * kH * 2;
    REQUIRE(meg.per_layer_saved.size() == dt.per_layer_saved.size());
    for (size_t i = 0; i < dt.per_layer_saved.size(); ++i) {
      CHECK(dt.per_layer_saved[i] - meg.per_layer_saved[i] == 2 * (full - shard));
    }
    // Without sp both save the full norm output: the same bytes per layer.
    const study::Analysis meg0 = run(llama(t, false, "megatron"));
    const study::Analysis dt0 = run(llama(t, false, "dtensor"));
    for (size_t i = 0; i < dt0.per_layer_saved.size(); ++i) CHECK(dt0.per_layer_saved[i] == meg0.per_layer_saved[i]);
  }
}

TEST_CASE("DTensor: shards without vocabulary padding and a full-vocabulary embedding gradient", "[dtensor]") {
  const int64_t t = 4, d = kH, kv = kH, ff = 688;  // llama's default d_ff for d_model 256
  const study::Analysis dt = run(llama(t, false, "dtensor"));
  const int64_t block = (d * d + 2 * kv * d + d * d + 3 * ff * d) / t + 2 * d;
  CHECK(dt.param_count == 2 * (kV / t) * d + 2 * block + d);  // Megatron pads 1,024 rows to 1,024 too
  // RowwiseParallel's embedding backward runs on the Replicate gradient: the weight's .grad is
  // [V, h], not the [V/t, h] shard (t times the shard's bytes, kept until zero_grad).
  bool found = false;
  for (const auto& op : dt.step->graph.ops()) {
    if (op.phase != graph::Phase::backward || op.name != "tok_embeddings.embedding.backward") continue;
    REQUIRE(op.grad_outputs.size() == 1);
    CHECK(dt.step->graph.tensor(op.grad_outputs[0]).shape == graph::Shape{kV, d});
    found = true;
  }
  CHECK(found);
  const study::Analysis meg = run(llama(t, false, "megatron"));
  CHECK(dt.result.live_end_backward - meg.result.live_end_backward >= (kV - kV / t) * d * 2);
}

TEST_CASE("DTensor: collectives per layer", "[dtensor]") {
  const int64_t t = 4;
  const study::Analysis tp = run(llama(t, false, "dtensor"));
  const study::Analysis sp = run(llama(t, true, "dtensor"));
  // Without sp: forward, o_proj's and w2's partial outputs all-reduced; backward, each of q, k,
  // v, w1 and w3 all-reduces its own input gradient (from_local per module): 7 (Megatron: 4).
  CHECK(count(tp, graph::OpKind::all_reduce, 0) == 7);
  CHECK(count(tp, graph::OpKind::all_gather, 0) == 0);
  // With sp: 2 all-gathers and 2 reduce-scatters forward, their duals backward.
  CHECK(count(sp, graph::OpKind::all_reduce, 0) == 0);
  CHECK(count(sp, graph::OpKind::all_gather, 0) == 4);
  CHECK(count(sp, graph::OpKind::reduce_scatter, 0) == 4);
  for (const auto& op : sp.step->graph.ops()) {
    if (graph::is_collective(op.kind) && op.layer >= 0) CHECK(op.params.group_size == t);
  }
  // loss_parallel: no Megatron vocab-parallel all-reduce ops; the loss's backward is one node.
  for (const auto& op : tp.step->graph.ops()) CHECK(op.name.find("vocab_parallel_ce") == std::string::npos);
}

TEST_CASE("DTensor: bad combinations are one line naming the key", "[dtensor]") {
  auto with = [](std::vector<std::string> more) {
    std::vector<std::string> v = llama(2, false, "dtensor");
    v.insert(v.end(), more.begin(), more.end());
    return error_of(v);
  };
  CHECK(with({}).empty());
  CHECK(with({"runtime.profile=torch2-cpu"}).empty());  // gloo on the CPU, as the oracle runs it
  CHECK(with({"model.vocab_size=1001"}).find("does not divide model.vocab_size = 1001") != std::string::npos);
  CHECK(with({"model.family=gpt2"}).find("parallel.tp_impl: DTensor tensor parallelism is lowered for the llama") !=
        std::string::npos);
  CHECK(with({"runtime.profile=torch-cpu", "model.attention=eager", "training.dtype=fp32"}).find("needs PyTorch 2") !=
        std::string::npos);
  CHECK(with({"training.optimizer_impl=foreach"}).find("training.optimizer_impl: the foreach optimizer fails") !=
        std::string::npos);
  CHECK(with({"training.optimizer_impl=foreach", "parallel.sp=true"}).empty());
  CHECK(with({"parallel.dp=2"}).find("2-D mesh") != std::string::npos);
  CHECK(with({"checkpoint.policy=full"}).find("checkpoint.policy: activation checkpointing with DTensor") !=
        std::string::npos);
  CHECK(error_of({"model.family=llama", "parallel.tp_impl=dtensor"}).find("tp_impl needs parallel.tp > 1") !=
        std::string::npos);
}
