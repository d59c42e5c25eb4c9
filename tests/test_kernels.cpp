// The CPU reference kernels (backends/cpu/cpu_*.cpp, docs/kernels.md): every backward against
// central finite differences in fp64 on tiny lowered models (so each op is exercised exactly as
// the lowering and autodiff emit it, strides, saved tensors and pass-throughs included), bf16 and
// fp16 storage against fp32, the optimizer steps against their formulas, determinism, the RNG.
#include <catch2/catch.hpp>

#include <cmath>
#include <cstring>
#include <map>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "../backends/cpu/cpu_tensor.hpp"  // strided load/store: private to backends/, used as a test helper
#include "actsim/util/rng.hpp"
#include "actsim/graph/checkpoint.hpp"
#include "actsim/util/error.hpp"
#include "actsim/graph/lower.hpp"
#include "actsim/graph/profile.hpp"
#include "actsim/backends/backend.hpp"

using namespace actsim;
using namespace actsim::graph;
using backends::TensorArg;

namespace {

// Deterministic test data: a value in [-1, 1) for element i of the tensor named `name`, the same
// whatever the dtype or profile the graph was lowered for.
double test_value(const std::string& name, int64_t i) {
  uint64_t h = 1469598103934665603ull;
  for (char ch : name) h = (h ^ static_cast<unsigned char>(ch)) * 1099511628211ull;
  return 2.0 * util::rng_uniform(h, static_cast<uint64_t>(i)) - 1.0;
}

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// A replay of a whole step graph on one backend with one buffer per storage, nothing freed: the
// smallest executor that lets the tests run lowered graphs (the real one is replay/).
class Runner {
 public:
  Runner(const StepGraph& s, backends::Backend& be, const ModelConfig& m) : s_(s), g_(s.graph), be_(be), m_(m) {
    for (const Storage& st : g_.storages()) buf_.push_back(be_.alloc(std::max<int64_t>(st.bytes, 8)));
    init_leaves();
  }
  ~Runner() {
    for (void* p : buf_) be_.free(p);
  }
  Runner(const Runner&) = delete;
  Runner& operator=(const Runner&) = delete;

  TensorArg arg(TensorId t) const {
    const Tensor& tt = g_.tensor(t);
    return {.base = buf_[index(tt.storage)], .dtype = tt.dtype, .shape = tt.shape, .strides = tt.strides,
            .offset = tt.offset};
  }
  void run_op(OpId id) {
    const Op& op = g_.op(id);
    backends::OpCall c{.graph = &g_, .op = id};
    for (TensorId t : op.inputs) c.inputs.push_back(arg(t));
    for (TensorId t : op.outputs) c.outputs.push_back(arg(t));
    for (TensorId t : op.grad_outputs) c.grad_outputs.push_back(arg(t));
    // Keyed by the op's name, so that inserted ops (offload) do not shift it; backward and
    // recompute ops draw with their forward op's key (docs/kernels.md).
    const std::string& key = g_.op(op.forward != kNoOp ? op.forward : id).name;
    c.seed = 0;
    for (char ch : key) c.seed = (c.seed ^ static_cast<unsigned char>(ch)) * 1099511628211ull;
    be_.run(c);
    kinds.insert(op.kind == OpKind::backward ? "backward:" + std::string(to_string(g_.op(op.forward).kind))
                                             : std::string(to_string(op.kind)));
  }
  void run(std::initializer_list<Phase> phases) {
    for (size_t i = 0; i < g_.n_ops(); ++i) {
      const Op& op = g_.op(OpId{static_cast<uint32_t>(i)});
      for (Phase p : phases) {
        if (op.phase == p) run_op(OpId{static_cast<uint32_t>(i)});
      }
    }
  }
  std::vector<double> read(TensorId t) const { return backends::cpu::load<double>(arg(t)); }
  void write(TensorId t, const std::vector<double>& v) { backends::cpu::store(arg(t), v); }
  double loss() const { return read(s_.loss).at(0); }

  std::set<std::string> kinds;  // op kinds run ("backward:<forward kind>" for backward ops)

