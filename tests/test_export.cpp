#include <catch2/catch.hpp>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>
#include <nlohmann/json.hpp>

#include "actsim/util/error.hpp"
#include "actsim/report/export.hpp"
#include "actsim/util/units.hpp"
#include "actsim/report/summary.hpp"
#include "pickle.hpp"  // report/src: internal to the memory_viz exporter

using namespace actsim;
using namespace actsim::study;
using namespace actsim::report;
using actsim::util::human_bytes;

namespace {

const Analysis& tiny() {
  static const Analysis a = analyze(load_scenario(
      "", {"model.n_layers=2", "model.d_model=64", "model.n_heads=4", "model.seq_len=32", "model.vocab_size=128",
           "training.batch_size=2"}));
  return a;
}

std::filesystem::path scratch(const std::string& name) {
  auto d = std::filesystem::temp_directory_path() / ("actsim_test_export_" + std::to_string(::getpid()));
  std::filesystem::create_directories(d);
  return d / name;
}

std::string slurp(const std::filesystem::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

bool has_temporaries(const std::filesystem::path& dir) {
  for (const auto& e : std::filesystem::directory_iterator(dir)) {
    if (e.path().filename().string().find(".tmp.") != std::string::npos) return true;
  }
  return false;
}

}  // namespace

TEST_CASE("report::record_timeline: replaying the events reproduces the engine's peak and end state", "[export]") {
  const Analysis& a = tiny();
  const Timeline t = record_timeline(a);
  REQUIRE(!t.events.empty());
  REQUIRE(t.start_live == a.result.live_step_start);
  int64_t live = t.start_live, best = live, best_time = 0;
  int64_t prev_time = 0;
  for (const MemEvent& e : t.events) {
    REQUIRE(e.time_ns >= prev_time);
    REQUIRE(e.bytes > 0);
    prev_time = e.time_ns;
    live += e.delta();
    if (live > best) best = live, best_time = e.time_ns;
  }
  CHECK(best == a.result.peak_bytes);
  CHECK(best_time == a.result.peak_time_ns);
  CHECK(live == a.result.live_end_step);
  REQUIRE(t.peak_event >= 0);
  CHECK(t.events[static_cast<size_t>(t.peak_event)].time_ns == a.result.peak_time_ns);
  CHECK(t.step_time_ns == a.result.step_time_ns);
}

TEST_CASE("report::chrome_trace_json: the total counter peaks at the simulated peak, at its time", "[export]") {
  const Analysis& a = tiny();
  const Timeline t = record_timeline(a);
  const nlohmann::json j = nlohmann::json::parse(chrome_trace_json(a, t));
  REQUIRE(j["metadata"]["scenario"] == a.scenario.name);
  int64_t best = -1;
  std::string best_ts;
  int slices = 0, instants = 0;
  std::set<std::string> tracks;
  for (const auto& e : j["traceEvents"]) {
    const std::string ph = e["ph"];
    if (ph == "C") {
      tracks.insert(e["name"].get<std::string>());
      if (e["name"] == "memory.total" && e["args"]["bytes"].get<int64_t>() > best) {
        best = e["args"]["bytes"].get<int64_t>();
        best_ts = e["ts"].dump();
      }
    } else if (ph == "X") {
      ++slices;
      REQUIRE(e["args"].contains("op"));
      REQUIRE(e["args"].contains("layer"));
      REQUIRE(e["args"].contains("flops"));
      REQUIRE(e["args"].contains("bytes_moved"));
    } else if (ph == "i") {
      ++instants;
      CHECK(e["args"]["bytes"].get<int64_t>() == a.result.peak_bytes);
    }
  }
  CHECK(best == a.result.peak_bytes);
  CHECK(std::llround(std::stod(best_ts) * 1000) == a.result.peak_time_ns);
  CHECK(slices == static_cast<int>(a.step->graph.n_ops()));
  CHECK(instants == 1);
  CHECK(tracks.count("memory.activations") == 1);
  CHECK(tracks.size() == 1 + graph::kNumCategories);
}

TEST_CASE("report::coarsen: rows stay within the budget, keep the peak, and sum to the same end state", "[export]") {
  const Analysis& a = tiny();
  const Timeline t = record_timeline(a);
  const int64_t n = static_cast<int64_t>(t.events.size());
  CHECK(coarsen(t, 0).size() == t.events.size());
  CHECK(coarsen(t, n * 2).size() == t.events.size());
  for (int64_t budget : {int64_t{8}, int64_t{50}, n / 3}) {
    const std::vector<TimelineRow> rows = coarsen(t, budget);
    CHECK(static_cast<int64_t>(rows.size()) <= budget + 2);
    int64_t next = 0;
    bool peak_alone = false;
    for (const TimelineRow& r : rows) {
      REQUIRE(r.first == next);  // contiguous, in order, covering every event
      next = r.last + 1;
      if (r.first == t.peak_event && r.last == t.peak_event) peak_alone = true;
    }
    CHECK(next == n);
    CHECK(peak_alone);
    // The trace written with this budget still shows the exact peak.
    const nlohmann::json j = nlohmann::json::parse(chrome_trace_json(a, t, budget));
    int64_t best = 0;
    for (const auto& e : j["traceEvents"]) {
      if (e["ph"] == "C" && e["name"] == "memory.total") best = std::max(best, e["args"]["bytes"].get<int64_t>());
    }
    CHECK(best == a.result.peak_bytes);
  }
}

TEST_CASE("report::PickleWriter: writes the exact protocol-2 opcodes", "[export]") {
  PickleWriter p;
  p.begin_list();
  p.integer(1);
  p.integer(300);
  p.integer(-2);
  p.integer(int64_t{1} << 40);
  p.integer(-(int64_t{1} << 40));
  p.str("ab");
  p.str("ab");
  p.boolean(true);
  p.none();
  p.end_list();
  const std::string b = p.finish();
  const std::string want = std::string("\x80\x02]") + "(" + "K\x01" + "M\x2c\x01" + std::string("J\xfe\xff\xff\xff", 5) +
                           std::string("\x8a\x06\x00\x00\x00\x00\x00\x01", 8) +
                           std::string("\x8a\x06\x00\x00\x00\x00\x00\xff", 8) + std::string("X\x02\x00\x00\x00" "ab", 7) +
                           std::string("q\x00", 2) + std::string("h\x00", 2) + "\x88" + "N" + "e" + ".";
  CHECK(b == want);
}

TEST_CASE("report::timeline_csv: one row per event and the last row is the end of the step", "[export]") {
  const Analysis& a = tiny();
  const Timeline t = record_timeline(a);
  const std::string csv = timeline_csv(a, t);
  std::istringstream in(csv);
  std::string line, last;
  size_t rows = 0;
  std::getline(in, line);
  CHECK(line.rfind("time_ns,event,tensor,op,layer,bytes,parameters,", 0) == 0);
  while (std::getline(in, line)) ++rows, last = line;
  CHECK(rows == t.events.size() + 1);  // + the step_start row
  CHECK(last.substr(last.rfind(',') + 1) == std::to_string(a.result.live_end_step));
}

TEST_CASE("report::report_html: self-contained page with the chart, the peak label and the tables", "[export]") {
  const Analysis& a = tiny();
  const Timeline t = record_timeline(a);
  const std::string html = report_html(a, t);
  CHECK(html.find("id=\"peak-label\"") != std::string::npos);
  CHECK(html.find("<polygon class=\"area\" data-category=\"activations\"") != std::string::npos);
  CHECK(html.find("id=\"peak-storages\"") != std::string::npos);
  CHECK(html.find("id=\"layer-bars\"") != std::string::npos);
  CHECK(html.find("http://") == html.find("http://www.w3.org/2000/svg"));  // only the SVG namespace
  CHECK(html.find("https://") == std::string::npos);
  CHECK(html.find("<script") == std::string::npos);
  const std::string svg = chart_svg(a, t);
  CHECK(svg.rfind("<?xml", 0) == 0);
  CHECK(svg.find("id=\"peak-label\"") != std::string::npos);
}

TEST_CASE("report::timeline_json: at most kTimelinePoints points, the peak among them", "[export]") {
  const Analysis& a = tiny();
  const nlohmann::json j = timeline_json(a);
  REQUIRE(j.is_array());
  CHECK(j.size() <= static_cast<size_t>(kTimelinePoints));
  int64_t best = 0;
  for (const auto& p : j) {
    REQUIRE(p.size() == 2 + graph::kNumCategories);
    int64_t sum = 0;
    for (size_t k = 2; k < p.size(); ++k) sum += p[k].get<int64_t>();
    REQUIRE(sum == p[1].get<int64_t>());
    best = std::max(best, p[1].get<int64_t>());
  }
  CHECK(best == a.result.peak_bytes);
}

TEST_CASE("report::write_exports: writes every file atomically, an unwritable path throws and leaves nothing", "[export]") {
  const Analysis& a = tiny();
  const auto dir = scratch("ok");
  std::filesystem::create_directories(dir);
  ExportRequest r{.trace = (dir / "t.json").string(), .memviz = (dir / "m.pickle").string(),
                  .csv = (dir / "e.csv").string(), .report = (dir / "r.html").string(), .svg = (dir / "c.svg").string()};
  write_exports(a, r);
  for (const char* f : {"t.json", "m.pickle", "e.csv", "r.html", "c.svg"}) CHECK(std::filesystem::file_size(dir / f) > 0);
  CHECK(!has_temporaries(dir));
  CHECK(slurp(dir / "m.pickle").rfind("\x80\x02", 0) == 0);

  const std::string bad = (dir / "no-such-dir" / "t.json").string();
  try {
    write_exports(a, {.trace = bad});
    FAIL("expected InputError");
  } catch (const InputError& e) {
    CHECK(std::string(e.what()).rfind("--trace " + bad + ": cannot write", 0) == 0);  // the option, then the file
  }
  // A directory in the way of the rename: the temporary is written, then removed.
  std::filesystem::create_directories(dir / "blocked.json" / "x");
  CHECK_THROWS_AS(write_exports(a, {.trace = (dir / "blocked.json").string()}), InputError);
  CHECK(!has_temporaries(dir));
  CHECK_THROWS_AS(write_exports(a, {.trace = (dir / "t2.json").string(), .max_events = -1}), InputError);
  std::filesystem::remove_all(dir.parent_path());
}

TEST_CASE("report::compare_runs: overlays two timelines, a JSON without a timeline is bad input", "[export]") {
  const Analysis& a = tiny();
  const auto dir = scratch("cmp");
  std::filesystem::create_directories(dir);
  nlohmann::json j = to_json(a);
  j["timeline"] = timeline_json(a);
  std::ofstream(dir / "a.json") << j.dump();
  j["scenario"] = "other";
  std::ofstream(dir / "b.json") << j.dump();
  const std::string html = (dir / "cmp.html").string();
  CHECK(compare_runs({(dir / "a.json").string(), (dir / "b.json").string()}, html) == 0);
  const std::string page = slurp(html);
  CHECK(page.find("id=\"peak-label-0\"") != std::string::npos);
  CHECK(page.find("id=\"peak-label-1\"") != std::string::npos);
  CHECK(page.find(human_bytes(a.result.peak_bytes)) != std::string::npos);
  std::ofstream(dir / "c.json") << to_json(a).dump();
  CHECK_THROWS_AS(compare_runs({(dir / "a.json").string(), (dir / "c.json").string()}, html), InputError);
  CHECK_THROWS_AS(compare_runs({(dir / "a.json").string()}, html), InputError);
  std::filesystem::remove_all(dir.parent_path());
}
