// actsim::backends — the replay backends' interface. Names no CUDA type (see STYLE.md).
//
//   auto be = backends::make_backend("cpu");            // or "cuda" (InputError if unavailable)
//   void* buf = be->alloc(bytes);                       // one buffer per simulated storage
//   backends::OpCall call{.graph = &g, .op = id, .inputs = {...}, .outputs = {...}};
//   be->run(call);                                      // executes that graph op
//
// An OpCall carries strided views (TensorArg) into the backend's buffers, in the op's own orders:
// `inputs` follows Op::inputs, `outputs` follows Op::outputs, `grad_outputs` follows
// Op::grad_outputs (backward ops; entries may alias `inputs` when a gradient passes through, and
// then nothing needs writing). View ops and pass-throughs compute nothing: their outputs alias
// their inputs' storage. Numerics: fp32 and bf16 storage accumulate in fp32; fp64 in fp64;
// reductions run in a fixed order, so a run is bitwise reproducible. Dropout masks come from a
// counter-based generator keyed by (OpCall::seed, element index), identical on every backend.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "actsim/graph/graph.hpp"

namespace actsim::backends {

struct TensorArg {
  void* base = nullptr;          // start of the storage buffer (backend memory)
  graph::DType dtype = graph::DType::f32;
  graph::Shape shape;
  graph::Strides strides;        // elements
  int64_t offset = 0;            // elements from base
};

struct OpCall {
  const graph::Graph* graph = nullptr;
  graph::OpId op = graph::kNoOp;
  std::vector<TensorArg> inputs;        // [Op::inputs]
  std::vector<TensorArg> outputs;       // [Op::outputs]
  std::vector<TensorArg> grad_outputs;  // [Op::grad_outputs] (backward ops)
  void* workspace = nullptr;            // Op::workspace_bytes of scratch (may be unused)
  uint64_t seed = 0;                    // RNG key of this op (dropout)
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual std::string name() const = 0;
  virtual void* alloc(int64_t bytes) = 0;                 // zero-filled is not guaranteed
  virtual void free(void* p) = 0;
  virtual void run(const OpCall& call) = 0;               // throws std::runtime_error on an unsupported op
  virtual void upload(void* dst, const void* host, int64_t bytes) = 0;
  virtual void download(void* host, const void* src, int64_t bytes) = 0;
  virtual void fill_nan(void* p, int64_t bytes) = 0;      // poison: every byte 0xFF (a NaN in every float dtype)
  virtual void synchronize() {}
  // Seconds the last run() took on the device (CUDA events); 0 if not measured.
  virtual double last_run_seconds() const { return 0; }
  // Why this backend cannot run `op` of `g` ("" when it can): checked for every op before a
  // replay starts, so that a missing kernel is refused up front instead of failing midway.
  virtual std::string cannot_run(const graph::Graph& g, const graph::Op& op) const {
    (void)g;
    (void)op;
    return {};
  }
};

// "cpu" always; "cuda" when built with CUDA and a device is present. Throws InputError otherwise.
std::unique_ptr<Backend> make_backend(const std::string& name);

}  // namespace actsim::backends