 private:
  // Parameters, optimizer state and inputs: test values; buffers: what the model registers.
  void init_leaves() {
    for (size_t si = 0; si < g_.storages().size(); ++si) {
      const Storage& st = g_.storages()[si];
      if (st.producer != kNoOp || st.first == kNoTensor) continue;
      const TensorId t = st.first;
      const Tensor& tt = g_.tensor(t);
      const int64_t n = numel(tt.shape);
      std::vector<double> v(static_cast<size_t>(n));
      const int64_t hd = m_.d_model / m_.n_heads;
      for (int64_t i = 0; i < n; ++i) {
        double x = test_value(tt.name, i);
        if (tt.dtype == DType::i64) {
          x = std::floor((x + 1) / 2 * static_cast<double>(m_.vocab_size));  // token ids in [0, V)
        } else if (ends_with(tt.name, ".attn.bias")) {
          const int64_t r = (i / m_.seq_len) % m_.seq_len, c = i % m_.seq_len;
          x = c <= r ? 1 : 0;  // torch.tril(torch.ones(T, T))
        } else if (ends_with(tt.name, "cos_cached") || ends_with(tt.name, "sin_cached")) {
          const int64_t pos = i / (hd / 2), j = i % (hd / 2);
          const double ang = static_cast<double>(pos) * std::pow(m_.rope_theta, -2.0 * j / static_cast<double>(hd));
          x = ends_with(tt.name, "cos_cached") ? std::cos(ang) : std::sin(ang);
        } else if (ends_with(tt.name, ".step")) {
          x = 3;  // a steady-state step: three earlier steps
        } else if (ends_with(tt.name, ".exp_avg_sq")) {
          x = 0.01 * std::abs(x) + 1e-4;
        } else if (ends_with(tt.name, ".weight") && tt.shape.size() == 1) {
          x = 1 + 0.2 * x;  // norm weights near 1
        }
        v[static_cast<size_t>(i)] = x;
      }
      write(t, v);
    }
  }

