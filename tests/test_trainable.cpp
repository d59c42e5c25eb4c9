// Trainable subsets (issue 12, recipe 3): frozen parameters by name pattern and peft's LoRA
// (graph/src/lower_lora.cpp), with figures derived by hand from ../shared/reference/models.py and
// peft 0.21.2's lora.Linear.
#include <catch2/catch.hpp>

#include <string>
#include <vector>

#include "actsim/graph/lower.hpp"
#include "actsim/graph/trainable.hpp"
#include "actsim/study/analyze.hpp"
#include "actsim/study/scenario.hpp"
#include "actsim/util/error.hpp"

using namespace actsim;
using namespace actsim::graph;

namespace {

std::vector<std::string> small(const std::string& family, std::vector<std::string> more = {}) {
  std::vector<std::string> o{"model.family=" + family, "model.vocab_size=97", "model.seq_len=16",
                             "model.d_model=32",       "model.n_heads=4",     "model.n_layers=2",
                             "training.batch_size=2",  "runtime.profile=torch2-cpu"};
  o.insert(o.end(), more.begin(), more.end());
  return o;
}

study::Analysis analyze_small(const std::string& family, std::vector<std::string> more = {}) {
  return study::analyze(study::load_scenario("", small(family, std::move(more))));
}

int64_t trainable_elements(const StepGraph& s) {
  int64_t n = 0;
  for (TensorId p : s.params) {
    if (s.graph.tensor(p).requires_grad) n += numel(s.graph.tensor(p).shape);
  }
  return n;
}

std::string error_of(const std::vector<std::string>& overrides) {
  try {
    study::load_scenario("", overrides);
  } catch (const InputError& e) {
    return e.what();
  }
  return "";
}

}  // namespace

TEST_CASE("graph::pattern_matches: whole names, module prefixes and globs", "[trainable]") {
  CHECK(pattern_matches("wte", "wte.weight"));
  CHECK(pattern_matches("wte.weight", "wte.weight"));
  CHECK_FALSE(pattern_matches("wt", "wte.weight"));
  CHECK(pattern_matches("blocks.1", "blocks.1.attn.c_attn.weight"));
  CHECK_FALSE(pattern_matches("blocks.1", "blocks.10.attn.c_attn.weight"));  // a module, not a text prefix
  CHECK(pattern_matches("blocks.*.ln_?", "blocks.3.ln_2.bias"));
  CHECK(pattern_matches("*bias", "blocks.0.mlp.c_fc.bias"));
  CHECK_FALSE(pattern_matches("*bias", "blocks.0.mlp.c_fc.weight"));
}

TEST_CASE("graph::expand_braces: {a..b} is the integers a to b, a bad brace is refused", "[trainable]") {
  CHECK(*expand_braces("blocks.{0..2}") == std::vector<std::string>{"blocks.0", "blocks.1", "blocks.2"});
  CHECK(*expand_braces("wte") == std::vector<std::string>{"wte"});
  CHECK(*expand_braces("blocks.{3..3}.attn") == std::vector<std::string>{"blocks.3.attn"});
  CHECK_FALSE(expand_braces("blocks.{2..1}"));
  CHECK_FALSE(expand_braces("blocks.{a..b}"));
  CHECK_FALSE(expand_braces("blocks.{0..1"));
  CHECK_FALSE(expand_braces("blocks.0}"));
}

TEST_CASE("graph::lora_target_matches: peft's rule, the name or a '.'-separated suffix", "[trainable]") {
  CHECK(lora_target_matches("c_proj", "blocks.0.attn.c_proj"));
  CHECK(lora_target_matches("c_proj", "blocks.0.mlp.c_proj"));
  CHECK(lora_target_matches("attn.c_proj", "blocks.0.attn.c_proj"));
  CHECK_FALSE(lora_target_matches("attn.c_proj", "blocks.0.mlp.c_proj"));
  CHECK_FALSE(lora_target_matches("proj", "blocks.0.attn.c_proj"));
  CHECK(lora_target_matches("lm_head", "lm_head"));
}

