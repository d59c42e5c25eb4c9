// The schedule of an analysed scenario: the engine re-run with an observer that records its events.
#include "actsim/study/make_schedule.hpp"

#include "actsim/sim/engine.hpp"

namespace actsim::study {

using sim::simulate;

using graph::OpId;
using graph::StorageId;
using schedule::Schedule;
using schedule::ScheduleEntry;
using sim::Observer;
using sim::StepTables;
using sim::SimResult;
using Kind = ScheduleEntry::Kind;

namespace {

// Records the engine's events as entries. The engine reports an op's start before its
// allocations, so the `run` entry waits until the op's allocations and workspace are recorded:
// it is written at the first event that is not one of them.
class Recorder : public Observer {
 public:
  Recorder(const StepTables& p, std::vector<ScheduleEntry>& out) : p_(p), out_(out) {}
  void on_op_start(OpId op, int64_t t) override {
    flush();
    pending_ = op;
    pending_t_ = t;
  }
  void on_op_end(OpId, int64_t) override { flush(); }
  void on_alloc(StorageId s, OpId by, int64_t t, int64_t live) override {
    if (by != pending_) flush();
    out_.push_back({.kind = Kind::alloc, .id = graph::index(s), .bytes = p_.graph().storage(s).bytes,
                    .live = live, .time_ns = t});
  }
  void on_free(StorageId s, OpId, int64_t t, int64_t live) override {
    flush();
    out_.push_back({.kind = Kind::free, .id = graph::index(s), .live = live, .time_ns = t});
  }
  void on_workspace(OpId op, int64_t bytes, int64_t t, int64_t live) override {
    if (bytes < 0 || op != pending_) flush();
    out_.push_back({.kind = bytes > 0 ? Kind::ws_alloc : Kind::ws_free, .id = graph::index(op),
                    .bytes = bytes > 0 ? bytes : -bytes, .live = live, .time_ns = t});
  }
  void flush() {
    if (pending_ == graph::kNoOp) return;
    out_.push_back({.kind = Kind::run, .id = graph::index(pending_), .time_ns = pending_t_,
                    .duration_ns = p_.duration_ns(pending_)});
    pending_ = graph::kNoOp;
  }

 private:
  const StepTables& p_;
  std::vector<ScheduleEntry>& out_;
  OpId pending_ = graph::kNoOp;
  int64_t pending_t_ = 0;
};

}  // namespace

Schedule make_schedule(const Analysis& a) {
  Schedule s;
  s.source = a.scenario.file.empty() ? a.scenario.name : a.scenario.file;
  s.scenario_name = a.scenario.name;
  s.step = *a.step;
  s.model = a.scenario.model;
  s.training = a.scenario.training;
  s.profile = a.scenario.profile;
  s.device = a.scenario.device.name;
  Recorder rec(*a.tables, s.entries);
  Observer* obs[] = {&rec};
  SimResult r = simulate(*a.tables, obs);
  rec.flush();
  s.simulated_peak_bytes = r.peak_bytes;
  s.simulated_live_step_start = r.live_step_start;
  s.simulated_step_time_ns = r.step_time_ns;
  return s;
}

std::string emit_schedule(const Analysis& a) { return to_text(make_schedule(a)); }

}  // namespace actsim::study