  const StepGraph& s_;
  const Graph& g_;
  backends::Backend& be_;
  const ModelConfig& m_;
  std::vector<void*> buf_;  // [storages]
};

ModelConfig tiny(Family f, Attention a = Attention::eager, double dropout = 0.0) {
  ModelConfig m;
  m.family = f;
  m.vocab_size = 11;
  m.seq_len = 5;
  m.d_model = 8;
  m.n_heads = 2;
  m.n_layers = 1;
  m.dropout = f == Family::gpt2 ? dropout : 0.0;
  m.attention = a;
  if (f == Family::llama) {
    m.n_heads = 4;
    m.n_kv_heads = 2;  // grouped-query attention: expand + reshape (a copy) + sum_to in backward
    m.d_ff = 12;
  }
  return m;
}

TrainingConfig training(DType dt, Optimizer o = Optimizer::adamw, OptimizerImpl impl = OptimizerImpl::profile_default) {
  TrainingConfig t;
  t.batch_size = 2;
  t.dtype = dt;
  t.optimizer = o;
  t.optimizer_impl = impl;
  t.lr = 1e-2;
  return t;
}

// Lowers a step; in f64 the flash log-sum-exp is widened to f64 too (the lowering makes it f32 as
// FlashAttention does) so that finite differences can be checked to 1e-6.
StepGraph lower(const ModelConfig& m, const TrainingConfig& t, ProfileId p, const BlockPlan* plan = nullptr) {
  StepGraph s = lower_training_step(m, t, profile(p), plan);
  if (t.dtype == DType::f64 && is_hf(m.family)) {
    // transformers computes parts of any model in fp32 (logits.float() before the loss, RMSNorm,
    // eager softmax): widen those to f64 too, so that the casts run as f64 copies and finite
    // differences stay exact to 1e-6.
    s.graph.rewrite([](Graph& g) {
      for (size_t i = 0; i < g.tensors().size(); ++i) {
        Tensor& t32 = g.mutable_tensor(TensorId{static_cast<uint32_t>(i)});
        if (t32.dtype != DType::f32) continue;
        t32.dtype = DType::f64;
        Storage& st = g.mutable_storage(t32.storage);
        st.bytes = std::max(st.bytes, (t32.offset + numel(t32.shape)) * 8);
      }
    });
  }
  if (t.dtype == DType::f64) {
    s.graph.rewrite([](Graph& g) {
      for (const Op& op : g.ops()) {
        if (op.kind != OpKind::flash_attention) continue;
        Tensor& lse = g.mutable_tensor(op.outputs[1]);
        lse.dtype = DType::f64;
        g.mutable_storage(lse.storage).bytes = numel(lse.shape) * 8;
      }
    });
  }
  return s;
}

struct Variant {
  std::string name;
  ModelConfig model;
  ProfileId profile;
};

std::vector<Variant> variants() {
  return {
      {"gpt2 torch-cpu dropout", tiny(Family::gpt2, Attention::eager, 0.25), ProfileId::torch_cpu},
      {"gpt2 torch-cuda dropout", tiny(Family::gpt2, Attention::eager, 0.25), ProfileId::torch_cuda},
      {"gpt2 torch-cuda flash dropout", tiny(Family::gpt2, Attention::flash, 0.25), ProfileId::torch_cuda},
      {"gpt2 torch-cuda no dropout", tiny(Family::gpt2), ProfileId::torch_cuda},
      {"llama torch-cpu", tiny(Family::llama), ProfileId::torch_cpu},
      {"llama torch-cuda", tiny(Family::llama), ProfileId::torch_cuda},
      {"llama torch-cuda flash", tiny(Family::llama, Attention::flash), ProfileId::torch_cuda},
  };
}

// Checks every parameter gradient of one step against central differences of the loss (fp64),
// on up to `per_param` elements of each parameter.
void check_gradients(const Variant& v, int per_param = 6) {
  INFO(v.name);
  StepGraph s = lower(v.model, training(DType::f64), v.profile);
  auto be = backends::make_backend("cpu");
  Runner r(s, *be, v.model);
  r.run({Phase::forward, Phase::backward});
  const double l0 = r.loss();
  REQUIRE(std::isfinite(l0));
  std::mt19937_64 pick(7);
  for (size_t pi = 0; pi < s.params.size(); ++pi) {
    const TensorId p = s.params[pi];
    INFO(s.graph.tensor(p).name);
    REQUIRE(s.param_grads[pi] != kNoTensor);
    const std::vector<double> grad = r.read(s.param_grads[pi]);
    std::vector<double> w = r.read(p);
    const size_t n = w.size();
    for (int k = 0; k < per_param && k < static_cast<int>(n); ++k) {
      const size_t e = static_cast<int>(n) <= per_param ? static_cast<size_t>(k) : pick() % n;
      const double h = 1e-6, orig = w[e];
      w[e] = orig + h;
      r.write(p, w);
      r.run({Phase::forward});
      const double lp = r.loss();
      w[e] = orig - h;
      r.write(p, w);
      r.run({Phase::forward});
      const double lm = r.loss();
      w[e] = orig;
      r.write(p, w);
      const double fd = (lp - lm) / (2 * h);
      INFO("element " << e << ": analytic " << grad[e] << " vs finite difference " << fd);
      CHECK(std::abs(fd - grad[e]) <= 1e-6 * std::abs(grad[e]) + 1e-8);
    }
  }
}

}  // namespace

// ---- finite differences (fp64) ------------------------------------------------------------------

TEST_CASE("backends::cpu: gpt2 gradients match finite differences in fp64 (torch-cpu, dropout noise)", "[kernels]") {
  check_gradients(variants()[0]);
}

TEST_CASE("backends::cpu: gpt2 gradients match finite differences in fp64 (torch-cuda, native dropout)", "[kernels]") {
  check_gradients(variants()[1]);
  check_gradients(variants()[3]);
}

TEST_CASE("backends::cpu: flash attention gradients match finite differences in fp64 (with and without dropout)",
          "[kernels]") {
  check_gradients(variants()[2]);
  check_gradients(variants()[6]);
}