TEST_CASE("graph::model_names: named_parameters() and the Linear modules, as PyTorch names them", "[trainable]") {
  ModelConfig m;
  m.vocab_size = 97, m.seq_len = 16, m.d_model = 32, m.n_heads = 4, m.n_layers = 2;
  const ModelNames n = model_names(m, profile(ProfileId::torch2_cpu));
  REQUIRE(n.parameters.size() == 2 + 12 * 2 + 2);  // the tied weight once, as wte.weight
  CHECK(n.parameters.front() == "wte.weight");
  CHECK(n.parameters[4] == "blocks.0.attn.c_attn.weight");
  CHECK(n.linear_modules == std::vector<std::string>{"blocks.0.attn.c_attn", "blocks.0.attn.c_proj",
                                                     "blocks.0.mlp.c_fc", "blocks.0.mlp.c_proj",
                                                     "blocks.1.attn.c_attn", "blocks.1.attn.c_proj",
                                                     "blocks.1.mlp.c_fc", "blocks.1.mlp.c_proj", "lm_head"});
}

TEST_CASE("lower: LoRA r=4 on gpt2's c_attn trains only A and B, the optimizer holds state for them alone",
          "[trainable]") {
  study::Analysis all = analyze_small("gpt2");
  study::Analysis a = analyze_small("gpt2", {"training.trainable=lora", "lora.targets=c_attn", "lora.r=4"});
  // Per block: A (4 x 32) and B (96 x 4) = 512 elements; 2 blocks.
  CHECK(trainable_elements(*a.step) == 1024);
  CHECK(a.param_count == all.param_count + 1024);
  CHECK(a.params_bytes == all.params_bytes + 1024 * 4);
  CHECK(a.grads_bytes == 1024 * 4);
  // AdamW: exp_avg and exp_avg_sq per trainable element, and a 4-byte 'step' per trainable tensor.
  CHECK(a.optimizer_bytes == 2 * 1024 * 4 + 4 * 4);
  // named_parameters() order: each adapter's A and B follow their base weight.
  const Tensor& after = a.step->graph.tensor(a.step->params[5]);
  CHECK(after.name == "blocks.0.attn.c_attn.lora_A.default.weight");
  CHECK(after.requires_grad);
  CHECK_FALSE(a.step->graph.tensor(a.step->params[4]).requires_grad);
  // Every frozen parameter has no gradient.
  for (size_t i = 0; i < a.step->params.size(); ++i) {
    CHECK((a.step->param_grads[i] != kNoTensor) == a.step->graph.tensor(a.step->params[i]).requires_grad);
  }
}

TEST_CASE("lower: a frozen base linear saves nothing of its input, LoRA's A saves it instead", "[trainable]") {
  study::Analysis a = analyze_small("gpt2", {"training.trainable=lora", "lora.targets=c_fc"});
  const Graph& g = a.step->graph;
  int base = 0, lora_a = 0;
  for (const Op& op : g.ops()) {
    if (op.phase != Phase::forward) continue;
    int activations = 0;
    for (TensorId t : op.saved) activations += g.storage(g.tensor(t).storage).category == Category::activation;
    if (op.name == "blocks.1.mlp.c_fc.addmm") {
      ++base;
      CHECK(activations == 0);  // mat1 is kept only when mat2 (the frozen weight) needs a gradient
      CHECK(op.saved.size() == 1);  // the weight's transpose, for the input's gradient
    }
    if (op.name == "blocks.1.mlp.c_fc.lora_A.default.mm") {
      ++lora_a;
      CHECK(activations == 1);  // the layer norm's output, for A's gradient
    }
  }
  CHECK(base == 1);
  CHECK(lora_a == 1);
}

