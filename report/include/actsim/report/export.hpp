// actsim::report exporters — memory over time for the viewers people already use.
//
//   Analysis a = analyze(load_scenario("scenarios/gpt2-small.toml", {}));
//   write_exports(a, {.trace = "step.json", .memviz = "step.pickle", .report = "step.html"});
//   // step.json   -> ui.perfetto.dev / chrome://tracing
//   // step.pickle -> pytorch.org/memory_viz
//   // step.html   -> any browser, no network
//
// Every exporter works from a Timeline, derived from the engine's event log (sim/event_log.hpp:
// the one recorder, which the schedule's entries come from too), so the engine knows nothing about
// file formats (Taskflow's chrome observer, STYLE.md). Files are written
// atomically (FILE.tmp.<pid>, then rename): an error leaves no half file.
#pragma once

#include <array>
#include <cstdint>
#include <nlohmann/json_fwd.hpp>  // declarations only; .cpp files include <nlohmann/json.hpp>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "actsim/sim/engine.hpp"
#include "actsim/sim/event_log.hpp"
#include "actsim/study/analyze.hpp"
#include "actsim/util/output.hpp"

namespace actsim::report {


struct ExportRequest {
  std::string trace;        // Chrome trace JSON (Perfetto)
  std::string memviz;       // PyTorch memory_viz snapshot pickle
  std::string csv;          // one row per memory event
  std::string report;       // self-contained HTML report
  std::string svg;          // the report's chart alone
  int64_t max_events = 0;   // 0 = every event; else coarsen to about this many memory events
};

// Re-simulates a.tables with a recorder and writes every requested file atomically; throws
// InputError("FILE: cannot write ...") if one cannot be written (its temporary is removed).
void write_exports(const study::Analysis& a, const ExportRequest& r);
// The same files, rendered and added to `out` (written by out.commit(), all or nothing).
void add_exports(const study::Analysis& a, const ExportRequest& r, util::OutputSet& out);

// `actsim compare A.json B.json --report FILE.html`: overlays the "timeline" of two or more
// `simulate --json --timeline` outputs in one HTML page. Throws InputError naming a bad input.
// Returns the exit code (0).
int compare_runs(const std::vector<std::string>& json_files, const std::string& report_html);

// [[time_ns, total_bytes, bytes per graph::Category in enum order...], ...]: device bytes live
// over the step, at most kTimelinePoints points (each time bin keeps its highest point, so the
// peak is always one of them). For `simulate --json --timeline`.
nlohmann::json timeline_json(const study::Analysis& a);
inline constexpr int64_t kTimelinePoints = 4000;

// ---- lower level: used by the exporters, the tests and the benchmark ----

enum class MemEventKind : uint8_t { alloc, free, workspace_alloc, workspace_free };
std::string_view to_string(MemEventKind k);

// One device-memory event, in engine order (host storages are not device memory: left out).
struct MemEvent {
  int64_t time_ns = 0;
  int64_t bytes = 0;                          // > 0
  graph::StorageId storage{0xffffffffu};             // kNoStorage for workspace events
  graph::OpId op = graph::kNoOp;                     // op allocating / whose end frees it
  MemEventKind kind = MemEventKind::alloc;
  graph::Category category = graph::Category::activation;

  int64_t delta() const { return kind == MemEventKind::alloc || kind == MemEventKind::workspace_alloc ? bytes : -bytes; }
};
inline constexpr graph::StorageId kNoStorage{0xffffffffu};

struct OpSpan {
  int64_t start_ns = -1, end_ns = -1;         // -1 = did not run
};

using CategoryBytes = std::array<int64_t, graph::kNumCategories>;  // [Category]

struct Timeline {
  CategoryBytes start_by_category{};          // live before the first op (persistent storages)
  int64_t start_live = 0;
  std::vector<MemEvent> events;               // engine order
  std::vector<OpSpan> ops;                    // [n_ops]
  int64_t peak_event = -1;                    // first event reaching the peak; -1 = step start
  int64_t step_time_ns = 0;
};

// Re-simulates the analysis's plan with the engine's one event recorder (sim::record_events) and
// derives the timeline from its log.
Timeline record_timeline(const study::Analysis& a);
// The timeline of an event log of `g`'s plan: device memory events only (host storages and empty
// ones are not device memory), bytes as the allocator counts them, op spans, the peak event.
Timeline timeline_of(const graph::Graph& g, const sim::EventLog& log);

// A row of a coarsened timeline: events [first, last] in one row (one event, or a run of small
// events merged). Without coarsening every event is its own row.
struct TimelineRow {
  int64_t first = 0, last = 0;                // event indices, inclusive
  bool is_merged() const { return last > first; }
};
// Rows for at most about `max_events` rows (0 = one per event): events under a size threshold
// between two kept events merge into one row; the peak event is always its own row.
std::vector<TimelineRow> coarsen(const Timeline& t, int64_t max_events);
// Smallest allocation size kept as its own event when coarsening to max_events (0 = all kept).
int64_t coarsen_threshold(const Timeline& t, int64_t max_events);

std::string chrome_trace_json(const study::Analysis& a, const Timeline& t, int64_t max_events = 0);
// zero_redundancy (issue 13): under torch's ZeroRedundancyOptimizer, one process per rank class
// (`a.zero_ranks`), each drawn from its class's own analysis as chrome_trace_json draws one.
std::string zero_redundancy_trace_json(const study::Analysis& a, int64_t max_events = 0);
// ---- pprank (issue 13): a pipeline's exports (export_pipeline.cpp) ----
// The Chrome trace of a pipeline: one process per rank class (a stage; pid stage + 1, its
// process_name naming its coordinates), its actions as slices and its live bytes as a counter
// whose highest point is the class's peak.
std::string pipeline_trace_json(const study::Analysis& a);
// Throws the one-line InputError for an export that holds one device (--memviz, --csv, --report,
// --svg) asked of a pipeline; does nothing for a single-rank analysis.
void check_pipeline_exports(const study::Analysis& a, const ExportRequest& r);
// ---- end pprank ----
std::string memviz_pickle(const study::Analysis& a, const Timeline& t, int64_t max_events = 0);
std::string timeline_csv(const study::Analysis& a, const Timeline& t, int64_t max_events = 0);
std::string report_html(const study::Analysis& a, const Timeline& t);
std::string chart_svg(const study::Analysis& a, const Timeline& t);

// "a\"b" for JSON / &lt;&amp; for HTML: the exporters' string escaping.
std::string json_escape(std::string_view s);
std::string html_escape(std::string_view s);
// A stable colour per category ("#e15759"), shared by the chart, the report and the trace.
std::string_view category_colour(graph::Category c);

}  // namespace actsim::report