TEST_CASE("backends::cpu: llama gradients match finite differences in fp64 (RMSNorm, RoPE, GQA, SiLU)", "[kernels]") {
  check_gradients(variants()[4]);
  check_gradients(variants()[5]);
}

// Tiny Hugging Face decoders (model.hf_config families): rotary tables, rotate_half's neg and cat,
// casts, the eager causal mask (with a sliding window shorter than the sequence), sdpa with grouped
// key/value heads, gelu_new's tanh, the labels' pad.
std::vector<Variant> hf_variants() {
  ModelConfig base;
  base.vocab_size = 11;
  base.seq_len = 6;
  base.d_model = 16;
  base.n_heads = 4;
  base.n_layers = 1;
  base.tie_embeddings = 0;
  ModelConfig llama = base;  // Qwen3-like: q/k norm, biases, GQA, a window of 3 under eager
  llama.family = Family::hf_llama;
  llama.n_kv_heads = 2;
  llama.d_ff = 12;
  llama.qkv_bias = true;
  llama.qk_norm = true;
  llama.sliding_window = 3;
  ModelConfig llama_sdpa = llama;
  llama_sdpa.attention = Attention::flash;
  llama_sdpa.sliding_window = 0;
  llama_sdpa.n_kv_heads = 1;
  ModelConfig gpt2 = base;
  gpt2.family = Family::hf_gpt2;
  gpt2.n_heads = 2;
  ModelConfig neox = base;
  neox.family = Family::hf_neox;
  neox.parallel_residual = true;
  neox.n_heads = 2;  // head_dim 8: RoPE rotates 4 of them
  neox.partial_rotary = 0.5;
  neox.d_ff = 16;
  ModelConfig gemma = llama_sdpa;
  gemma.gemma = true;
  gemma.head_dim = 4;
  gemma.qk_norm = false;
  gemma.tie_embeddings = 1;
  return {
      {"hf_llama eager GQA window", llama, ProfileId::torch2_cpu},
      {"hf_llama sdpa MQA", llama_sdpa, ProfileId::torch2_cpu},
      {"hf_gpt2 eager", gpt2, ProfileId::torch2_cpu},
      {"hf_neox eager partial rotary", neox, ProfileId::torch2_cpu},
      {"gemma sdpa", gemma, ProfileId::torch2_cpu},
  };
}

TEST_CASE("backends::cpu: Hugging Face decoders' gradients match finite differences in fp64", "[kernels]") {
  std::set<std::string> ran;
  for (const Variant& v : hf_variants()) {
    check_gradients(v, 4);
    StepGraph s = lower(v.model, training(DType::bf16), v.profile);  // bf16: the fp32 casts are real
    auto be = backends::make_backend("cpu");
    Runner r(s, *be, v.model);
    r.run({Phase::forward, Phase::backward, Phase::optimizer});
    CHECK(std::isfinite(r.loss()));
    ran.insert(r.kinds.begin(), r.kinds.end());
  }
  for (const char* k : {"neg", "cat", "cast", "rotary_table", "causal_mask", "pad", "tanh", "flash_attention",
                        "backward:neg", "backward:cat", "backward:cast", "backward:tanh", "backward:flash_attention"}) {
    INFO(k);
    CHECK(ran.count(k) == 1);
  }
}

