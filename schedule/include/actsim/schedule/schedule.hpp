// actsim::schedule::Schedule — the simulated step as an ordered list of alloc / run / free, with the
// graph needed to execute it without the scenario (docs/schedule-format.md).
//
//   Analysis a = analyze(load_scenario("gpt2.toml", {}));
//   std::string text = emit_schedule(a);            // JSON lines; write with cli::write_atomic
//   Schedule s = parse_schedule("step.jsonl");       // InputError "step.jsonl:812: entry 17: ..."
//   for (const ScheduleEntry& e : s.entries) ...     // exactly the engine's order
//
// The entries come from an Observer on the real engine (sim::simulate), so they are the
// simulated order by construction: an op's outputs and workspace are allocated, it runs, its
// workspace is freed, then the storages whose last use it was are freed. Storages that exist
// before the step (parameters, buffers, optimizer state, inputs) have no alloc entry.
// parse_schedule checks everything a replay relies on before anything runs (see validate_schedule).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "actsim/graph/lower.hpp"

namespace actsim::schedule {

struct ScheduleEntry {
  enum class Kind : uint8_t { alloc, run, free, ws_alloc, ws_free };
  Kind kind = Kind::run;
  uint32_t id = 0;          // storage (alloc, free) or op (run, ws_alloc, ws_free)
  int64_t bytes = 0;        // alloc, ws_alloc, ws_free: bytes
  int64_t live = 0;         // memory entries: simulated device bytes in use after it
  int64_t time_ns = 0;      // simulated time of the event
  int64_t duration_ns = 0;  // run: simulated duration of the op
  bool is_memory() const { return kind != Kind::run; }
};
std::string_view to_string(ScheduleEntry::Kind k);

struct Schedule {
  std::string source;                   // file path, or the scenario's name
  graph::StepGraph step;                // graph, params, param_grads, loss
  std::vector<ScheduleEntry> entries;
  // What the scenario said (informational, and what replay needs to initialise buffers and to
  // decide whether a PyTorch cross-check applies).
  graph::ModelConfig model;
  graph::TrainingConfig training;
  graph::ProfileId profile = graph::ProfileId::torch_cuda;
  std::string device;                   // the simulated device's name
  std::string scenario_name;
  // Simulated figures of the step this schedule was taken from.
  int64_t simulated_peak_bytes = 0;
  int64_t simulated_live_step_start = 0;
  int64_t simulated_step_time_ns = 0;

  const graph::Graph& graph() const { return step.graph; }
  // Entry line in the file (1-based) for error messages; 0 when not read from a file.
  std::vector<int64_t> entry_line;      // [entries]
};

// The schedule as text (JSON lines, docs/schedule-format.md).
std::string to_text(const Schedule& s);
// Reads and validates a schedule file. Throws InputError naming the file, line and entry number.
Schedule parse_schedule(const std::string& path);
// The same from the text of a file already read (`path` names it in messages).
Schedule parse_schedule_text(const std::string& text, const std::string& path);
// The checks parse_schedule makes on the entries (also run on an in-memory schedule before a
// replay): every id known, no double free, no alloc of a live storage, every op reads, saves,
// holds and outputs only allocated storages, every op runs exactly once. Throws InputError.
void validate_schedule(const Schedule& s);
// Why op `id` breaks the op contract of docs/kernels.md (arity, ranks, shapes, dtypes of its
// tensors), or "" when it keeps it. parse_schedule refuses a schedule with such an op.
std::string op_contract_error(const graph::Graph& g, graph::OpId id);

// The model's configuration as JSON (the schedule header's `scenario`, and the `model` object of
// every output that names a model).
nlohmann::json model_json(const graph::ModelConfig& m);

}  // namespace actsim::schedule