TEST_CASE("lower: all-linear targets the reference lm_head too (peft's rule for a plain nn.Module)", "[trainable]") {
  study::Analysis a = analyze_small("llama", {"training.trainable=lora", "lora.targets=all-linear", "lora.r=2"});
  // llama small: d 32, ff 88, kv heads 4, vocab 97. Per block q,k,v,o: 4 * (2*32 + 32*2);
  // w1, w3: 2 * (2*32 + 88*2); w2: 2*88 + 32*2. lm_head: 2*32 + 97*2.
  const int64_t block = 4 * 128 + 2 * 240 + 240;
  CHECK(trainable_elements(*a.step) == 2 * block + 258);
}

TEST_CASE("lower: frozen:PATTERNS freezes the named parameters: no gradient, no optimizer state", "[trainable]") {
  study::Analysis all = analyze_small("gpt2");
  study::Analysis f = analyze_small("gpt2", {"training.trainable=frozen:wte,wpe,blocks.{0..0}"});
  // wte 97*32 (tied with lm_head), wpe 16*32, one block 12,704.
  const int64_t frozen = 97 * 32 + 16 * 32 + 12'704;
  CHECK(f.param_count == all.param_count);
  CHECK(trainable_elements(*f.step) == all.param_count - frozen);
  CHECK(f.grads_bytes == (all.param_count - frozen) * 4);
  CHECK(f.optimizer_bytes == 2 * (all.param_count - frozen) * 4 + 4 * (28 - 2 - 12));
  // Nothing before block 1 requires grad, so block 0 saves nothing.
  CHECK(f.per_layer_saved[0] == 0);
  CHECK(f.per_layer_saved[1] == all.per_layer_saved[1]);
}

TEST_CASE("lower: training.trainable = all changes nothing", "[trainable]") {
  study::Analysis a = analyze_small("llama");
  study::Analysis b = analyze_small("llama", {"training.trainable=all", "lora.r=4"});
  CHECK(a.result.peak_bytes == b.result.peak_bytes);
  CHECK(a.saved_bytes == b.saved_bytes);
  CHECK(a.step->graph.ops().size() == b.step->graph.ops().size());
}

TEST_CASE("study::load_scenario: trainable subsets that name nothing are one-line errors at their key", "[trainable]") {
  CHECK(error_of(small("gpt2", {"training.trainable=lora", "lora.targets=q_proj"})) ==
        "--set: lora.targets: \"q_proj\" names no Linear module (this model's: c_attn, c_proj, c_fc, lm_head; or all-linear)");
  CHECK(error_of(small("gpt2", {"training.trainable=frozen:wte,blocks.7"})).rfind(
            "--set: training.trainable: pattern \"blocks.7\" names no parameter", 0) == 0);
  CHECK(error_of(small("gpt2", {"training.trainable=frozen:*"})) ==
        "--set: training.trainable: freezes every parameter: nothing would train");
  CHECK(error_of(small("gpt2", {"training.trainable=frozen:"})).find("an empty pattern") != std::string::npos);
  CHECK(error_of(small("gpt2", {"training.trainable=partial"})).find("one of: all, lora, frozen:PATTERNS") !=
        std::string::npos);
  CHECK(error_of(small("gpt2", {"lora.r=0"})) == "--set: lora.r: must be a positive integer, got 0");
  CHECK(error_of(small("gpt2", {"lora.alpha=-1"})).find("must be positive") != std::string::npos);
  CHECK(error_of(small("gpt2", {"lora.dropout=1"})).find("[0, 1)") != std::string::npos);
  // The default targets exist in both reference families.
  CHECK(error_of(small("gpt2", {"training.trainable=lora"})).empty());
  CHECK(error_of(small("llama", {"training.trainable=lora"})).empty());
}

