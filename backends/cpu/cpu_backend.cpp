// The CPU reference backend: host memory, and the reference kernels of every op kind
// (docs/kernels.md). Deterministic: single-threaded, fixed reduction order.
#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>

#include "actsim/backends/backend.hpp"
#include "cpu_kernels.hpp"
#include "cpu_tensor.hpp"

namespace actsim::backends {
namespace cpu {
namespace {

using graph::OpKind;

constexpr int64_t kAlignment = 64;  // bytes: a cache line, and enough for any vector load

// The dtype that picks the compute type: the first floating-point tensor among the inputs, then
// the outputs (docs/kernels.md, "Numerics").
DType primary_dtype(const OpCall& c) {
  for (const auto* list : {&c.inputs, &c.outputs, &c.grad_outputs}) {
    for (const TensorArg& t : *list) {
      if (graph::is_floating(t.dtype)) return t.dtype;
    }
  }
  return DType::f32;
}

template <class A>
void run_typed(const OpCall& c, const graph::Op& op) {
  switch (op.kind) {
    case OpKind::backward: return run_backward<A>(c, op);
    case OpKind::optim_update:
    case OpKind::optim_temp: return run_optimizer<A>(c, op);
    case OpKind::zero_grad: return;  // releases only
    case OpKind::rng_stash: return;  // the stash's bytes only (counter-based RNG: nothing to save)
    case OpKind::offload:
    case OpKind::prefetch: {
      // Device <-> host copy of a saved activation's whole storage: the offloaded storage is
      // replaced by its copy for every tensor that views it (k and v of a split qkv, not only q).
      const graph::Graph& g = *c.graph;
      const int64_t bytes = std::min(g.storage(g.tensor(op.inputs.at(0)).storage).bytes,
                                     g.storage(g.tensor(op.outputs.at(0)).storage).bytes);
      std::memcpy(c.outputs.at(0).base, c.inputs.at(0).base, static_cast<size_t>(bytes));
      return;
    }
    case OpKind::recompute: {
      if (op.forward == graph::kNoOp) throw std::runtime_error("cpu backend: recompute op without a forward op: " + op.name);
      return run_forward<A>(c, c.graph->op(op.forward));
    }
    case OpKind::sum_to: {
      const TensorArg &g = c.inputs.at(0), &r = c.outputs.at(0);
      return store(r, sum_to(load<A>(g), g.shape, r.shape));
    }
    case OpKind::accumulate: {
      const TensorArg &buf = c.inputs.at(0), &grad = c.inputs.at(1);
      std::vector<A> a = load<A>(buf);
      const std::vector<A> b = load<A>(grad);
      if (a.size() != b.size()) throw std::runtime_error("cpu backend: accumulate of different sizes: " + op.name);
      for (size_t i = 0; i < a.size(); ++i) a[i] += b[i];
      return store(c.outputs.empty() ? buf : c.outputs[0], a);  // no output: in place
    }
    case OpKind::grad_seed: {
      const TensorArg& o = c.outputs.at(0);
      return store(o, std::vector<A>(static_cast<size_t>(numel(o)), A(1)));
    }
    default: return run_forward<A>(c, op);
  }
}

class CpuBackend final : public Backend {
 public:
  std::string name() const override { return "cpu"; }

  void* alloc(int64_t bytes) override {
    const int64_t rounded = (std::max<int64_t>(bytes, 1) + kAlignment - 1) / kAlignment * kAlignment;
    void* p = std::aligned_alloc(kAlignment, static_cast<size_t>(rounded));
    if (!p) throw std::bad_alloc();
    return p;
  }
  void free(void* p) override { std::free(p); }

  void run(const OpCall& c) override {
    if (!c.graph) throw std::runtime_error("cpu backend: OpCall without a graph");
    const graph::Op& op = c.graph->op(c.op);
    const auto t0 = std::chrono::steady_clock::now();
    try {
      if (primary_dtype(c) == DType::f64) run_typed<double>(c, op);
      else run_typed<float>(c, op);
    } catch (const std::out_of_range&) {
      throw std::runtime_error(fmt::format("cpu backend: op {} ({}) was called with too few tensors", op.name,
                                           graph::to_string(op.kind)));
    }
    last_ = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  }

  void upload(void* dst, const void* host, int64_t bytes) override { std::memcpy(dst, host, static_cast<size_t>(bytes)); }
  void download(void* host, const void* src, int64_t bytes) override { std::memcpy(host, src, static_cast<size_t>(bytes)); }
  void fill_nan(void* p, int64_t bytes) override { std::memset(p, 0xFF, static_cast<size_t>(bytes)); }
  double last_run_seconds() const override { return last_; }

 private:
  double last_ = 0;  // seconds, wall clock of the last run()
};

}  // namespace
}  // namespace cpu

std::unique_ptr<Backend> make_cpu_backend() { return std::make_unique<cpu::CpuBackend>(); }

}  // namespace actsim::backends
