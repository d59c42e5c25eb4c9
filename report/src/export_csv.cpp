// The timeline as CSV: one row per memory event (or per merged run of small events), with the
// device bytes live per category after it.
#include <fmt/format.h>

#include "actsim/report/export.hpp"

namespace actsim::report {

using study::Analysis;

using graph::Category;
using graph::index;

namespace {
// RFC 4180 quoting, only where needed.
std::string csv_field(std::string_view s) {
  if (s.find_first_of(",\"\n") == std::string_view::npos) return std::string(s);
  std::string out = "\"";
  for (char c : s) {
    if (c == '"') out += '"';
    out += c;
  }
  return out + "\"";
}
}  // namespace

std::string timeline_csv(const Analysis& a, const Timeline& t, int64_t max_events) {
  const graph::Graph& g = a.step->graph;
  std::string o;
  o.reserve(t.events.size() * 90 + 512);
  auto out = std::back_inserter(o);
  o += "time_ns,event,tensor,op,layer,bytes";
  for (int c = 0; c < graph::kNumCategories; ++c) fmt::format_to(out, ",{}", graph::to_string(static_cast<Category>(c)));
  o += ",total\n";
  CategoryBytes live = t.start_by_category;
  int64_t total = t.start_live;
  auto live_cols = [&] {
    for (int64_t v : live) fmt::format_to(out, ",{}", v);
    fmt::format_to(out, ",{}\n", total);
  };
  o += "0,step_start,,,-1,0";
  live_cols();
  for (const TimelineRow& row : coarsen(t, max_events)) {
    int64_t net = 0;
    for (int64_t i = row.first; i <= row.last; ++i) {
      const MemEvent& e = t.events[static_cast<size_t>(i)];
      live[static_cast<size_t>(e.category)] += e.delta();
      total += e.delta();
      net += e.delta();
    }
    const MemEvent& e = t.events[static_cast<size_t>(row.last)];
    if (row.is_merged()) {
      // A run of small events: net bytes, the last event's time, no single tensor or op.
      fmt::format_to(out, "{},merged,{} events,,-1,{}", e.time_ns, row.last - row.first + 1, net);
    } else {
      const graph::Op& op = g.op(e.op);
      const std::string tensor = e.storage == kNoStorage ? "workspace"
                                 : g.storage(e.storage).first != graph::kNoTensor
                                     ? g.tensor(g.storage(e.storage).first).name
                                     : fmt::format("storage{}", index(e.storage));
      fmt::format_to(out, "{},{},{},{},{},{}", e.time_ns, to_string(e.kind), csv_field(tensor), csv_field(op.name),
                     op.layer, e.bytes);
    }
    live_cols();
  }
  return o;
}

}  // namespace actsim::report
