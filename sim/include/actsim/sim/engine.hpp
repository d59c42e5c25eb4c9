// actsim::sim — the discrete-event engine and memory tracker.
//
//   StepGraph s = graph::lower_training_step(model, training, prof);
//   StepTables tables(s.graph, device);    // lifetimes and op durations, computed once per graph
//   SimResult r = simulate(tables);        // peak, breakdown, live bytes at phase boundaries
//
// Events are ordered by (int64 nanoseconds, sequence number), so runs are reproducible. An op
// starts when its stream is free and the ops producing its inputs on other streams have ended;
// its outputs and workspace are allocated at start, the workspace is freed at its end, and a
// storage is freed when the last op using it (reading, saving, holding or releasing it) ends.
// Observers (exporters, timelines) see every event without the engine knowing about them.
#pragma once

#include <array>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "actsim/util/error.hpp"
#include "actsim/graph/graph.hpp"
#include "actsim/sim/device.hpp"

namespace actsim::sim {

using graph::OpId;
using graph::StorageId;

struct Calibration;

// Receives the engine's events. Times are simulated nanoseconds; `live` is the device bytes in
// use after the event.
class Observer {
 public:
  virtual ~Observer() = default;
  virtual void on_op_start(OpId, int64_t /*time_ns*/) {}
  virtual void on_op_end(OpId, int64_t /*time_ns*/) {}
  virtual void on_alloc(StorageId, OpId /*by*/, int64_t /*time_ns*/, int64_t /*live*/) {}
  virtual void on_free(StorageId, OpId /*by*/, int64_t /*time_ns*/, int64_t /*live*/) {}
  virtual void on_workspace(OpId, int64_t /*bytes: + alloc, - free*/, int64_t /*time_ns*/, int64_t /*live*/) {}
};

// The step's byte or time totals do not fit int64 (Note [Checked totals] in engine.cpp). Bad
// input to a command; an answer ("does not fit") to a search over sizes.
class ByteOverflow : public InputError {
 public:
  using InputError::InputError;
};

// The step tables: everything the engine needs from a graph, precomputed once (flat CSR arrays
// indexed by op). Not a checkpointing plan (graph::BlockPlan, study::plan_for_budget).
class StepTables {
 public:
  // With a calibration (calibration.hpp), op durations come from measured times. Throws
  // ByteOverflow when the sum of all storage and workspace bytes, or of all durations, overflows.
  StepTables(const graph::Graph& g, const DeviceSpec& device, const Calibration* calibration = nullptr);
  // The tables, or nullopt when those totals overflow (`why` gets the message): for a search over
  // sizes such a step simply does not fit.
  static std::optional<StepTables> try_build(const graph::Graph& g, const DeviceSpec& device, std::string* why = nullptr,
                                             const Calibration* calibration = nullptr);

  const graph::Graph& graph() const { return g_; }
  std::span<const StorageId> allocs(OpId op) const;   // storages allocated when op starts
  std::span<const StorageId> uses(OpId op) const;     // storages whose use count drops when op ends
  int64_t duration_ns(OpId op) const { return duration_ns_[graph::index(op)]; }
  int32_t use_count(StorageId s) const { return use_count_[graph::index(s)]; }
  bool is_persistent(StorageId s) const { return use_count_[graph::index(s)] < 0; }
  std::span<const OpId> cross_stream_deps(OpId op) const;

  // Flat copies of what the event loop reads per event (the graph's deques are slower to index).
  int64_t storage_bytes(StorageId s) const { return st_bytes_[graph::index(s)]; }
  uint8_t storage_category(StorageId s) const { return st_cat_[graph::index(s)]; }
  bool storage_on_host(StorageId s) const { return st_host_[graph::index(s)] != 0; }
  int64_t workspace_bytes(OpId op) const { return op_ws_[graph::index(op)]; }
  int32_t stream(OpId op) const { return op_stream_[graph::index(op)]; }
  graph::Phase phase(OpId op) const { return static_cast<graph::Phase>(op_phase_[graph::index(op)]); }

 private:
  struct Unchecked {};
  StepTables(Unchecked, const graph::Graph& g, const DeviceSpec& device, const Calibration* calibration);

  const graph::Graph& g_;
  std::string overflow_;                                         // why the totals overflow; empty if they fit
  std::vector<uint32_t> alloc_begin_, use_begin_, dep_begin_;  // [n_ops + 1]
  std::vector<StorageId> allocs_, uses_;
  std::vector<OpId> deps_;
  std::vector<int32_t> use_count_;                               // [storages]; -1 = never freed
  std::vector<int64_t> duration_ns_;                             // [ops]
  std::vector<int64_t> st_bytes_;                                // [storages]
  std::vector<uint8_t> st_cat_, st_host_;                        // [storages]
  std::vector<int64_t> op_ws_;                                   // [ops]
  std::vector<int32_t> op_stream_;                               // [ops]
  std::vector<uint8_t> op_phase_;                                // [ops]
};

// Roofline time of one op on a device: max(FLOPs / FLOP/s, bytes / bandwidth) + launches.
int64_t op_time_ns(const graph::Graph& g, const graph::Op& op, const DeviceSpec& d);

struct SimResult {
  int64_t peak_bytes = 0;                       // device bytes live at the peak
  int64_t peak_time_ns = 0;
  OpId peak_op = graph::kNoOp;                  // op whose start reached the peak
  graph::Phase peak_phase = graph::Phase::forward;
  std::array<int64_t, graph::kNumCategories> peak_by_category{};  // [Category]
  std::vector<StorageId> live_at_peak;          // device storages live at the peak
  std::array<int64_t, graph::kNumCategories> step_start_by_category{};
  int64_t live_step_start = 0;                  // device bytes live before the first op
  int64_t live_end_forward = 0;                 // ... after the last forward op
  int64_t live_end_backward = 0;
  int64_t live_end_optimizer = 0;
  int64_t live_end_step = 0;                    // after zero_grad
  std::array<int64_t, 3> phase_end_ns{};        // [Phase]
  int64_t step_time_ns = 0;
  int64_t events = 0;                           // op starts/ends, allocations, frees
  int64_t host_bytes = 0;                       // host storages (CUDA's 0-dim CPU scalars), peak
};

SimResult simulate(const StepTables& tables, std::span<Observer* const> observers = {});

}  // namespace actsim::sim
