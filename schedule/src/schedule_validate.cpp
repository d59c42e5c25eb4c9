// The schedule validator: the entries' checks a replay relies on (validate_schedule).
#include <fmt/format.h>

#include "actsim/schedule/schedule.hpp"
#include "actsim/util/error.hpp"
#include "format_names.hpp"

namespace actsim::schedule {

using namespace format;
using graph::OpId;

using graph::Category;
using graph::DType;
using graph::Graph;
using graph::Location;
using graph::Op;
using graph::OpKind;
using graph::Phase;
using graph::StorageId;
using graph::TensorId;
using nlohmann::json;
using Kind = ScheduleEntry::Kind;


void validate_schedule(const Schedule& s) {
  const Graph& g = s.graph();
  enum class State : uint8_t { absent, live, freed };
  std::vector<State> state(g.storages().size(), State::absent);
  std::vector<int64_t> changed_by(g.storages().size(), 0);  // entry number of the last alloc/free
  for (size_t i = 0; i < state.size(); ++i) {
    if (g.storages()[i].producer == graph::kNoOp) state[i] = State::live;
  }
  std::vector<int64_t> ran(g.n_ops(), 0);
  std::vector<bool> ws_live(g.n_ops(), false);
  auto where = [&](size_t i) {
    const int64_t n = static_cast<int64_t>(i) + 1;
    if (i < s.entry_line.size()) return fmt::format("{}:{}: entry {}", s.source, s.entry_line[i], n);
    return fmt::format("{}: entry {}", s.source, n);
  };
  auto sname = [&](uint32_t st) { return fmt::format("storage {} ({})", st, storage_name(g, st)); };
  auto why_not_live = [&](uint32_t st) {
    if (state[st] == State::freed) return fmt::format("was freed by entry {}", changed_by[st]);
    return std::string("was never allocated");
  };
  for (size_t i = 0; i < s.entries.size(); ++i) {
    const ScheduleEntry& e = s.entries[i];
    const int64_t n = static_cast<int64_t>(i) + 1;
    auto fail = [&](const std::string& msg) { throw InputError(where(i) + ": " + msg); };
    const bool storage_entry = e.kind == Kind::alloc || e.kind == Kind::free;
    if (storage_entry && e.id >= g.storages().size()) fail(fmt::format("{} of unknown storage {}", to_string(e.kind), e.id));
    if (!storage_entry && e.id >= g.n_ops()) fail(fmt::format("{} of unknown op {}", to_string(e.kind), e.id));
    switch (e.kind) {
      case Kind::alloc: {
        if (state[e.id] == State::live) {
          fail(fmt::format("alloc of {}, which is already live ({})", sname(e.id),
                           changed_by[e.id] ? fmt::format("allocated by entry {}", changed_by[e.id])
                                            : std::string("it exists before the step")));
        }
        if (state[e.id] == State::freed) fail(fmt::format("alloc of {}, which was already freed by entry {}", sname(e.id), changed_by[e.id]));
        if (e.bytes != g.storages()[e.id].bytes) {
          fail(fmt::format("alloc of {} with {} bytes; the storage has {}", sname(e.id), e.bytes, g.storages()[e.id].bytes));
        }
        state[e.id] = State::live;
        changed_by[e.id] = n;
        break;
      }
      case Kind::free: {
        if (state[e.id] == State::freed) fail(fmt::format("double free of {} (already freed by entry {})", sname(e.id), changed_by[e.id]));
        if (state[e.id] == State::absent) fail(fmt::format("free of {}, which was never allocated", sname(e.id)));
        if (g.storages()[e.id].producer == graph::kNoOp) {
          fail(fmt::format("free of {}, which exists before the step ({}); it must outlive the step", sname(e.id),
                           to_string(g.storages()[e.id].category)));
        }
        if (g.storages()[e.id].keep) fail(fmt::format("free of {}, which is kept beyond the step", sname(e.id)));
        state[e.id] = State::freed;
        changed_by[e.id] = n;
        break;
      }
      case Kind::ws_alloc: {
        const Op& op = g.ops()[e.id];
        if (ws_live[e.id]) fail(fmt::format("second workspace for op {} ({}) while one is live", e.id, op.name));
        if (e.bytes != op.workspace_bytes) {
          fail(fmt::format("workspace of op {} ({}) with {} bytes; the op has {}", e.id, op.name, e.bytes, op.workspace_bytes));
        }
        ws_live[e.id] = true;
        break;
      }
      case Kind::ws_free: {
        if (!ws_live[e.id]) fail(fmt::format("workspace free of op {} ({}), which has no live workspace", e.id, g.ops()[e.id].name));
        ws_live[e.id] = false;
        break;
      }
      case Kind::run: {
        const Op& op = g.ops()[e.id];
        if (ran[e.id]) fail(fmt::format("op {} ({}) runs twice (first at entry {})", e.id, op.name, ran[e.id]));
        auto check = [&](const std::vector<TensorId>& list, const char* verb) {
          for (TensorId t : list) {
            const uint32_t st = index(g.tensor(t).storage);
            if (state[st] != State::live) {
              fail(fmt::format("op {} ({}) {} tensor {} ({}) whose {} {}", e.id, op.name, verb, index(t), g.tensor(t).name,
                               sname(st), why_not_live(st)));
            }
          }
        };
        check(op.inputs, "reads");
        check(op.saved, "saves");
        check(op.outputs, "writes");
        check(op.holds, "holds");
        check(op.releases, "releases");
        if (op.workspace_bytes > 0 && !ws_live[e.id]) fail(fmt::format("op {} ({}) runs without its workspace", e.id, op.name));
        ran[e.id] = n;
        break;
      }
    }
  }
  for (size_t i = 0; i < g.n_ops(); ++i) {
    if (!ran[i]) {
      throw InputError(fmt::format("{}: entry {}: the schedule ends without running op {} ({})", s.source,
                                   s.entries.size(), i, g.ops()[i].name));
    }
  }
}

}  // namespace actsim::schedule