TEST_CASE("backends::cpu: the tiny models run every op kind the lowering emits, forward and backward", "[kernels]") {
  std::set<std::string> ran;
  for (const Variant& v : variants()) {
    for (Optimizer o : {Optimizer::adamw, Optimizer::sgd_momentum}) {
      StepGraph s = lower(v.model, training(DType::f32, o), v.profile);
      auto be = backends::make_backend("cpu");
      Runner r(s, *be, v.model);
      r.run({Phase::forward, Phase::backward, Phase::optimizer});
      CHECK(std::isfinite(r.loss()));
      ran.insert(r.kinds.begin(), r.kinds.end());
    }
  }
  const std::vector<std::string> expected{
      "arange", "ones", "triu", "eq_scalar", "index_rows", "embedding", "view", "copy", "stack", "add", "sub",
      "mul", "mul_scalar", "div_scalar", "add_scalar", "pow_scalar", "rsqrt", "mean_last", "mm", "addmm", "bmm",
      "layer_norm", "gelu_tanh", "silu", "softmax", "masked_fill", "dropout_noise", "native_dropout",
      "flash_attention", "log_softmax", "nll_loss", "sum_to", "accumulate", "grad_seed", "optim_update",
      "optim_temp", "zero_grad",
      "backward:view", "backward:copy", "backward:stack", "backward:add", "backward:sub", "backward:mul",
      "backward:mul_scalar", "backward:div_scalar", "backward:add_scalar", "backward:pow_scalar",
      "backward:rsqrt", "backward:mean_last", "backward:mm", "backward:addmm", "backward:bmm",
      "backward:layer_norm", "backward:gelu_tanh", "backward:silu", "backward:softmax", "backward:masked_fill",
      "backward:native_dropout", "backward:flash_attention", "backward:log_softmax", "backward:nll_loss",
      "backward:embedding"};
  for (const std::string& k : expected) {
    INFO(k);
    CHECK(ran.count(k) == 1);
  }
}

TEST_CASE("backends::cpu: checkpointed and offloaded steps give bit-identical gradients (recompute keeps the seed)",
          "[kernels]") {
  for (const Variant& v : {variants()[0], variants()[1], variants()[2], variants()[4]}) {
    INFO(v.name);
    ModelConfig m = v.model;
    m.n_layers = 2;
    auto be = backends::make_backend("cpu");
    StepGraph plain = lower(m, training(DType::f32), v.profile);
    Runner rp(plain, *be, m);
    rp.run({Phase::forward, Phase::backward});
    for (const char* policy : {"full", "selective", "offload"}) {
      INFO(policy);
      const BlockPlan plan = block_plan(parse_policy(policy, "test"), m.n_layers);
      StepGraph ck = lower(m, training(DType::f32), v.profile, &plan);
      Runner rc(ck, *be, m);
      rc.run({Phase::forward, Phase::backward});
      CHECK(rc.loss() == rp.loss());
      for (size_t i = 0; i < plain.params.size(); ++i) {
        INFO(plain.graph.tensor(plain.params[i]).name);
        CHECK(rc.read(ck.param_grads[i]) == rp.read(plain.param_grads[i]));
      }
    }
  }
}

// ---- 16-bit storage against fp32 -----------------------------------------------------------------

TEST_CASE("backends::cpu: bf16 and fp16 storage agree with fp32 within 16-bit tolerance", "[kernels]") {
  for (const Variant& v : {variants()[1], variants()[4], variants()[6]}) {
    INFO(v.name);
    StepGraph s32 = lower(v.model, training(DType::f32), v.profile);
    auto be = backends::make_backend("cpu");
    Runner r32(s32, *be, v.model);
    r32.run({Phase::forward, Phase::backward});
    for (DType dt : {DType::bf16, DType::f16}) {
      INFO(to_string(dt));
      // bf16 keeps 8 significant bits, fp16 11: one rounding per op over a few dozen ops.
      const double rtol = dt == DType::bf16 ? 3e-2 : 4e-3;
      StepGraph s16 = lower(v.model, training(dt), v.profile);
      Runner r16(s16, *be, v.model);
      r16.run({Phase::forward, Phase::backward});
      CHECK(std::abs(r16.loss() - r32.loss()) <= rtol * std::abs(r32.loss()));
      for (size_t pi = 0; pi < s32.params.size(); ++pi) {
        INFO(s32.graph.tensor(s32.params[pi]).name);
        const std::vector<double> a = r32.read(s32.param_grads[pi]), b = r16.read(s16.param_grads[pi]);
        double amax = 0, err = 0;
        for (size_t i = 0; i < a.size(); ++i) {
          amax = std::max(amax, std::abs(a[i]));
          err = std::max(err, std::abs(a[i] - b[i]));
        }
        CHECK(err <= 4 * rtol * amax + 1e-4);
      }
    }
  }
}

