// Invariants of the lowering (graph/lower.cpp, autodiff.cpp) with figures derived by hand from
// ../shared/reference/models.py.
#include <catch2/catch.hpp>

#include <algorithm>
#include <set>
#include <string>
#include <vector>

#include "actsim/graph/lower.hpp"
#include "actsim/graph/profile.hpp"
#include "actsim/study/analyze.hpp"
#include "actsim/study/resolve.hpp"
#include "actsim/study/scenario.hpp"
#include "actsim/sim/device.hpp"
#include "actsim/sim/engine.hpp"

using namespace actsim;
using namespace actsim::graph;

namespace {

// The small configuration tests/torch measures by default: vocab 97, seq 16, d 32, 4 heads, 2 layers.
std::vector<std::string> small(const std::string& family, std::vector<std::string> more = {}) {
  std::vector<std::string> o{"model.family=" + family, "model.vocab_size=97", "model.seq_len=16",
                             "model.d_model=32",       "model.n_heads=4",     "model.n_layers=2",
                             "training.batch_size=2"};
  o.insert(o.end(), more.begin(), more.end());
  return o;
}

study::Analysis analyze_small(const std::string& family, std::vector<std::string> more = {}) {
  return study::analyze(study::load_scenario("", small(family, std::move(more))));
}

int64_t param_elements(const StepGraph& s) {
  int64_t n = 0;
  for (TensorId p : s.params) n += numel(s.graph.tensor(p).shape);
  return n;
}

const Tensor* find_param(const StepGraph& s, const std::string& name) {
  for (TensorId p : s.params) {
    if (s.graph.tensor(p).name == name) return &s.graph.tensor(p);
  }
  return nullptr;
}

}  // namespace

// ---- parameter counts ---------------------------------------------------------------------------

