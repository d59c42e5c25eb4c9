// training.autocast (issue 12, recipe 1): torch.autocast's op lists per profile, the casts the
// builder's entry points make (the weight-cast cache, the loss's float32 path), type promotion,
// validate_outputs' grad.to(dtype), and torch.amp.GradScaler's tensors. The byte-exact figures come
// from real PyTorch (tests/torch: autocast=bf16|fp16 on 2.13, bf16 on 1.13).
#include <catch2/catch.hpp>

#include <string>
#include <vector>

#include "actsim/graph/profile.hpp"
#include "actsim/study/analyze.hpp"
#include "actsim/study/scenario.hpp"
#include "actsim/util/error.hpp"

using namespace actsim;
using graph::CastPolicy;
using graph::DType;
using graph::OpKind;
using graph::ProfileId;

namespace {

// tests/torch/test_against_torch.py's BASE configuration.
study::Scenario tiny(std::vector<std::string> sets) {
  std::vector<std::string> all{"model.vocab_size=97", "model.seq_len=16", "model.d_model=32", "model.n_heads=4",
                               "model.n_layers=2", "training.batch_size=2", "model.dropout=0",
                               "training.optimizer_impl=for_loop",
                               "runtime.cpu_isa=avx2"};  // the machine the oracle figures were measured on
  all.insert(all.end(), sets.begin(), sets.end());
  return study::load_scenario("", all);
}

int count_ops(const graph::Graph& g, OpKind k, const std::string& name, bool recompute) {
  int n = 0;
  for (const graph::Op& op : g.ops()) {
    if (op.kind == k && op.recompute == recompute && op.name.find(name) != std::string::npos) ++n;
  }
  return n;
}

}  // namespace

TEST_CASE("graph::profile: autocast op lists per profile", "[graph][profile][autocast]") {
  for (ProfileId id : {ProfileId::torch_cpu, ProfileId::torch2_cpu, ProfileId::torch_cuda}) {
    const graph::RuntimeProfile& p = graph::profile(id);
    CHECK(p.autocast_policy(OpKind::mm) == CastPolicy::lower_precision_fp);
    CHECK(p.autocast_policy(OpKind::addmm) == CastPolicy::lower_precision_fp);
    CHECK(p.autocast_policy(OpKind::bmm) == CastPolicy::lower_precision_fp);
    CHECK(p.autocast_policy(OpKind::nll_loss) == CastPolicy::fp32);  // the loss's float32 path
    CHECK(p.autocast_policy(OpKind::gelu_tanh) == CastPolicy::none);
    CHECK(p.autocast_policy(OpKind::add) == CastPolicy::none);
    for (const graph::AutocastRule& r : p.autocast_rules()) CHECK_FALSE(r.aten.empty());
    CHECK(p.autocast_supports(DType::f32));
    CHECK(p.autocast_supports(DType::bf16));
  }
  const graph::RuntimeProfile& cpu = graph::profile(ProfileId::torch2_cpu);
  const graph::RuntimeProfile& cuda = graph::profile(ProfileId::torch_cuda);
  // CPU: softmax and LayerNorm run in the input's dtype; stack promotes. CUDA: they run in float32.
  CHECK(cpu.autocast_policy(OpKind::softmax) == CastPolicy::none);
  CHECK(cpu.autocast_policy(OpKind::layer_norm) == CastPolicy::none);
  CHECK(cpu.autocast_policy(OpKind::stack) == CastPolicy::promote);
  CHECK(cuda.autocast_policy(OpKind::softmax) == CastPolicy::fp32_set_opt_dtype);
  CHECK(cuda.autocast_policy(OpKind::layer_norm) == CastPolicy::fp32);
  // PyTorch 1.13's CPU autocast accepts bf16 only.
  CHECK_FALSE(graph::profile(ProfileId::torch_cpu).autocast_supports(DType::f16));
  CHECK(cpu.autocast_supports(DType::f16));
  CHECK(cuda.autocast_supports(DType::f16));
}

TEST_CASE("autocast bf16: each weight is cast once and saved in bf16, gradients stay float32",
          "[lower][autocast]") {
  for (const char* fam : {"model.family=gpt2", "model.family=llama"}) {
    INFO(fam);
    const bool gpt2 = std::string(fam) == "model.family=gpt2";
    study::Analysis a = study::analyze(tiny({fam, "runtime.profile=torch2-cpu", "training.autocast=bf16"}));
    const graph::Graph& g = a.step->graph;
    // gpt2: c_attn, c_proj, c_fc, mlp.c_proj weights and biases per block, and the tied lm_head
    // (wte, cast once although the embedding reads it too); llama: q, k, v, o, w1, w2, w3 and lm_head.
    const int per_block = gpt2 ? 8 : 7;
    CHECK(count_ops(g, OpKind::cast, "autocast.weight_cast", false) == 2 * per_block + 1);
    int saved_bf16_weights = 0;
    for (const graph::Op& op : g.ops()) {
      if (op.kind == OpKind::cast && op.name.find("weight_cast") != std::string::npos) {
        CHECK(g.tensor(op.outputs[0]).dtype == DType::bf16);
        CHECK(g.tensor(op.inputs[0]).dtype == DType::f32);
      }
      if (op.kind == OpKind::mm || op.kind == OpKind::addmm || op.kind == OpKind::bmm) {
        for (graph::TensorId t : op.saved) {
          CHECK(g.tensor(t).dtype == DType::bf16);
          const graph::Storage& st = g.storage(g.tensor(t).storage);
          if (st.producer != graph::kNoOp && g.op(st.producer).name.find("weight_cast") != std::string::npos) {
            ++saved_bf16_weights;
          }
        }
      }
    }
    CHECK(saved_bf16_weights == 2 * per_block + 1 - (gpt2 ? 4 * 2 : 0));  // biases are not saved
    for (graph::TensorId gr : a.step->param_grads) CHECK(g.tensor(gr).dtype == DType::f32);
    CHECK(g.tensor(a.step->loss).dtype == DType::f32);  // cross_entropy runs in float32
  }
}

