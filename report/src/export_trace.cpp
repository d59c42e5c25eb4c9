// The timeline (derived from the engine's event log, sim/event_log.hpp), coarsening,
// write_exports, and the Chrome trace exporter.
#include <fmt/format.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "actsim/util/error.hpp"
#include "actsim/report/export.hpp"
#include "actsim/util/output.hpp"
#include "actsim/util/units.hpp"
#include "actsim/report/summary.hpp"
#include "actsim/sim/event_log.hpp"

namespace actsim::report {

using graph::OpId;
using graph::StorageId;
using sim::Observer;
using sim::StepTables;
using sim::SimResult;
using sim::simulate;
using study::Analysis;
using util::human_bytes;
using util::OutputSet;

using graph::Category;
using graph::index;

std::string_view to_string(MemEventKind k) {
  switch (k) {
    case MemEventKind::alloc: return "alloc";
    case MemEventKind::free: return "free";
    case MemEventKind::workspace_alloc: return "workspace_alloc";
    case MemEventKind::workspace_free: return "workspace_free";
  }
  return "?";
}

std::string json_escape(std::string_view s) {
  std::string out;
  out.reserve(s.size());
  for (char c : s) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\t': out += "\\t"; break;
      default:
        if (static_cast<unsigned char>(c) < 0x20) out += fmt::format("\\u{:04x}", static_cast<int>(c));
        else out += c;
    }
  }
  return out;
}

std::string html_escape(std::string_view s) {
  std::string out;
  out.reserve(s.size());
  for (char c : s) {
    switch (c) {
      case '<': out += "&lt;"; break;
      case '>': out += "&gt;"; break;
      case '&': out += "&amp;"; break;
      case '"': out += "&quot;"; break;
      default: out += c;
    }
  }
  return out;
}

std::string_view category_colour(Category c) {
  // Tableau 10: distinguishable, and readable for the common colour-vision deficiencies.
  static constexpr std::array<std::string_view, graph::kNumCategories> kColours = {
      "#4e79a7", "#9c755f", "#f28e2b", "#76b7b2", "#e15759", "#59a14f", "#edc948"};
  return kColours[static_cast<size_t>(c)];
}

Timeline timeline_of(const graph::Graph& g, const sim::EventLog& log) {
  Timeline t;
  t.ops.assign(g.n_ops(), {});
  for (const graph::Storage& st : g.storages()) {
    if (st.producer != graph::kNoOp || st.location == graph::Location::host) continue;
    t.start_by_category[static_cast<size_t>(st.category)] += g.allocated(st.bytes);
    t.start_live += g.allocated(st.bytes);
  }
  t.events.reserve(static_cast<size_t>(log.result.events));
  int64_t live = t.start_live, best = t.start_live;
  auto track = [&](int64_t engine_live) {
    live += t.events.back().delta();
    ACTSIM_ASSERT(live == engine_live, "recorded timeline disagrees with the engine's live bytes");
    if (live > best) {
      best = live;
      t.peak_event = static_cast<int64_t>(t.events.size()) - 1;
    }
  };
  for (const sim::EngineEvent& e : log.events) {
    switch (e.kind) {
      case sim::EngineEvent::Kind::op_start: t.ops[e.id].start_ns = e.time_ns; break;
      case sim::EngineEvent::Kind::op_end: t.ops[e.id].end_ns = e.time_ns; break;
      case sim::EngineEvent::Kind::alloc:
      case sim::EngineEvent::Kind::free: {
        const StorageId s{e.id};
        const graph::Storage& st = g.storage(s);
        if (st.location == graph::Location::host || st.bytes <= 0) break;  // not device memory
        t.events.push_back({.time_ns = e.time_ns, .bytes = g.allocated(st.bytes), .storage = s, .op = e.by,
                            .kind = e.kind == sim::EngineEvent::Kind::alloc ? MemEventKind::alloc : MemEventKind::free,
                            .category = st.category});
        track(e.live);
        break;
      }
      case sim::EngineEvent::Kind::workspace_alloc:
      case sim::EngineEvent::Kind::workspace_free:
        t.events.push_back({.time_ns = e.time_ns, .bytes = e.bytes, .storage = kNoStorage, .op = OpId{e.id},
                            .kind = e.kind == sim::EngineEvent::Kind::workspace_alloc ? MemEventKind::workspace_alloc
                                                                                      : MemEventKind::workspace_free,
                            .category = Category::temporary});
        track(e.live);
        break;
    }
  }
  t.step_time_ns = log.result.step_time_ns;
  return t;
}

