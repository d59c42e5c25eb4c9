// test-backend-ops for actsim (after ggml's tests/test-backend-ops.cpp): every op of small lowered
// training steps -- forward, backward, engine and optimizer ops, fp32 and bf16, both runtime
// profiles, eager and flash attention, every optimizer implementation -- runs on the CPU reference
// backend and on the CUDA backend with the same random inputs, and their results are compared
// within docs/kernels.md's tolerances. Before each op the CUDA buffers receive the CPU's bytes, so
// every op is judged on identical inputs and errors never compound. The whole walk runs twice on
// the GPU and must be bitwise identical (deterministic kernels).
//
// Exit status: 0 all ops agree, 1 a mismatch (each listed), 77 no CUDA device (ctest: skipped).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "actsim/graph/lower.hpp"
#include "actsim/backends/backend.hpp"
#include "actsim/util/bf16.hpp"
#include "actsim/backends/cuda_info.hpp"

using namespace actsim;
using namespace actsim::graph;

namespace {

struct Case {
  std::string name;
  ModelConfig m;
  TrainingConfig t;
  ProfileId prof;
};

std::vector<Case> cases() {
  std::vector<Case> cs;
  auto tiny = [](Family f) {
    ModelConfig m;
    m.family = f;
    m.vocab_size = 61;
    m.seq_len = 16;
    m.d_model = 32;
    m.n_heads = 4;
    m.n_layers = 2;
    return m;
  };
  auto tr = [](DType dt, Optimizer o, OptimizerImpl impl) {
    TrainingConfig t;
    t.batch_size = 2;
    t.dtype = dt;
    t.optimizer = o;
    t.optimizer_impl = impl;
    t.weight_decay = 0.1;
    return t;
  };
  ModelConfig g = tiny(Family::gpt2);
  g.dropout = 0.1;
  cs.push_back({"gpt2 eager dropout f32 adamw foreach, torch-cuda", g, tr(DType::f32, Optimizer::adamw, OptimizerImpl::foreach), ProfileId::torch_cuda});
  cs.push_back({"gpt2 eager dropout bf16 adamw fused, torch-cuda", g, tr(DType::bf16, Optimizer::adamw, OptimizerImpl::fused), ProfileId::torch_cuda});
  cs.push_back({"gpt2 eager dropout f32 adam for_loop, torch-cpu", g, tr(DType::f32, Optimizer::adam, OptimizerImpl::for_loop), ProfileId::torch_cpu});
  ModelConfig gf = g;
  gf.attention = Attention::flash;
  cs.push_back({"gpt2 flash dropout f32 sgd, torch-cuda", gf, tr(DType::f32, Optimizer::sgd, OptimizerImpl::for_loop), ProfileId::torch_cuda});
  cs.push_back({"gpt2 flash dropout bf16 sgd_momentum, torch-cuda", gf, tr(DType::bf16, Optimizer::sgd_momentum, OptimizerImpl::for_loop), ProfileId::torch_cuda});
  ModelConfig l = tiny(Family::llama);
  l.n_kv_heads = 2;
  cs.push_back({"llama gqa eager f32 adamw foreach, torch-cuda", l, tr(DType::f32, Optimizer::adamw, OptimizerImpl::foreach), ProfileId::torch_cuda});
  cs.push_back({"llama gqa eager bf16 adamw for_loop, torch-cpu", l, tr(DType::bf16, Optimizer::adamw, OptimizerImpl::for_loop), ProfileId::torch_cpu});
  ModelConfig lf = l;
  lf.attention = Attention::flash;
  cs.push_back({"llama gqa flash bf16 adamw foreach, torch-cuda", lf, tr(DType::bf16, Optimizer::adamw, OptimizerImpl::foreach), ProfileId::torch_cuda});
  return cs;
}

// Host bytes of one value, from a double.
void put(std::vector<uint8_t>& buf, int64_t i, DType dt, double v) {
  switch (dt) {
    case DType::f32: { float f = static_cast<float>(v); std::memcpy(&buf[i * 4], &f, 4); break; }
    case DType::bf16: { uint16_t h = util::to_bf16(static_cast<float>(v)); std::memcpy(&buf[i * 2], &h, 2); break; }
    case DType::f64: std::memcpy(&buf[i * 8], &v, 8); break;
    case DType::i64: { int64_t x = static_cast<int64_t>(v); std::memcpy(&buf[i * 8], &x, 8); break; }
    case DType::b8: case DType::u8: buf[i] = v != 0; break;
    default: break;
  }
}
double get(const uint8_t* p, int64_t i, DType dt) {
  switch (dt) {
    case DType::f32: { float f; std::memcpy(&f, p + i * 4, 4); return f; }
    case DType::bf16: { uint16_t h; std::memcpy(&h, p + i * 2, 2); return util::from_bf16(h); }
    case DType::f64: { double d; std::memcpy(&d, p + i * 8, 8); return d; }
    case DType::i64: { int64_t x; std::memcpy(&x, p + i * 8, 8); return static_cast<double>(x); }
    case DType::i32: { int32_t x; std::memcpy(&x, p + i * 4, 4); return x; }
    default: return p[i];
  }
}

bool ends_with(const std::string& s, const std::string& suf) {
  return s.size() >= suf.size() && s.compare(s.size() - suf.size(), suf.size(), suf) == 0;
}

// Initial contents of a storage that exists before the step, from its first tensor's name.
std::vector<uint8_t> initial(const Graph& g, const Storage& s, const ModelConfig& m, std::mt19937_64& rng) {
  std::vector<uint8_t> buf(static_cast<size_t>(s.bytes), 0);
  if (s.first == kNoTensor) return buf;
  const Tensor& t = g.tensor(s.first);
  const int64_t n = numel(t.shape);
  std::normal_distribution<double> normal(0.0, 1.0);
  std::uniform_real_distribution<double> unif(0.0, 1.0);
  for (int64_t i = 0; i < n; ++i) {
    double v = 0;
    if (t.dtype == DType::i64) {
      v = static_cast<double>(rng() % static_cast<uint64_t>(m.vocab_size));
    } else if (ends_with(t.name, ".step")) {
      v = 3;
    } else if (ends_with(t.name, "exp_avg_sq")) {
      v = 1e-4 * unif(rng);
    } else if (ends_with(t.name, "attn.bias")) {  // gpt2's causal mask buffer: tril(ones)
      const int64_t c = t.shape.back(), r = (i / c) % t.shape[t.shape.size() - 2], j = i % c;
      v = j <= r ? 1 : 0;
    } else if (t.name.find("cached") != std::string::npos) {
      v = std::cos(0.37 * static_cast<double>(i));
    } else if (s.category == Category::parameter && t.shape.size() == 1 && t.name.find("weight") != std::string::npos) {
      v = 1.0 + 0.1 * normal(rng);
    } else {
      v = (s.category == Category::parameter ? 0.2 : 0.01) * normal(rng);
    }
    put(buf, i, t.dtype, v);
  }
  return buf;
}

backends::TensorArg arg(const Graph& g, TensorId id, const std::vector<void*>& bufs) {
  const Tensor& t = g.tensor(id);
  return {.base = bufs[index(t.storage)], .dtype = t.dtype, .shape = t.shape,
          .strides = t.strides.empty() ? contiguous_strides(t.shape) : t.strides, .offset = t.offset};
}

backends::OpCall call_for(const Graph& g, OpId id, const std::vector<void*>& bufs) {
  const Op& op = g.op(id);
  backends::OpCall c{.graph = &g, .op = id};
  for (TensorId t : op.inputs) c.inputs.push_back(arg(g, t, bufs));
  for (TensorId t : op.outputs) c.outputs.push_back(arg(g, t, bufs));
  for (TensorId t : op.grad_outputs) c.grad_outputs.push_back(arg(g, t, bufs));
  // Backward and recompute ops draw with their forward op's seed (docs/kernels.md).
  c.seed = 1000 + index(op.forward != kNoOp ? op.forward : id);
  return c;
}

// Tolerance class of an op (docs/kernels.md): exact, elementwise, or reduction-like.
struct Tol {
  double rtol, atol;
};
Tol tolerance(const Op& f, DType dt) {
  const bool reduce = f.kind == OpKind::mm || f.kind == OpKind::addmm || f.kind == OpKind::bmm ||
                      f.kind == OpKind::layer_norm || f.kind == OpKind::softmax || f.kind == OpKind::log_softmax ||
                      f.kind == OpKind::flash_attention || f.kind == OpKind::nll_loss || f.kind == OpKind::mean_last ||
                      f.kind == OpKind::sum_to || f.kind == OpKind::embedding || f.kind == OpKind::index_rows ||
                      f.kind == OpKind::optim_update || f.kind == OpKind::optim_temp || f.kind == OpKind::backward ||
                      f.kind == OpKind::view;
  if (dt == DType::bf16) return reduce ? Tol{1.0 / 64, 1e-2} : Tol{1.0 / 128, 1e-6};
  return reduce ? Tol{1e-4, 1e-5} : Tol{1e-6, 1e-6};
}

struct Stats {
  int ops = 0, fails = 0;
  std::map<std::string, double> worst;  // op kind -> largest |diff| / (atol + rtol |ref|)
};

uint64_t fnv(const std::vector<uint8_t>& b, uint64_t h) {
  for (uint8_t x : b) h = (h ^ x) * 1099511628211ull;
  return h;
}

// Runs one case; returns the hash of every CUDA result in order (for the determinism pass).
uint64_t run_case(const Case& cs, backends::Backend& cpu, backends::Backend& gpu, Stats& st, bool compare) {
  const StepGraph sg = lower_training_step(cs.m, cs.t, profile(cs.prof));
  const Graph& g = sg.graph;
  std::mt19937_64 rng(42);
  std::vector<void*> cb(g.storages().size()), gb(g.storages().size());
  for (size_t s = 0; s < g.storages().size(); ++s) {
    const Storage& so = g.storages()[s];
    std::vector<uint8_t> init = initial(g, so, cs.m, rng);
    cb[s] = cpu.alloc(so.bytes);
    gb[s] = gpu.alloc(so.bytes);
    cpu.upload(cb[s], init.data(), so.bytes);
    gpu.upload(gb[s], init.data(), so.bytes);
  }
  uint64_t h = 1469598103934665603ull;
  for (size_t i = 0; i < g.n_ops(); ++i) {
    const OpId id{static_cast<uint32_t>(i)};
    const Op& op = g.op(id);
    std::vector<uint32_t> touched;
    for (const auto* list : {&op.inputs, &op.outputs, &op.grad_outputs}) {
      for (TensorId t : *list) touched.push_back(index(g.tensor(t).storage));
    }
    // Identical inputs: the GPU gets the CPU's current bytes of everything this op touches.
    for (uint32_t s : touched) {
      std::vector<uint8_t> b(static_cast<size_t>(g.storages()[s].bytes));
      cpu.download(b.data(), cb[s], static_cast<int64_t>(b.size()));
      gpu.upload(gb[s], b.data(), static_cast<int64_t>(b.size()));
    }
    cpu.run(call_for(g, id, cb));
    gpu.run(call_for(g, id, gb));
    gpu.synchronize();
    ++st.ops;
    const Op& f = (op.kind == OpKind::backward || op.kind == OpKind::recompute) ? g.op(op.forward) : op;
    const std::string kind = op.kind == OpKind::backward ? std::string(to_string(f.kind)) + ".backward"
                                                         : std::string(to_string(op.kind));
    for (uint32_t s : touched) {
      const Storage& so = g.storages()[s];
      std::vector<uint8_t> a(static_cast<size_t>(so.bytes)), b(a.size());
      cpu.download(a.data(), cb[s], so.bytes);
      gpu.download(b.data(), gb[s], so.bytes);
      h = fnv(b, h);
      if (!compare || so.first == kNoTensor) continue;
      const DType dt = g.tensor(so.first).dtype;
      const int64_t n = so.bytes / dtype_size(dt);
      const bool exact = !is_floating(dt);
      const Tol tol = tolerance(op.kind == OpKind::backward ? op : f, dt);
      double worst = 0;
      int64_t at = -1;
      for (int64_t e = 0; e < n; ++e) {
        const double x = get(a.data(), e, dt), y = get(b.data(), e, dt);
        if (std::isnan(x) && std::isnan(y)) continue;
        if (std::isinf(x) && x == y) continue;
        const double r = exact ? (x == y ? 0 : 2) : std::fabs(x - y) / (tol.atol + tol.rtol * std::fabs(x));
        if (!(r <= worst)) worst = std::isnan(r) ? 1e30 : r, at = e;
      }
      st.worst[kind] = std::max(st.worst[kind], worst);
      if (worst > 1) {
        ++st.fails;
        std::printf("  FAIL %-28s %-40s storage of %s: element %lld cpu %.9g cuda %.9g\n", kind.c_str(), op.name.c_str(),
                    g.tensor(so.first).name.c_str(), static_cast<long long>(at), get(a.data(), at, dt),
                    get(b.data(), at, dt));
      }
    }
  }
  for (size_t s = 0; s < cb.size(); ++s) {
    cpu.free(cb[s]);
    gpu.free(gb[s]);
  }
  gpu.synchronize();
  return h;
}

}  // namespace

int main() {
  if (backends::cuda_device_count() <= 0) {
    std::printf("test_cuda_ops: no CUDA device; skipped\n");
    return 77;
  }
  auto cpu = backends::make_backend("cpu");
  auto gpu = backends::make_backend("cuda");
  int failed = 0;
  for (const Case& cs : cases()) {
    Stats st;
    const uint64_t h1 = run_case(cs, *cpu, *gpu, st, true);
    Stats again;
    const uint64_t h2 = run_case(cs, *cpu, *gpu, again, false);
    const bool det = h1 == h2;
    std::printf("%-52s %4d ops  %s%s\n", cs.name.c_str(), st.ops, st.fails ? "FAIL" : "OK",
                det ? "" : "  NOT DETERMINISTIC (two GPU runs differ)");
    for (const auto& [k, w] : st.worst) std::printf("    %-30s worst error / tolerance %.3f\n", k.c_str(), w);
    if (st.fails || !det) ++failed;
  }
  std::printf("%d passed, %d failed\n", static_cast<int>(cases().size()) - failed, failed);
  return failed ? 1 : 0;
}
