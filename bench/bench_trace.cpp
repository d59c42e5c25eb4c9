// Benchmark: time to record the timeline and write each export for a 96-layer model at batch 64
// (the scale target: the trace in under 1 s).
//
//   bench_trace [KEY=VALUE ...]      defaults: model.n_layers=96 training.batch_size=64
#include <fmt/format.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>

#include "actsim/report/export.hpp"
#include "actsim/util/units.hpp"

using namespace actsim;
using Clock = std::chrono::steady_clock;

namespace {
double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }
}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> sets = {"model.n_layers=96", "training.batch_size=64"};
  for (int i = 1; i < argc; ++i) sets.emplace_back(argv[i]);
  auto t0 = Clock::now();
  const study::Analysis a = study::analyze(study::load_scenario("", sets));
  fmt::print("scenario: {} (n_layers {}, batch {}): {} ops, peak {}, analyze {:.3f} s\n", a.scenario.name,
             a.scenario.model.n_layers, a.scenario.training.batch_size, a.step->graph.n_ops(),
             util::human_bytes(a.result.peak_bytes), seconds_since(t0));
  const std::string dir = (std::filesystem::temp_directory_path() / fmt::format("actsim_bench_{}", ::getpid())).string();
  std::filesystem::create_directories(dir);

  t0 = Clock::now();
  const report::Timeline t = report::record_timeline(a);
  const double record_s = seconds_since(t0);
  fmt::print("record_timeline: {} memory events, {:.3f} s\n", t.events.size(), record_s);

  auto bench = [&](const char* what, const std::string& file, auto&& render) {
    auto s0 = Clock::now();
    const std::string bytes = render();
    const double render_s = seconds_since(s0);
    s0 = Clock::now();
    report::write_file_atomic(dir + "/" + file, bytes);
    const double write_s = seconds_since(s0);
    fmt::print("{:<28} {:>10.1f} MiB  render {:.3f} s  write {:.3f} s  (with recording {:.3f} s)\n", what,
               static_cast<double>(bytes.size()) / 1048576.0, render_s, write_s, record_s + render_s + write_s);
  };
  bench("trace (all events)", "trace.json", [&] { return report::chrome_trace_json(a, t); });
  bench("trace (--max-events 20000)", "trace_small.json", [&] { return report::chrome_trace_json(a, t, 20000); });
  bench("memviz (all events)", "snapshot.pickle", [&] { return report::memviz_pickle(a, t); });
  bench("memviz (--max-events 20000)", "snapshot_small.pickle", [&] { return report::memviz_pickle(a, t, 20000); });
  bench("csv (all events)", "events.csv", [&] { return report::timeline_csv(a, t); });
  bench("report html", "report.html", [&] { return report::report_html(a, t); });

  t0 = Clock::now();
  report::write_exports(a, {.trace = dir + "/trace2.json"});
  fmt::print("write_exports(trace only, end to end incl. re-simulation): {:.3f} s\n", seconds_since(t0));
  std::filesystem::remove_all(dir);
  return 0;
}