TEST_CASE("study::load_scenario: LoRA on Hugging Face models: hf_llama families yes, Conv1D gpt2 refused", "[trainable]") {
  const std::string hf = std::string(ACTSIM_SOURCE_DIR) + "/scenarios/hf/";
  auto with = [&](const std::string& config, std::vector<std::string> more) {
    std::vector<std::string> o{"model.hf_config=" + hf + config, "model.n_layers=2", "model.seq_len=16",
                               "training.batch_size=1", "runtime.profile=torch2-cpu"};
    o.insert(o.end(), more.begin(), more.end());
    return o;
  };
  CHECK(error_of(with("qwen3-0.6b.json", {"training.trainable=lora"})).empty());
  CHECK(error_of(with("qwen3-0.6b.json", {"training.trainable=lora", "lora.targets=all-linear"})).empty());
  CHECK(error_of(with("gpt2.json", {"model.attention=eager", "training.trainable=lora"})).find("LoRA is lowered for the gpt2, llama and hf_llama") !=
        std::string::npos);
  CHECK(error_of(with("gpt2.json", {"model.attention=eager", "training.trainable=frozen:transformer.wte,transformer.h.0"})).empty());
  // Phi3 fuses q, k and v: peft's llama default names nothing there.
  CHECK(error_of(with("phi-3-mini-4k.json", {"training.trainable=lora"})).find("set lora.targets") != std::string::npos);
  CHECK(error_of(with("phi-3-mini-4k.json", {"training.trainable=lora", "lora.targets=qkv_proj"})).empty());
  // all-linear leaves a transformers model's output layer out (peft's rule for a PreTrainedModel).
  study::Analysis a = study::analyze(study::load_scenario(
      "", with("qwen3-0.6b.json", {"training.trainable=lora", "lora.targets=all-linear", "lora.r=2"})));
  for (TensorId p : a.step->params) {
    CHECK(a.step->graph.tensor(p).name.rfind("lm_head.lora", 0) != 0);
  }
}

TEST_CASE("study::analyze: a checkpointed frozen block saves only its argument, as _NoopSaveInputs packs it",
          "[trainable]") {
  // PyTorch 2.13 (tests/torch, frozen:wte,wpe,blocks.0 with checkpoint full and mlp): block 0
  // saves 4,096 B, the (2, 16, 32) fp32 argument of its checkpoint call, and nothing else.
  for (const char* policy : {"checkpoint.policy=full", "checkpoint.policy=mlp"}) {
    study::Analysis f = analyze_small("gpt2", {"training.trainable=frozen:wte,wpe,blocks.0", "model.n_layers=3", policy});
    CHECK(f.per_layer_saved[0] == 2 * 16 * 32 * 4);
  }
}

TEST_CASE("lower: under autocast peft copies a bf16 input to lora_A's float32 dtype, the recomputation keeps it",
          "[trainable][autocast][checkpoint]") {
  // x = self._cast_input_dtype(x, lora_A.weight.dtype): the MLP product and the attention output
  // reach o_proj and down_proj in bf16, the norm outputs reach the others in float32.
  study::Analysis a = analyze_small("llama", {"training.trainable=lora", "lora.targets=all-linear",
                                              "training.autocast=bf16", "checkpoint.policy=full",
                                              "model.dropout=0", "training.optimizer_impl=for_loop",
                                              "runtime.cpu_isa=avx2"});
  int copies = 0;
  for (const Op& op : a.step->graph.ops()) {
    if (op.phase == Phase::forward && op.name.find("cast_input_dtype") != std::string::npos) {
      ++copies;
      CHECK(a.step->graph.tensor(op.outputs[0]).dtype == DType::f32);
    }
  }
  CHECK(copies == 2 * 2);  // o_proj and down_proj of both blocks
  // Real PyTorch 2.13 (tests/torch GRID2): the recomputation runs up to its last saved tensor,
  // the frozen base linear and peft's float32 copy included, and keeps the LoRA weights' casts
  // in its weight-cast cache until it stops.
  CHECK(a.result.peak_bytes == 410096);
}