Timeline record_timeline(const Analysis& a) {
  const sim::EventLog log = sim::record_events(*a.tables);
  ACTSIM_ASSERT(log.result.peak_bytes == a.result.peak_bytes, "re-simulation gave another peak");
  return timeline_of(a.step->graph, log);
}

int64_t coarsen_threshold(const Timeline& t, int64_t max_events) {
  if (max_events <= 0 || static_cast<int64_t>(t.events.size()) <= max_events) return 0;
  // Keep the largest events as themselves (about a quarter of the budget, each alloc with its
  // free); runs of smaller ones between two kept events become one row each, so rows <= budget.
  std::vector<int64_t> sizes;
  sizes.reserve(t.events.size());
  for (const MemEvent& e : t.events) sizes.push_back(e.bytes);
  const size_t keep = static_cast<size_t>(std::max<int64_t>(1, max_events / 2 - 2));
  std::nth_element(sizes.begin(), sizes.begin() + static_cast<std::ptrdiff_t>(keep), sizes.end(), std::greater<>());
  // Strictly above the keep-th size, so ties never push the count over the budget.
  return sizes[keep] + 1;
}

std::vector<TimelineRow> coarsen(const Timeline& t, int64_t max_events) {
  const int64_t n = static_cast<int64_t>(t.events.size());
  std::vector<TimelineRow> rows;
  const int64_t threshold = coarsen_threshold(t, max_events);
  if (threshold == 0) {
    rows.reserve(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) rows.push_back({i, i});
    return rows;
  }
  int64_t run = -1;  // first event of the open run of small events
  for (int64_t i = 0; i < n; ++i) {
    const bool keep = t.events[static_cast<size_t>(i)].bytes >= threshold || i == t.peak_event;
    if (keep) {
      if (run >= 0) rows.push_back({run, i - 1});
      run = -1;
      rows.push_back({i, i});
    } else if (run < 0) {
      run = i;
    }
  }
  if (run >= 0) rows.push_back({run, n - 1});
  return rows;
}

void add_exports(const Analysis& a, const ExportRequest& r, OutputSet& out) {
  if (r.trace.empty() && r.memviz.empty() && r.csv.empty() && r.report.empty() && r.svg.empty()) return;
  if (r.max_events < 0) throw InputError(fmt::format("--max-events {}: must be 0 (all) or positive", r.max_events));
  if (a.pipeline) {  // issue 13: one trace process per rank class; the one-device exports refused
    check_pipeline_exports(a, r);
    out.add("--trace", r.trace, pipeline_trace_json(a));
    return;
  }
  const Timeline t = record_timeline(a);
  // Render everything first, then write: a rendering bug never leaves some files written.
  // Under torch's ZeroRedundancyOptimizer the trace has one process per rank class (issue 13); the
  // one-device exports draw the class with the highest peak, as the JSON's top level.
  if (!r.trace.empty()) {
    out.add("--trace", r.trace, a.zero_ranks ? zero_redundancy_trace_json(a, r.max_events) : chrome_trace_json(a, t, r.max_events));
  }
  if (!r.memviz.empty()) out.add("--memviz", r.memviz, memviz_pickle(a, t, r.max_events));
  if (!r.csv.empty()) out.add("--csv", r.csv, timeline_csv(a, t, r.max_events));
  if (!r.report.empty()) out.add("--report", r.report, report_html(a, t));
  if (!r.svg.empty()) out.add("--svg", r.svg, chart_svg(a, t));
}

void write_exports(const Analysis& a, const ExportRequest& r) {
  OutputSet out;
  add_exports(a, r, out);
  out.commit();
}