TEST_CASE("lower: gpt2 small (tied) has 29,088 parameters, 116,352 bytes in fp32", "[lowering]") {
  // wte 97*32 + wpe 16*32 + 2 blocks * (ln_1 64 + c_attn 32*96+96 + c_proj 32*32+32 + ln_2 64
  // + c_fc 32*128+128 + c_proj 128*32+32) + ln_f 64 = 3104 + 512 + 2*12704 + 64; lm_head is wte.
  // 116,352 bytes is what real PyTorch reports for this model.
  study::Analysis a = analyze_small("gpt2");
  CHECK(a.param_count == 29'088);
  CHECK(a.params_bytes == 116'352);
  CHECK(a.step->params.size() == 2 + 12 * 2 + 2);  // the tied weight once
  // Buffers: one (1, 1, 16, 16) float mask per block.
  CHECK(a.buffers_bytes == 2 * 16 * 16 * 4);
  // Inputs: idx and targets, int64 (2, 16).
  CHECK(a.inputs_bytes == 2 * 2 * 16 * 8);
  // AdamW: exp_avg and exp_avg_sq per parameter; the 'step' scalars live on the host (torch-cuda).
  CHECK(a.optimizer_bytes == 2 * 116'352);
  CHECK(a.optimizer_host_bytes == static_cast<int64_t>(a.step->params.size()) * 4);

  study::Analysis bf = analyze_small("gpt2", {"training.dtype=bf16"});
  CHECK(bf.params_bytes == 29'088 * 2);
  study::Analysis untied = analyze_small("gpt2", {"model.tie_embeddings=false"});
  CHECK(untied.param_count == 29'088 + 97 * 32);
}

TEST_CASE("lower: llama small (untied, GQA) parameter count", "[lowering]") {
  // d_ff = 8 * ceil(int(2*4*32/3) / 8) = 88; hd = 8.
  // Per block: 2 norms 64 + wq 1024 + wk, wv kv*8*32 + wo 1024 + w1, w2, w3 3*88*32 = 8448.
  // Model: tok_embeddings 3104 + blocks + norm 32 + lm_head 3104.
  CHECK(default_d_ff(Family::llama, 32) == 88);
  study::Analysis mha = analyze_small("llama");
  CHECK(mha.param_count == 3104 + 2 * (64 + 1024 + 2 * 1024 + 1024 + 8448) + 32 + 3104);  // 31,456
  CHECK(mha.params_bytes == 31'456 * 4);
  study::Analysis gqa = analyze_small("llama", {"model.n_kv_heads=2"});
  CHECK(gqa.param_count == 3104 + 2 * (64 + 1024 + 2 * 512 + 1024 + 8448) + 32 + 3104);  // 29,408
  CHECK(gqa.params_bytes == 117'632);
  CHECK(gqa.step->params.size() == 1 + 9 * 2 + 1 + 1);
  // RoPE tables: one shared (16, 4) cos and sin pair, fp32.
  CHECK(gqa.buffers_bytes == 2 * 16 * 4 * 4);
}

TEST_CASE("lower: GQA llama has k/v weights of n_kv_heads * head_dim rows", "[lowering]") {
  ModelConfig m;
  m.family = Family::llama;
  m.vocab_size = 97;
  m.seq_len = 16;
  m.d_model = 32;
  m.n_heads = 4;
  m.n_layers = 2;
  TrainingConfig t;
  t.batch_size = 2;
  StepGraph mha = lower_forward(m, t, profile(ProfileId::torch_cuda));
  m.n_kv_heads = 2;
  StepGraph gqa = lower_forward(m, t, profile(ProfileId::torch_cuda));
  for (const char* w : {"attn.k_proj.weight", "attn.v_proj.weight"}) {
    const std::string name = std::string("blocks.1.") + w;
    REQUIRE(find_param(mha, name) != nullptr);
    REQUIRE(find_param(gqa, name) != nullptr);
    CHECK(find_param(mha, name)->shape == Shape{32, 32});
    CHECK(find_param(gqa, name)->shape == Shape{16, 32});
  }
  CHECK(find_param(gqa, "blocks.1.attn.q_proj.weight")->shape == Shape{32, 32});
  CHECK(find_param(gqa, "blocks.1.attn.o_proj.weight")->shape == Shape{32, 32});
  CHECK(param_elements(mha) - param_elements(gqa) == 2 * 2 * 16 * 32);
}

TEST_CASE("lower: the seed model (llama, 48 x 1600, untied) has 2,127,057,600 parameters", "[lowering]") {
  // Per block: 2*1600 + 4*1600^2 + 3*6400*1600 = 40,963,200; 48 blocks = 1,966,233,600;
  // embeddings and LM head 2 * 50257*1600 = 160,822,400; final norm 1600.
  study::Scenario s = study::load_scenario(
      "", {"model.family=llama", "model.vocab_size=50257", "model.seq_len=1024", "model.n_layers=48",
           "model.d_model=1600", "model.n_heads=25", "model.d_ff=6400", "training.batch_size=1"});
  CHECK_FALSE(s.model.tied());
  StepGraph f = lower_forward(s.model, s.training, profile(s.profile));
  CHECK(param_elements(f) == 2'127'057'600);
  CHECK(f.params.size() == 1 + 9 * 48 + 1 + 1);
}

// ---- attention --------------------------------------------------------------------------------

TEST_CASE("lower: flash attention saves no T x T tensor, eager saves the attention probabilities", "[lowering]") {
  const int64_t B = 2, h = 4, T = 16;
  for (const char* family : {"gpt2", "llama"}) {
    for (const char* attn : {"eager", "flash"}) {
      INFO(family << " " << attn);
      study::Analysis a = analyze_small(family, {std::string("model.attention=") + attn});
      const Graph& g = a.step->graph;
      int square_saved = 0, flash_ops = 0;
      for (const Op& op : g.ops()) {
        if (op.phase != Phase::forward) continue;
        if (op.kind == OpKind::flash_attention) ++flash_ops;
        for (TensorId t : op.saved) {
          const Tensor& tt = g.tensor(t);
          const Storage& st = g.storage(tt.storage);
          const bool scores = st.bytes == B * h * T * T * dtype_size(tt.dtype);
          const bool square = tt.shape.size() >= 2 && tt.shape[tt.shape.size() - 1] == T &&
                              tt.shape[tt.shape.size() - 2] == T;
          if (scores || (square && st.category == Category::activation && numel(tt.shape) >= B * h * T * T)) {
            ++square_saved;
          }
        }
      }
      if (std::string(attn) == "flash") {
        CHECK(square_saved == 0);
        CHECK(flash_ops == 2);
      } else {
        CHECK(square_saved >= 2);  // at least the softmax output of each block
        CHECK(flash_ops == 0);
      }
    }
  }
  // And flash keeps less: the probabilities (and the scaled scores' scalar) are gone.
  CHECK(analyze_small("gpt2", {"model.attention=flash"}).saved_bytes <
        analyze_small("gpt2", {"model.attention=eager"}).saved_bytes);
}

// ---- dropout ----------------------------------------------------------------------------------

TEST_CASE("lower: dropout p = 0 emits no dropout ops, p > 0 emits one per nn.Dropout call", "[lowering]") {
  for (const char* prof : {"torch-cuda", "torch-cpu"}) {
    INFO(prof);
    study::Analysis none = analyze_small("gpt2", {std::string("runtime.profile=") + prof});
    study::Analysis some = analyze_small("gpt2", {std::string("runtime.profile=") + prof, "model.dropout=0.1"});
    auto count = [](const Graph& g) {
      int n = 0;
      for (const Op& op : g.ops()) n += op.kind == OpKind::dropout_noise || op.kind == OpKind::native_dropout;
      return n;
    };
    CHECK(count(none.step->graph) == 0);
    CHECK(count(some.step->graph) == 1 + 3 * 2);  // drop, then attn/resid/mlp dropout per block
    CHECK(some.saved_bytes > none.saved_bytes);
  }
}

// ---- graph-wide invariants ----------------------------------------------------------------------

TEST_CASE("lower: every configuration lowers to a frozen graph that validates", "[lowering]") {
  int n = 0;
  for (const char* family : {"gpt2", "llama"}) {
    for (const char* prof : {"torch-cuda", "torch-cpu"}) {
      for (const char* attn : {"eager", "flash"}) {
        if (std::string(prof) == "torch-cpu" && std::string(attn) == "flash") continue;
        for (const char* dtype : {"fp32", "bf16"}) {
          for (const char* opt : {"adamw", "sgd", "sgd_momentum"}) {
            for (const char* impl : {"for_loop", "foreach", "fused"}) {
              if (std::string(prof) == "torch-cpu" && std::string(impl) == "fused") continue;
              std::vector<std::string> o = small(family, {std::string("runtime.profile=") + prof,
                                                          std::string("model.attention=") + attn,
                                                          std::string("training.dtype=") + dtype,
                                                          std::string("training.optimizer=") + opt,
                                                          std::string("training.optimizer_impl=") + impl});
              if (std::string(family) == "llama") o.push_back("model.n_kv_heads=2");
              else o.push_back("model.dropout=0.1");
              study::Scenario s = study::load_scenario("", o);
              StepGraph st = lower_training_step(s.model, s.training, profile(s.profile));
              INFO(family << " " << prof << " " << attn << " " << dtype << " " << opt << " " << impl);
              CHECK(st.graph.is_frozen());
              st.graph.validate();  // aborts on a broken invariant
              CHECK(st.graph.n_layers == 2);
              CHECK(st.optimizer_impl != OptimizerImpl::profile_default);
              ++n;
            }
          }
        }
      }
    }
  }
  CHECK(n == 2 * (2 * 2 * 3 * 3 + 1 * 2 * 3 * 2));
}

TEST_CASE("lower: ops are in phase order forward < backward < optimizer, ending with zero_grad", "[lowering]") {
  for (const char* family : {"gpt2", "llama"}) {
    for (const char* prof : {"torch-cuda", "torch-cpu"}) {
      INFO(family << " " << prof);
      study::Analysis a = analyze_small(family, {std::string("runtime.profile=") + prof});
      const Graph& g = a.step->graph;
      std::array<int, 3> per_phase{};
      Phase prev = Phase::forward;
      bool ordered = true;
      for (const Op& op : g.ops()) {
        ordered = ordered && op.phase >= prev;
        prev = op.phase;
        ++per_phase[static_cast<size_t>(op.phase)];
        if (op.kind == OpKind::backward || op.kind == OpKind::grad_seed) CHECK(op.phase == Phase::backward);
        if (op.kind == OpKind::optim_update) CHECK(op.phase == Phase::optimizer);
      }
      CHECK(ordered);
      CHECK(per_phase[0] > 0);
      CHECK(per_phase[1] > 0);
      CHECK(per_phase[2] > 0);
      CHECK(g.ops().back().kind == OpKind::zero_grad);
      CHECK(g.ops().front().phase == Phase::forward);
      // The loss is produced in the forward pass.
      REQUIRE(a.step->loss != kNoTensor);
      CHECK(g.op(g.tensor(a.step->loss).producer).phase == Phase::forward);
      // Simulated phase ends are ordered too.
      CHECK(a.result.phase_end_ns[0] <= a.result.phase_end_ns[1]);
      CHECK(a.result.phase_end_ns[1] <= a.result.phase_end_ns[2]);
    }
  }
}

TEST_CASE("lower: parameter gradients are category gradient with the parameters' bytes", "[lowering]") {
  for (const char* family : {"gpt2", "llama"}) {
    for (const char* dtype : {"fp32", "bf16"}) {
      INFO(family << " " << dtype);
      study::Analysis a = analyze_small(family, {std::string("training.dtype=") + dtype});
      const StepGraph& s = *a.step;
      const Graph& g = s.graph;
      REQUIRE(s.param_grads.size() == s.params.size());
      std::set<uint32_t> grad_storages;
      for (size_t i = 0; i < s.params.size(); ++i) {
        const Tensor& p = g.tensor(s.params[i]);
        INFO(p.name);
        REQUIRE(s.param_grads[i] != kNoTensor);
        const Tensor& gr = g.tensor(s.param_grads[i]);
        const Storage& gs = g.storage(gr.storage);
        CHECK(gs.category == Category::gradient);
        CHECK(gs.bytes == g.storage(p.storage).bytes);
        CHECK(gr.shape == p.shape);
        CHECK(gr.strides == p.strides);
        CHECK(gr.dtype == p.dtype);
        CHECK(gs.location == Location::device);
        CHECK(gs.producer != kNoOp);  // created during the step (set_to_none=True)
        CHECK(g.op(gs.producer).phase == Phase::backward);
        grad_storages.insert(index(gr.storage));
      }
      CHECK(grad_storages.size() == s.params.size());  // one storage each
      CHECK(a.grads_bytes == a.params_bytes);
      // zero_grad releases exactly these storages.
      const Op& z = g.ops().back();
      REQUIRE(z.kind == OpKind::zero_grad);
      CHECK(z.releases.size() == s.params.size());
      // No other storage is a gradient.
      int64_t gradient_bytes = 0;
      for (const Storage& st : g.storages()) {
        if (st.category == Category::gradient) gradient_bytes += st.bytes;
      }
      CHECK(gradient_bytes == a.params_bytes);
      // After zero_grad only what existed before the step is live, plus what the step produces
      // and keeps (the `loss` the caller still references): at most the 0-dim loss.
      int64_t kept = 0;
      for (size_t si = 0; si < g.storages().size(); ++si) {
        const StorageId sid{static_cast<uint32_t>(si)};
        if (g.storage(sid).producer != kNoOp && a.tables->is_persistent(sid)) kept += g.allocated(g.storage(sid).bytes);
      }
      CHECK(kept <= g.allocated(g.storage(g.tensor(s.loss).storage).bytes));
      CHECK(a.result.live_end_step == a.result.live_step_start + kept);
    }
  }
}

TEST_CASE("lower: every block saves the same bytes for backward", "[lowering]") {
  for (const char* family : {"gpt2", "llama"}) {
    for (const char* prof : {"torch-cuda", "torch-cpu"}) {
      for (const char* attn : {"eager", "flash"}) {
        if (std::string(prof) == "torch-cpu" && std::string(attn) == "flash") continue;
        INFO(family << " " << prof << " " << attn);
        study::Analysis a = analyze_small(
            family, {std::string("runtime.profile=") + prof, std::string("model.attention=") + attn,
                     "model.n_layers=4", std::string(family) == "gpt2" ? "model.dropout=0.1" : "model.n_kv_heads=2"});
        REQUIRE(a.per_layer_saved.size() == 4);
        CHECK(a.per_layer_saved[0] > 0);
        for (int64_t b : a.per_layer_saved) CHECK(b == a.per_layer_saved[0]);
        int64_t sum = a.outside_saved;
        for (int64_t b : a.per_layer_saved) sum += b;
        CHECK(sum == a.saved_bytes);
        // Linear in the batch size (no per-batch constant inside a block but the masks).
      }
    }
  }
}

TEST_CASE("lower: the gpt2 block saves what PyTorch keeps, counted by hand", "[lowering]") {
  // torch-cuda, fp32, B=2, T=16, C=32, h=4, no dropout, eager. Per block (bytes):
  //   ln_1: input x (B,T,C) 4096 + mean, rstd (B,T,1) 128 + 128
  //   c_attn addmm: input h (B*T,C) 4096            (the weight is a parameter, not counted)
  //   q @ k^T: q and k^T are strided views of qkv; matmul's reshape to (B*h, ., .) copies each
  //            (B,h,T,hd) 4096 + 4096, and bmm keeps the copies
  //   * scale: the wrapped 0-dim float64 scalar lives on the host on torch-cuda -> 0
  //   masked_fill: the bool mask (1,1,T,T) 256
  //   softmax: output (B,h,T,T) 8192
  //   att @ v: att (kept already), v copied contiguous 4096
  //   c_proj addmm: y contiguous (B*T,C) 4096
  //   ln_2: x + a (B,T,C) 4096, mean 128, rstd 128
  //   c_fc addmm: input 4096
  //   gelu: input (B,T,4C) 16384
  //   c_proj addmm: gelu output 16384
  const int64_t per_block = (4096 + 128 + 128)  // ln_1
                           + 4096                // c_attn input
                           + 4096 + 4096         // q and k^T copied contiguous by matmul's reshape
                           + 256                 // mask
                           + 8192                // softmax output
                           + 4096                // v copied contiguous
                           + 4096                // y.transpose(1, 2).contiguous()
                           + (4096 + 128 + 128)  // ln_2
                           + 4096                // c_fc input
                           + 16384               // gelu input
                           + 16384;              // gelu output
  CHECK(per_block == 74'496);
  study::Analysis a = analyze_small("gpt2");
  REQUIRE(a.per_layer_saved.size() == 2);
  CHECK(a.per_layer_saved[0] == per_block);
  CHECK(a.per_layer_saved[1] == per_block);
}

TEST_CASE("lower: torch-cpu saved bytes equal real PyTorch 1.13's for the small models", "[lowering]") {
  // Measured with tests/torch/measure.py --mode saved (Debian's torch 1.13, CPU): gpt2 defaults,
  // and family=llama n_kv_heads=2. On the CPU the wrapped 0-dim float64 scale (8 bytes) is
  // counted: the gpt2 block is the hand count above plus 8.
  study::Analysis g = analyze_small("gpt2", {"runtime.profile=torch-cpu"});
  CHECK(g.per_layer_saved == std::vector<int64_t>{74'504, 74'504});
  CHECK(g.outside_saved == 21'508);
  CHECK(g.saved_bytes == 170'516);
  study::Analysis l = analyze_small("llama", {"runtime.profile=torch-cpu", "model.n_kv_heads=2"});
  CHECK(l.per_layer_saved == std::vector<int64_t>{103'944, 103'944});
  CHECK(l.outside_saved == 29'444);
  CHECK(l.saved_bytes == 237'332);
}

// ---- unnamed lowering (LowerOptions::names = false) ----------------------------------------------

TEST_CASE("lower: an unnamed lowering is the named one without names, and simulates the same", "[lowering]") {
  int n = 0;
  for (const char* file : {"seed-gpt2-xl.toml", "gpt2-xl.toml", "hf/gpt2.toml", "hf/pythia-1.4b.toml",
                           "hf/qwen3-0.6b.toml", "hf/phi-3-mini-4k.toml"}) {
    for (const char* policy : {"none", "full", "selective", "offload", "mlp", "every:2", "\"ops:mm,bmm\""}) {
      study::Scenario s = study::load_scenario(
          sim::data_dir() + "/" + file, {"model.n_layers=2", "model.seq_len=32", "training.batch_size=2",
                                         std::string("checkpoint.policy=") + policy});
      const study::ResolvedStep r = study::resolve(s);
      const StepGraph a = lower_training_step(r.model, r.training, *r.runtime, &r.plan);
      const StepGraph b = lower_training_step(r.model, r.training, *r.runtime, &r.plan, {.names = false});
      INFO(file << " " << policy);
      const Graph &ga = a.graph, &gb = b.graph;
      REQUIRE(ga.n_ops() == gb.n_ops());
      REQUIRE(ga.tensors().size() == gb.tensors().size());
      REQUIRE(ga.storages().size() == gb.storages().size());
      bool same = true;
      size_t named_ops = 0, named_tensors = 0, made = 0;
      for (size_t i = 0; i < ga.n_ops(); ++i) {
        const Op &x = ga.ops()[i], &y = gb.ops()[i];
        same = same && x.kind == y.kind && x.phase == y.phase && x.layer == y.layer && x.inputs == y.inputs &&
               x.outputs == y.outputs && x.saved == y.saved && x.holds == y.holds && x.releases == y.releases &&
               x.workspace_bytes == y.workspace_bytes && x.flops == y.flops && x.bytes_moved == y.bytes_moved &&
               x.kernels == y.kernels && x.forward == y.forward && x.stream == y.stream && x.after == y.after &&
               x.region == y.region && x.recompute == y.recompute;
        named_ops += !y.name.empty() && y.name[0] != '.';
      }
      for (size_t i = 0; i < ga.tensors().size(); ++i) {
        const Tensor &x = ga.tensors()[i], &y = gb.tensors()[i];
        same = same && x.shape == y.shape && x.strides == y.strides && x.offset == y.offset && x.dtype == y.dtype &&
               x.storage == y.storage && x.producer == y.producer && x.is_view == y.is_view;
        // Leaves keep their names, and so do names derived from them (a parameter's ".grad").
        if (x.producer != kNoOp) ++made, named_tensors += !y.name.empty() && y.name[0] != '.';
      }
      for (size_t i = 0; i < ga.storages().size(); ++i) {
        const Storage &x = ga.storages()[i], &y = gb.storages()[i];
        same = same && x.bytes == y.bytes && x.category == y.category && x.location == y.location &&
               x.producer == y.producer && x.layer == y.layer && x.keep == y.keep;
      }
      CHECK(same);
      CHECK(named_ops * 10 < ga.n_ops());  // most go unnamed
      CHECK(named_tensors * 5 < made);  // the parameters' gradients keep "<param>.grad"
      const sim::SimResult ra = sim::simulate(sim::StepTables(ga, s.device));
      const sim::SimResult rb = sim::simulate(sim::StepTables(gb, s.device));
      CHECK(ra.peak_bytes == rb.peak_bytes);
      CHECK(ra.step_time_ns == rb.step_time_ns);
      CHECK(ra.events == rb.events);
      CHECK(ra.peak_by_category == rb.peak_by_category);
      ++n;
    }
  }
  CHECK(n == 6 * 7);
}
