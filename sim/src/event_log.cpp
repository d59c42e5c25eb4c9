// The one recorder of the engine's events (event_log.hpp).
#include "actsim/sim/event_log.hpp"

namespace actsim::sim {

using Kind = EngineEvent::Kind;

void EventRecorder::on_op_start(graph::OpId op, int64_t t) {
  events_.push_back({.kind = Kind::op_start, .id = graph::index(op), .time_ns = t});
}
void EventRecorder::on_op_end(graph::OpId op, int64_t t) {
  events_.push_back({.kind = Kind::op_end, .id = graph::index(op), .time_ns = t});
}
void EventRecorder::on_alloc(graph::StorageId s, graph::OpId by, int64_t t, int64_t live) {
  events_.push_back({.kind = Kind::alloc, .id = graph::index(s), .by = by, .time_ns = t, .live = live});
}
void EventRecorder::on_free(graph::StorageId s, graph::OpId by, int64_t t, int64_t live) {
  events_.push_back({.kind = Kind::free, .id = graph::index(s), .by = by, .time_ns = t, .live = live});
}
void EventRecorder::on_workspace(graph::OpId op, int64_t bytes, int64_t t, int64_t live) {
  events_.push_back({.kind = bytes > 0 ? Kind::workspace_alloc : Kind::workspace_free, .id = graph::index(op),
                     .bytes = bytes > 0 ? bytes : -bytes, .time_ns = t, .live = live});
}

EventLog record_events(const StepTables& plan, std::span<Observer* const> more) {
  EventLog log;
  EventRecorder rec(log.events);
  std::vector<Observer*> obs{&rec};
  obs.insert(obs.end(), more.begin(), more.end());
  log.result = simulate(plan, obs);
  return log;
}

}  // namespace actsim::sim
