// The exports of a pipeline (issue 13, pprank): one Chrome trace process per rank class.
//
// A pipeline's figures come from the replay of its stages' schedules (study/src/pipeline*.cpp),
// not from one event log, so its trace is drawn from the replay: per rank class (a stage, with
// every dp and tp rank of it) a process named after its coordinates, one slice per forward,
// backward and optimizer step on its compute track, and a memory counter with the stage's live
// bytes before, at the peak of and after each action (the peak drawn at the action's middle).
// The counter's highest point is the class's peak in `simulate --json`'s `ranks`. The exports that
// describe one device's event log (--memviz, --csv, --report, --svg) are refused with one line.
#include <fmt/format.h>

#include <algorithm>

#include "actsim/report/export.hpp"
#include "actsim/study/pipeline.hpp"
#include "actsim/util/error.hpp"
#include "actsim/util/units.hpp"

namespace actsim::report {

namespace {

void append_us(std::string& out, int64_t ns) { fmt::format_to(std::back_inserter(out), "{}.{:03}", ns / 1000, ns % 1000); }

std::string coordinates(const graph::ParallelConfig& p, int64_t stage) {
  std::string c = fmt::format("pp stage {}, dp 0-{}", stage, p.dp - 1);
  if (p.tp > 1) c += fmt::format(", tp 0-{}", p.tp - 1);
  return c;
}

}  // namespace

void check_pipeline_exports(const study::Analysis& a, const ExportRequest& r) {
  if (!a.pipeline) return;
  const std::pair<const char*, const std::string*> one_device[] = {
      {"memviz", &r.memviz}, {"csv", &r.csv}, {"report", &r.report}, {"svg", &r.svg}};
  for (const auto& [k, v] : one_device) {
    if (!v->empty()) {
      throw InputError(fmt::format("--{}: holds one device's event log, and a pipeline ({}) has {} rank classes; "
                                   "--trace writes one process per rank class",
                                   k, a.scenario.where("parallel.pp"), a.pipeline->config.pp));
    }
  }
}

std::string pipeline_trace_json(const study::Analysis& a) {
  const study::Pipeline& pl = *a.pipeline;
  const graph::ParallelConfig& p = pl.config;
  const int64_t P = p.pp;
  std::string o;
  auto out = std::back_inserter(o);
  fmt::format_to(out,
                 "{{\"displayTimeUnit\":\"ns\",\n\"metadata\":{{\"tool\":\"actsim\",\"scenario\":\"{}\",\"device\":\"{}\","
                 "\"device_memory_bytes\":{},\"peak_bytes\":{},\"peak_rank_class\":{},\"step_time_ns\":{},\"rank_classes\":{}}},\n"
                 "\"traceEvents\":[\n",
                 json_escape(a.scenario.name), json_escape(a.scenario.device.name), a.scenario.device.memory_bytes,
                 pl.result.stages[static_cast<size_t>(pl.worst)].peak_bytes, pl.worst, pl.result.step_time_ns, P);
  bool first = true;
  auto sep = [&] {
    if (!first) o += ",\n";
    first = false;
  };
  for (int64_t st = 0; st < P; ++st) {
    const study::PpStageResult& r = pl.result.stages[static_cast<size_t>(st)];
    const int64_t pid = st + 1;
    sep();
    fmt::format_to(out, "{{\"ph\":\"M\",\"pid\":{},\"name\":\"process_name\",\"args\":{{\"name\":\"rank class {}: {} ({} rank{})\"}}}}",
                   pid, st, coordinates(p, st), p.dp * p.tp, p.dp * p.tp == 1 ? "" : "s");
    fmt::format_to(out, ",\n{{\"ph\":\"M\",\"pid\":{},\"name\":\"process_sort_index\",\"args\":{{\"sort_index\":{}}}}}", pid, st);
    fmt::format_to(out, ",\n{{\"ph\":\"M\",\"pid\":{},\"tid\":0,\"name\":\"thread_name\",\"args\":{{\"name\":\"stream 0 (compute)\"}}}}", pid);
    auto counter = [&](int64_t ns, int64_t v) {
      fmt::format_to(out, ",\n{{\"ph\":\"C\",\"pid\":{},\"name\":\"memory.total\",\"ts\":", pid);
      append_us(o, ns);
      fmt::format_to(out, ",\"args\":{{\"bytes\":{}}}}}", v);
    };
    counter(0, r.spans.empty() ? 0 : r.spans.front().live_before);
    int64_t peak_ns = 0, peak = r.spans.empty() ? 0 : r.spans.front().live_before;
    for (const study::PpSpan& s : r.spans) {
      const bool opt = s.action.mb < 0;
      const std::string name = opt ? std::string("optimizer step")
                                   : fmt::format("{} mb {}{}", s.action.backward ? "backward" : "forward", s.action.mb,
                                                 p.pp_chunks > 1 ? fmt::format(" chunk {}", s.action.chunk) : "");
      fmt::format_to(out, ",\n{{\"ph\":\"X\",\"pid\":{},\"tid\":0,\"name\":\"{}\",\"cat\":\"{}\",\"ts\":", pid, name,
                     opt ? "optimizer" : s.action.backward ? "backward" : "forward");
      append_us(o, s.start_ns);
      o += ",\"dur\":";
      append_us(o, s.end_ns - s.start_ns);
      fmt::format_to(out, ",\"args\":{{\"micro_batch\":{},\"chunk\":{},\"live_before\":{},\"peak\":{},\"live_after\":{}}}}}",
                     s.action.mb, s.action.chunk, s.live_before, s.peak, s.live_after);
      const int64_t mid = s.start_ns + (s.end_ns - s.start_ns) / 2;
      counter(s.start_ns, s.live_before);
      counter(mid, s.peak);
      counter(s.end_ns, s.live_after);
      if (s.peak > peak) peak = s.peak, peak_ns = mid;
    }
    fmt::format_to(out, ",\n{{\"ph\":\"i\",\"s\":\"p\",\"pid\":{},\"tid\":0,\"name\":\"peak\",\"ts\":", pid);
    append_us(o, peak_ns);
    fmt::format_to(out, ",\"args\":{{\"bytes\":{},\"human\":\"{}\",\"max_in_flight\":{}}}}}", peak, util::human_bytes(peak),
                   r.max_in_flight);
  }
  o += "\n]}\n";
  return o;
}

}  // namespace actsim::report