namespace {

// Simulated nanoseconds as trace microseconds, exactly ("1234.567").
void append_us(std::string& out, int64_t ns) { fmt::format_to(std::back_inserter(out), "{}.{:03}", ns / 1000, ns % 1000); }

// One process of a Chrome trace (pid, named `process_name`): the memory counters, one slice per
// op on its stream's track, and the peak with what makes it up. pid 1 is the trace's first event.
void append_process(std::string& o, const Analysis& a, const Timeline& t, int64_t max_events, int pid,
                    const std::string& process_name) {
  const graph::Graph& g = a.step->graph;
  const SimResult& res = a.result;
  auto out = std::back_inserter(o);
  fmt::format_to(out, "{}{{\"ph\":\"M\",\"pid\":{},\"name\":\"process_name\",\"args\":{{\"name\":\"{}\"}}}}",
                 pid == 1 ? "" : ",\n", pid, json_escape(process_name));
  if (pid != 1) fmt::format_to(out, ",\n{{\"ph\":\"M\",\"pid\":{},\"name\":\"process_sort_index\",\"args\":{{\"sort_index\":{}}}}}", pid, pid - 1);
  int32_t n_streams = 1;
  for (const graph::Op& op : g.ops()) n_streams = std::max(n_streams, op.stream + 1);
  for (int32_t s = 0; s < n_streams; ++s) {
    fmt::format_to(out, ",\n{{\"ph\":\"M\",\"pid\":{},\"tid\":{},\"name\":\"thread_name\",\"args\":{{\"name\":\"stream {}{}\"}}}}",
                   pid, s, s, s == 0 ? " (compute)" : s == 1 ? " (copy)" : "");
  }
  // Counters: one track for the total and one per category (emitted when it changes).
  auto counter = [&](std::string_view name, int64_t ns, int64_t v) {
    fmt::format_to(out, ",\n{{\"ph\":\"C\",\"pid\":{},\"name\":\"", pid);
    o += name;
    o += "\",\"ts\":";
    append_us(o, ns);
    fmt::format_to(out, ",\"args\":{{\"bytes\":{}}}}}", v);
  };
  std::array<std::string, graph::kNumCategories> cat_track;
  for (int c = 0; c < graph::kNumCategories; ++c) cat_track[c] = fmt::format("memory.{}", graph::to_string(static_cast<Category>(c)));
  CategoryBytes live = t.start_by_category, shown = live;
  int64_t total = t.start_live;
  counter("memory.total", 0, total);
  for (int c = 0; c < graph::kNumCategories; ++c) counter(cat_track[c], 0, live[c]);
  for (const TimelineRow& row : coarsen(t, max_events)) {
    for (int64_t i = row.first; i <= row.last; ++i) {
      const MemEvent& e = t.events[static_cast<size_t>(i)];
      live[static_cast<size_t>(e.category)] += e.delta();
      total += e.delta();
    }
    const int64_t ns = t.events[static_cast<size_t>(row.last)].time_ns;
    counter("memory.total", ns, total);
    for (int c = 0; c < graph::kNumCategories; ++c) {
      if (live[c] != shown[c]) counter(cat_track[c], ns, live[c]), shown[c] = live[c];
    }
  }
  // Op slices, one track per stream. When coarsening, the longest ops fill half the budget.
  int64_t min_dur = 0;
  if (max_events > 0 && static_cast<int64_t>(g.n_ops()) > max_events / 2) {
    std::vector<int64_t> d;
    for (const OpSpan& s : t.ops) d.push_back(s.end_ns - s.start_ns);
    const size_t k = static_cast<size_t>(std::max<int64_t>(1, max_events / 2));
    std::nth_element(d.begin(), d.begin() + static_cast<std::ptrdiff_t>(k), d.end(), std::greater<>());
    min_dur = d[k] + 1;
  }
  for (size_t i = 0; i < g.n_ops(); ++i) {
    const OpSpan& s = t.ops[i];
    const graph::Op& op = g.ops()[i];
    if (s.start_ns < 0 || s.end_ns - s.start_ns < min_dur) continue;
    fmt::format_to(out, ",\n{{\"ph\":\"X\",\"pid\":{},\"tid\":", pid);
    fmt::format_to(out, "{},\"name\":\"{}\",\"cat\":\"{}\",\"ts\":", op.stream,
                   json_escape(op.name.empty() ? graph::to_string(op.kind) : std::string_view(op.name)),
                   graph::to_string(op.phase));
    append_us(o, s.start_ns);
    o += ",\"dur\":";
    append_us(o, s.end_ns - s.start_ns);
    fmt::format_to(out, ",\"args\":{{\"op\":\"{}\",\"layer\":{},\"phase\":\"{}\",\"flops\":{},\"bytes_moved\":{}",
                   graph::to_string(op.kind), op.layer, graph::to_string(op.phase), static_cast<int64_t>(op.flops),
                   op.bytes_moved);
    if (op.workspace_bytes > 0) fmt::format_to(out, ",\"workspace_bytes\":{}", op.workspace_bytes);
    if (!op.saved.empty()) {
      o += ",\"saves\":[";
      for (size_t k = 0; k < op.saved.size(); ++k) {
        const graph::Tensor& tt = g.tensor(op.saved[k]);
        fmt::format_to(out, "{}\"{} {} {}\"", k ? "," : "", json_escape(tt.name), graph::shape_string(tt.shape),
                       graph::to_string(tt.dtype));
      }
      o += "]";
    }
    o += "}}";
  }
  // The peak, with what makes it up.
  const graph::Op& pop = g.op(res.peak_op);
  fmt::format_to(out, ",\n{{\"ph\":\"i\",\"s\":\"g\",\"pid\":{},\"tid\":0,\"name\":\"peak\",\"ts\":", pid);
  append_us(o, res.peak_time_ns);
  fmt::format_to(out, ",\"args\":{{\"bytes\":{},\"human\":\"{}\",\"op\":\"{}\",\"phase\":\"{}\",\"top\":[", res.peak_bytes,
                 human_bytes(res.peak_bytes), json_escape(pop.name), graph::to_string(res.peak_phase));
  std::vector<PeakGroup> groups = peak_groups(a);
  for (size_t k = 0; k < groups.size() && k < 8; ++k) {
    const PeakGroup& pg = groups[k];
    fmt::format_to(out, "{}\"{} {} layer {} ({} storages): {}\"", k ? "," : "", graph::to_string(pg.category),
                   json_escape(pg.op), pg.layer, pg.count, human_bytes(pg.bytes));
  }
  o += "]}}";
}

}  // namespace