// ---- optimizer -----------------------------------------------------------------------------------

TEST_CASE("backends::cpu: AdamW, Adam, SGD and momentum updates follow torch.optim's formulas", "[kernels]") {
  const Variant v = variants()[4];
  struct Case {
    Optimizer o;
    OptimizerImpl impl;
  };
  for (Case c : {Case{Optimizer::adamw, OptimizerImpl::for_loop}, Case{Optimizer::adamw, OptimizerImpl::foreach},
                 Case{Optimizer::adamw, OptimizerImpl::fused}, Case{Optimizer::adam, OptimizerImpl::for_loop},
                 Case{Optimizer::sgd, OptimizerImpl::for_loop}, Case{Optimizer::sgd_momentum, OptimizerImpl::for_loop}}) {
    for (ProfileId prof : {ProfileId::torch_cpu, ProfileId::torch_cuda}) {
      TrainingConfig t = training(DType::f64, c.o, c.impl);
      if (c.o == Optimizer::adam) t.weight_decay = 0.1;
      StepGraph s = lower(v.model, t, prof);
      INFO(to_string(c.o) << " " << to_string(c.impl) << " " << to_string(prof));
      auto be = backends::make_backend("cpu");
      Runner r(s, *be, v.model);
      r.run({Phase::forward, Phase::backward});
      std::vector<std::vector<double>> p0, g0;
      for (size_t i = 0; i < s.params.size(); ++i) p0.push_back(r.read(s.params[i])), g0.push_back(r.read(s.param_grads[i]));
      r.run({Phase::optimizer});
      const double lr = t.lr, b1 = 0.9, b2 = 0.999, eps = 1e-8;
      const double wd = c.o == Optimizer::adamw ? 0.01 : c.o == Optimizer::adam ? 0.1 : 0.0;
      for (size_t i = 0; i < s.params.size(); ++i) {
        const std::string name = s.graph.tensor(s.params[i]).name;
        INFO(name);
        const std::vector<double> p1 = r.read(s.params[i]);
        for (size_t e = 0; e < p1.size(); e += 7) {
          double p = p0[i][e], g = g0[i][e], expect = 0;
          if (c.o == Optimizer::sgd) {
            expect = p - lr * g;
          } else if (c.o == Optimizer::sgd_momentum) {
            expect = p - lr * (0.9 * test_value(name + ".momentum_buffer", static_cast<int64_t>(e)) + g);
          } else {
            const double m0 = test_value(name + ".exp_avg", static_cast<int64_t>(e));
            const double v0 = 0.01 * std::abs(test_value(name + ".exp_avg_sq", static_cast<int64_t>(e))) + 1e-4;
            if (c.o == Optimizer::adamw) p *= 1 - lr * wd;
            else g += wd * p;
            const double m = b1 * m0 + (1 - b1) * g, vv = b2 * v0 + (1 - b2) * g * g, step = 4;
            const double bc1 = 1 - std::pow(b1, step), bc2 = 1 - std::pow(b2, step);
            expect = p - lr / bc1 * m / (std::sqrt(vv) / std::sqrt(bc2) + eps);
          }
          CHECK(p1[e] == Approx(expect).epsilon(1e-12).margin(1e-14));
        }
      }
    }
  }
}

// ---- determinism, strides, RNG, backends -------------------------------------------------------------

TEST_CASE("backends::cpu: a step is bitwise reproducible", "[kernels]") {
  const Variant v = variants()[1];
  StepGraph s = lower(v.model, training(DType::bf16), v.profile);
  auto be = backends::make_backend("cpu");
  std::vector<std::vector<double>> first;
  for (int run = 0; run < 2; ++run) {
    Runner r(s, *be, v.model);
    r.run({Phase::forward, Phase::backward, Phase::optimizer});
    for (size_t i = 0; i < s.params.size(); ++i) {
      if (run == 0) first.push_back(r.read(s.params[i]));
      else CHECK(std::memcmp(first[i].data(), r.read(s.params[i]).data(), first[i].size() * sizeof(double)) == 0);
    }
  }
}

