// The schedule of an analysed scenario: entries derived from the engine's event log (sim/event_log.hpp).
#include "actsim/study/make_schedule.hpp"

#include <fmt/format.h>

#include "actsim/sim/engine.hpp"
#include "actsim/sim/event_log.hpp"
#include "actsim/util/error.hpp"

namespace actsim::study {


using graph::OpId;
using graph::StorageId;
using schedule::Schedule;
using schedule::ScheduleEntry;
using sim::EngineEvent;
using sim::StepTables;
using sim::SimResult;
using Kind = ScheduleEntry::Kind;

namespace {

// The schedule's entries from the engine's event log. The engine reports an op's start before
// its allocations, so the `run` entry waits until the op's allocations and workspace are listed:
// it is written at the first event that is not one of them.
std::vector<ScheduleEntry> entries_of(const StepTables& p, const std::vector<EngineEvent>& events) {
  std::vector<ScheduleEntry> out;
  out.reserve(events.size());
  OpId pending = graph::kNoOp;
  int64_t pending_t = 0;
  auto flush = [&] {
    if (pending == graph::kNoOp) return;
    out.push_back({.kind = Kind::run, .id = graph::index(pending), .time_ns = pending_t,
                   .duration_ns = p.duration_ns(pending)});
    pending = graph::kNoOp;
  };
  for (const EngineEvent& e : events) {
    switch (e.kind) {
      case EngineEvent::Kind::op_start:
        flush();
        pending = OpId{e.id};
        pending_t = e.time_ns;
        break;
      case EngineEvent::Kind::op_end: flush(); break;
      case EngineEvent::Kind::alloc:
        if (e.by != pending) flush();
        out.push_back({.kind = Kind::alloc, .id = e.id, .bytes = p.graph().storage(StorageId{e.id}).bytes,
                       .live = e.live, .time_ns = e.time_ns});
        break;
      case EngineEvent::Kind::free:
        flush();
        out.push_back({.kind = Kind::free, .id = e.id, .live = e.live, .time_ns = e.time_ns});
        break;
      case EngineEvent::Kind::workspace_alloc:
      case EngineEvent::Kind::workspace_free: {
        const bool alloc = e.kind == EngineEvent::Kind::workspace_alloc;
        if (!alloc || OpId{e.id} != pending) flush();
        // The op's workspace as requested, like an alloc's storage bytes (the engine's event carries
        // the allocator's rounded size, which is already in `live`).
        const int64_t bytes = p.graph().op(OpId{e.id}).workspace_bytes;
        out.push_back({.kind = alloc ? Kind::ws_alloc : Kind::ws_free, .id = e.id, .bytes = bytes, .live = e.live,
                       .time_ns = e.time_ns});
        break;
      }
    }
  }
  flush();
  return out;
}

}  // namespace

Schedule make_schedule(const Analysis& a) {
  // Gradient accumulation: the graph holds two micro-batches standing for N (Note [Micro-batches]
  // in sim/src/engine.cpp), which no schedule format names; refused rather than replayed wrong.
  if (a.step->graph.micro_batches > 1) {
    throw InputError(fmt::format("{} = {}: replay and --emit-schedule run one micro-batch per step; set it to 1",
                                 a.scenario.where("training.grad_accum_steps"), a.step->graph.micro_batches));
  }
  // issue 13: collectives have no kernels to replay (one process cannot run the other ranks).
  if (a.scenario.training.parallel.active() || a.scenario.training.master_weights != graph::MasterWeights::none) {
    throw InputError(fmt::format("{}: schedules and replay of data-parallel or master-weight steps are not "
                                 "supported yet", a.scenario.where(a.scenario.training.parallel.active()
                                                                       ? "parallel.dp"
                                                                       : "training.master_weights")));
  }
  Schedule s;
  s.source = a.scenario.file.empty() ? a.scenario.name : a.scenario.file;
  s.scenario_name = a.scenario.name;
  s.step = *a.step;
  s.model = a.scenario.model;
  s.training = a.scenario.training;
  s.profile = a.scenario.profile;
  s.device = a.scenario.device.name;
  const sim::EventLog log = sim::record_events(*a.tables);
  s.entries = entries_of(*a.tables, log.events);
  const SimResult& r = log.result;
  s.simulated_peak_bytes = r.peak_bytes;
  s.simulated_live_step_start = r.live_step_start;
  s.simulated_step_time_ns = r.step_time_ns;
  return s;
}

std::string emit_schedule(const Analysis& a) { return to_text(make_schedule(a)); }

}  // namespace actsim::study