std::string chrome_trace_json(const Analysis& a, const Timeline& t, int64_t max_events) {
  const graph::Graph& g = a.step->graph;
  const SimResult& res = a.result;
  std::string o;
  o.reserve(t.events.size() * 110 + g.n_ops() * 200 + 4096);
  auto out = std::back_inserter(o);
  fmt::format_to(out,
                 "{{\"displayTimeUnit\":\"ns\",\n\"metadata\":{{\"tool\":\"actsim\",\"scenario\":\"{}\",\"device\":\"{}\","
                 "\"device_memory_bytes\":{},\"peak_bytes\":{},\"peak_time_ns\":{},\"step_time_ns\":{},"
                 "\"memory_events\":{},\"max_events\":{}}},\n\"traceEvents\":[\n",
                 json_escape(a.scenario.name), json_escape(a.scenario.device.name), a.scenario.device.memory_bytes,
                 res.peak_bytes, res.peak_time_ns, t.step_time_ns, t.events.size(), max_events);
  append_process(o, a, t, max_events, 1, fmt::format("actsim: {}", a.scenario.name));
  o += "\n]}\n";
  return o;
}

// zero_redundancy (issue 13): one process per rank class of torch's ZeroRedundancyOptimizer, each
// drawn from its own analysis; the metadata's peak is the highest class's (the JSON's top level).
std::string zero_redundancy_trace_json(const Analysis& a, int64_t max_events) {
  const study::ZeroRedundancyRanks& zr = *a.zero_ranks;
  std::string o;
  auto out = std::back_inserter(o);
  int64_t step_ns = 0;
  for (const study::ZeroRankClass& c : zr.classes) step_ns = std::max(step_ns, (c.analysis ? *c.analysis : a).result.step_time_ns);
  fmt::format_to(out,
                 "{{\"displayTimeUnit\":\"ns\",\n\"metadata\":{{\"tool\":\"actsim\",\"scenario\":\"{}\",\"device\":\"{}\","
                 "\"device_memory_bytes\":{},\"peak_bytes\":{},\"peak_rank_class\":{},\"step_time_ns\":{},\"rank_classes\":{},"
                 "\"max_events\":{}}},\n\"traceEvents\":[\n",
                 json_escape(a.scenario.name), json_escape(a.scenario.device.name), a.scenario.device.memory_bytes,
                 a.result.peak_bytes, zr.worst, step_ns, zr.classes.size(), max_events);
  for (size_t c = 0; c < zr.classes.size(); ++c) {
    const study::ZeroRankClass& rc = zr.classes[c];
    const Analysis& ca = rc.analysis ? *rc.analysis : a;
    std::string ranks;
    for (size_t k = 0; k < rc.ranks.size(); ++k) ranks += fmt::format("{}{}", k ? "," : "", rc.ranks[k]);
    append_process(o, ca, record_timeline(ca), max_events, static_cast<int>(c) + 1,
                   fmt::format("rank class {}: dp {} ({} rank{}, {} parameter elements)", c, ranks, rc.ranks.size(),
                               rc.ranks.size() == 1 ? "" : "s", rc.params));
  }
  o += "\n]}\n";
  return o;
}

}  // namespace actsim::report