TEST_CASE("backends::cpu: strided loads and stores follow strides and offsets", "[kernels]") {
  std::vector<float> buf{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11};
  // A transposed (3, 2) view of rows 1..2 of a (3, 4) matrix, starting at column 1.
  TensorArg t{.base = buf.data(), .dtype = DType::f32, .shape = {3, 2}, .strides = {1, 4}, .offset = 5};
  CHECK(backends::cpu::load<double>(t) == std::vector<double>{5, 9, 6, 10, 7, 11});
  backends::cpu::store(t, std::vector<double>{-1, -2, -3, -4, -5, -6});
  CHECK(buf == std::vector<float>{0, 1, 2, 3, 4, -1, -3, -5, 8, -2, -4, -6});
  TensorArg expanded{.base = buf.data(), .dtype = DType::f32, .shape = {2, 3}, .strides = {0, 1}, .offset = 0};
  CHECK(backends::cpu::load<double>(expanded) == std::vector<double>{0, 1, 2, 0, 1, 2});
}

TEST_CASE("kernels: fp16 and bf16 conversions round to nearest even", "[kernels]") {
  using backends::cpu::from_f16;
  using backends::cpu::to_f16;
  CHECK(to_f16(1.0f) == 0x3C00);
  CHECK(to_f16(65504.0f) == 0x7BFF);
  CHECK(to_f16(1e6f) == 0x7C00);                      // overflow to infinity
  CHECK(to_f16(1.0f + 1.0f / 2048) == 0x3C00);        // tie: to even
  CHECK(to_f16(1.0f + 3.0f / 2048) == 0x3C02);        // tie: to even (up)
  CHECK(from_f16(0x0001) == std::ldexp(1.0f, -24));  // smallest subnormal
  CHECK(std::isnan(from_f16(to_f16(std::nanf("")))));
  for (uint32_t h = 0; h < 0x7C00; h += 37) CHECK(to_f16(from_f16(static_cast<uint16_t>(h))) == h);
  CHECK(util::to_bf16(1.0f + 1.0f / 256) == 0x3F80);  // tie: to even
}

TEST_CASE("kernels: the counter-based RNG is fixed (backends must reproduce these values)", "[kernels]") {
  // Golden values: the CUDA backend's rng.hpp is the same header; these pin the stream.
  CHECK(util::rng_u32(0, 0) == util::rng_u32(0, 0));
  CHECK(util::rng_u32(0, 0) != util::rng_u32(0, 1));
  CHECK(util::rng_u32(0, 0) != util::rng_u32(1, 0));
  const uint64_t mixed = util::rng_mix64(0x9E3779B97F4A7C15ull);
  CHECK(util::rng_u32(0, 0) == static_cast<uint32_t>(util::rng_mix64(mixed + 0x9E3779B97F4A7C15ull) >> 32));
  // Keep rate of dropout p = 0.25 over 100k draws: 0.75 within 5 standard deviations.
  int kept = 0;
  for (uint64_t i = 0; i < 100000; ++i) kept += util::rng_keep(42, i, 0.25);
  CHECK(std::abs(kept / 100000.0 - 0.75) < 5 * std::sqrt(0.75 * 0.25 / 100000));
}

TEST_CASE("backends::make_backend: cpu exists, unknown names are input errors with a suggestion", "[kernels]") {
  auto be = backends::make_backend("cpu");
  CHECK(be->name() == "cpu");
  void* p = be->alloc(16);
  be->fill_nan(p, 16);
  float f;
  be->download(&f, p, 4);
  CHECK(std::isnan(f));
  be->free(p);
  try {
    backends::make_backend("cpux");
    FAIL("no error");
  } catch (const InputError& e) {
    CHECK(std::string(e.what()).find("did you mean 'cpu'") != std::string::npos);
  }
#ifndef ACTSIM_HAVE_CUDA
  CHECK_THROWS_AS(backends::make_backend("cuda"), InputError);
#endif
}
