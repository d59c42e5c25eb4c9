// actsim::sim::EventLog — the one recorder of the engine's events. Every view of a simulated step
// that needs its events in order (report's Timeline for the exporters, study's schedule entries)
// is derived from this log; none observes the engine on its own.
//
//   EventLog log = record_events(plan);               // re-runs the engine with a recorder
//   for (const EngineEvent& e : log.events) ...       // engine order, as the observers saw them
//   log.result.peak_bytes;                            // what simulate(plan) returns
//
// One kind per Observer callback; a workspace event carries its size as positive bytes and its
// direction in the kind (the engine's callback passes -bytes for a free).
#pragma once

#include <cstdint>
#include <vector>

#include "actsim/sim/engine.hpp"

namespace actsim::sim {

struct EngineEvent {
  enum class Kind : uint8_t { op_start, op_end, alloc, free, workspace_alloc, workspace_free };
  Kind kind = Kind::op_start;
  uint32_t id = 0;           // the op (op_start, op_end, workspace_*) or the storage (alloc, free)
  graph::OpId by = graph::kNoOp;  // alloc, free: the op whose start or end caused it
  int64_t bytes = 0;         // workspace_*: the workspace's bytes (positive)
  int64_t time_ns = 0;
  int64_t live = 0;          // memory events: device bytes live after it
  bool is_memory() const { return kind != Kind::op_start && kind != Kind::op_end; }
};

// Appends every engine event to `events`, in the order the engine reports them.
class EventRecorder final : public Observer {
 public:
  explicit EventRecorder(std::vector<EngineEvent>& events) : events_(events) {}
  void on_op_start(graph::OpId op, int64_t t) override;
  void on_op_end(graph::OpId op, int64_t t) override;
  void on_alloc(graph::StorageId s, graph::OpId by, int64_t t, int64_t live) override;
  void on_free(graph::StorageId s, graph::OpId by, int64_t t, int64_t live) override;
  void on_workspace(graph::OpId op, int64_t bytes, int64_t t, int64_t live) override;

 private:
  std::vector<EngineEvent>& events_;
};

struct EventLog {
  std::vector<EngineEvent> events;
  SimResult result;
};

// Simulates `plan` with an EventRecorder (and any further observers after it).
EventLog record_events(const StepTables& plan, std::span<Observer* const> more = {});

}  // namespace actsim::sim