TEST_CASE("autocast: the figures real PyTorch 2.13 measured", "[lower][autocast]") {
  // tests/torch/measure.py --mode both autocast=bf16 (gpt2) / family=llama n_kv_heads=2 / autocast=fp16
  study::Analysis g = study::analyze(tiny({"runtime.profile=torch2-cpu", "training.autocast=bf16"}));
  CHECK(g.saved_bytes == 158292);
  CHECK(g.result.peak_bytes == 534344);
  CHECK(g.result.live_end_forward == 509512);
  study::Analysis l = study::analyze(
      tiny({"model.family=llama", "model.n_kv_heads=2", "runtime.profile=torch2-cpu", "training.autocast=bf16"}));
  CHECK(l.result.peak_bytes == 579884);
  // fp16 has bf16's sizes plus GradScaler: _scale and _growth_tracker (8 B from step start) and the
  // scaled loss, alive through backward.
  study::Analysis h = study::analyze(tiny({"runtime.profile=torch2-cpu", "training.autocast=fp16"}));
  CHECK(h.saved_bytes == g.saved_bytes);
  CHECK(h.result.live_step_start == g.result.live_step_start + 8);
  CHECK(h.result.live_end_forward == g.result.live_end_forward + 8);
  CHECK(h.result.peak_bytes == 534356);
  CHECK(h.result.live_end_step == g.result.live_end_step + 8);
  CHECK(h.optimizer_bytes == g.optimizer_bytes);  // the scaler's state is not the optimizer's
  int unscale = 0;
  for (const graph::Op& op : h.step->graph.ops()) {
    if (op.name.find("_amp_foreach_non_finite_check_and_unscale_") != std::string::npos) ++unscale;
  }
  CHECK(unscale == 1);  // one (device, dtype) group: every gradient is float32 on one device
}

TEST_CASE("autocast under checkpointing: recompute casts the weights again", "[lower][autocast][checkpoint]") {
  study::Analysis a = study::analyze(
      tiny({"runtime.profile=torch2-cpu", "training.autocast=bf16", "model.n_layers=3", "checkpoint.policy=full"}));
  const graph::Graph& g = a.step->graph;
  // Every block's weights and biases, the last addmm's bias too: its autocast wrapper casts all
  // three arguments before addmm packs its inputs, where the recompute stops (PyTorch 2.13's
  // trace shows two 64 B bias casts per recomputed block).
  CHECK(count_ops(g, OpKind::cast, "autocast.weight_cast", true) == 3 * 8);
  CHECK(a.result.peak_bytes == 713584);  // real PyTorch 2.13, torch.utils.checkpoint(use_reentrant=False)
}

TEST_CASE("study::load_scenario: training.autocast values", "[scenario][autocast]") {
  CHECK(tiny({}).training.autocast == DType::f32);
  CHECK(tiny({"training.autocast=none"}).training.autocast == DType::f32);
  CHECK(tiny({"training.autocast=fp16"}).training.autocast == DType::f16);
  CHECK_THROWS_WITH(tiny({"training.autocast=fp8"}), Catch::Contains("training.autocast"));
  CHECK_THROWS_AS(tiny({"training.autocast=fp8"}), InputError);
  CHECK_THROWS_WITH(tiny({"runtime.profile=torch-cpu", "training.autocast=fp16"}),
                    Catch::Contains("training.autocast") && Catch::Contains("bf16 only"));
  CHECK_NOTHROW(tiny({"runtime.profile=torch-cpu", "training.autocast=bf16"}));
}

TEST_CASE("fp16 autocast with accumulation: every micro-batch scales its loss, one unscale_ at the step",
          "[lower][autocast][accum]") {
  // tests/torch/test_against_torch.py GRID2: family=llama autocast=fp16 grad_accum_steps=3 n_kv_heads=2
  study::Analysis a = study::analyze(tiny({"runtime.profile=torch2-cpu", "training.autocast=fp16",
                                           "training.grad_accum_steps=3", "model.family=llama",
                                           "model.n_kv_heads=2"}));
  int scale = 0, unscale = 0, update = 0;
  for (const graph::Op& op : a.step->graph.ops()) {
    if (op.kind == OpKind::mul && op.name.find("grad_scaler") != std::string::npos) ++scale;
    if (op.name.find("_amp_foreach_non_finite_check_and_unscale_") != std::string::npos) ++unscale;
    if (op.name.find("_amp_update_scale_") != std::string::npos) ++update;
  }
  CHECK(scale == 2);  // the first micro-batch and the one that stands for the later ones
  CHECK(unscale == 1);
  CHECK(update == 1);
  CHECK(a.result.peak_bytes == 697528);  // real PyTorch 2.13
  study::Analysis b = study::analyze(tiny({"runtime.profile=torch2-cpu", "training.autocast=bf16",
                                           "training.grad_accum_steps=3", "model.family=llama",
                                           "model.n_kv_heads=2"}));
  CHECK(a.result.live_step_start == b.result.live_step_start + 8);  // _scale and _growth_tracker
}
