// The self-contained HTML report (no network, no script), its SVG chart, the compact timeline
// for `simulate --json --timeline`, and `actsim compare`.
#include <fmt/format.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "actsim/util/error.hpp"
#include "actsim/report/export.hpp"
#include "actsim/util/output.hpp"
#include "actsim/util/units.hpp"
#include "actsim/report/summary.hpp"

namespace actsim::report {

using sim::SimResult;
using study::Analysis;
using study::Scenario;
using util::human_bytes;
using util::OutputSet;
using graph::StorageId;

using graph::Category;
using graph::index;

namespace {

struct Point {
  int64_t time_ns = 0;
  CategoryBytes live{};
  int64_t total = 0;
};

// Live bytes after every memory event, then reduced to at most about `max_points` points: each
// time bin keeps its highest point (so the peak survives) and its last one (so drops show).
std::vector<Point> points(const Timeline& t, size_t max_points) {
  std::vector<Point> all;
  all.reserve(t.events.size() + 1);
  Point p{0, t.start_by_category, t.start_live};
  all.push_back(p);
  for (const MemEvent& e : t.events) {
    p.time_ns = e.time_ns;
    p.live[static_cast<size_t>(e.category)] += e.delta();
    p.total += e.delta();
    all.push_back(p);
  }
  if (all.size() <= max_points) return all;
  const size_t bins = std::max<size_t>(1, max_points / 2 - 1);
  const int64_t span = std::max<int64_t>(1, t.step_time_ns);
  std::vector<Point> out{all.front()};
  size_t i = 1;
  while (i < all.size()) {
    const size_t bin = static_cast<size_t>(static_cast<__int128>(all[i].time_ns) * static_cast<__int128>(bins) / span);
    size_t best = i, last = i;
    for (; i < all.size() &&
           static_cast<size_t>(static_cast<__int128>(all[i].time_ns) * static_cast<__int128>(bins) / span) == bin;
         ++i) {
      if (all[i].total > all[best].total) best = i;
      last = i;
    }
    out.push_back(all[best]);
    if (last != best) out.push_back(all[last]);
  }
  return out;
}

std::string fmt_time(int64_t ns) {
  if (ns >= 1'000'000'000) return fmt::format("{:.3g} s", static_cast<double>(ns) / 1e9);
  if (ns >= 1'000'000) return fmt::format("{:.3g} ms", static_cast<double>(ns) / 1e6);
  if (ns >= 1'000) return fmt::format("{:.3g} µs", static_cast<double>(ns) / 1e3);
  return fmt::format("{} ns", ns);
}

// Plot geometry of the chart, in SVG user units.
struct Frame {
  double width = 1000, height = 440, left = 90, right = 20, top = 40, bottom = 50;
  double t_max = 1, y_max = 1;
  double x(double t) const { return left + (width - left - right) * std::clamp(t / t_max, 0.0, 1.0); }
  double y(double v) const { return top + (height - top - bottom) * (1.0 - std::clamp(v / y_max, 0.0, 1.0)); }
  double plot_w() const { return width - left - right; }
  double plot_h() const { return height - top - bottom; }
};

void axes(std::string& o, const Frame& f) {
  auto out = std::back_inserter(o);
  fmt::format_to(out, "<g class=\"axes\" font-family=\"sans-serif\" font-size=\"11\" fill=\"#333\">\n");
  for (int k = 0; k <= 5; ++k) {
    const double v = f.y_max * k / 5;
    fmt::format_to(out,
                   "<line x1=\"{:.1f}\" y1=\"{:.1f}\" x2=\"{:.1f}\" y2=\"{:.1f}\" stroke=\"#ddd\" stroke-width=\"0.5\"/>"
                   "<text x=\"{:.1f}\" y=\"{:.1f}\" text-anchor=\"end\">{}</text>\n",
                   f.left, f.y(v), f.width - f.right, f.y(v), f.left - 6, f.y(v) + 4,
                   html_escape(human_bytes(static_cast<int64_t>(v))));
  }
  for (int k = 0; k <= 5; ++k) {
    const double t = f.t_max * k / 5;
    fmt::format_to(out, "<text x=\"{:.1f}\" y=\"{:.1f}\" text-anchor=\"middle\">{}</text>\n", f.x(t),
                   f.height - f.bottom + 16, html_escape(fmt_time(static_cast<int64_t>(t))));
  }
  fmt::format_to(out,
                 "<text x=\"{:.1f}\" y=\"{:.1f}\" text-anchor=\"middle\">simulated time</text>\n"
                 "<rect x=\"{:.1f}\" y=\"{:.1f}\" width=\"{:.1f}\" height=\"{:.1f}\" fill=\"none\" stroke=\"#999\"/>\n</g>\n",
                 f.left + f.plot_w() / 2, f.height - 10, f.left, f.top, f.plot_w(), f.plot_h());
}

std::string chart(const Analysis& a, const Timeline& t) {
  const SimResult& r = a.result;
  const std::vector<Point> pts = points(t, 3000);
  Frame f;
  f.t_max = static_cast<double>(std::max<int64_t>(1, t.step_time_ns));
  const int64_t limit = a.scenario.device.memory_bytes;
  const bool limit_on_scale = limit > 0 && limit <= r.peak_bytes * 3 / 2;
  f.y_max = static_cast<double>(std::max<int64_t>(1, limit_on_scale ? std::max(limit, r.peak_bytes) : r.peak_bytes)) * 1.08;
  std::string o;
  auto out = std::back_inserter(o);
  fmt::format_to(out,
                 "<svg xmlns=\"http://www.w3.org/2000/svg\" id=\"memory-chart\" width=\"{0}\" height=\"{1}\" "
                 "viewBox=\"0 0 {0} {1}\" font-family=\"sans-serif\">\n"
                 "<title>actsim: live device memory by category, {2}</title>\n<rect width=\"{0}\" height=\"{1}\" fill=\"#fff\"/>\n",
                 f.width, f.height, html_escape(a.scenario.name));
  // Phases, shaded under the areas.
  static constexpr std::array<const char*, 3> kPhaseFill = {"#eef3fb", "#fbf0ec", "#eef8ee"};
  int64_t p0 = 0;
  for (int ph = 0; ph < 3; ++ph) {
    const int64_t p1 = r.phase_end_ns[static_cast<size_t>(ph)];
    if (p1 <= p0) continue;
    fmt::format_to(out,
                   "<rect class=\"phase\" x=\"{:.1f}\" y=\"{:.1f}\" width=\"{:.1f}\" height=\"{:.1f}\" fill=\"{}\"/>"
                   "<text x=\"{:.1f}\" y=\"{:.1f}\" font-size=\"11\" fill=\"#667\" text-anchor=\"middle\">{}</text>\n",
                   f.x(static_cast<double>(p0)), f.top, f.x(static_cast<double>(p1)) - f.x(static_cast<double>(p0)),
                   f.plot_h(), kPhaseFill[static_cast<size_t>(ph)], (f.x(static_cast<double>(p0)) + f.x(static_cast<double>(p1))) / 2,
                   f.top + 12, graph::to_string(static_cast<graph::Phase>(ph)));
    p0 = p1;
  }
  axes(o, f);
  // Stacked areas (categories in table order, bottom up), drawn as step functions: a value
  // holds until the next event.
  CategoryBytes max_cat{};
  for (const Point& p : pts) {
    for (int c = 0; c < graph::kNumCategories; ++c) max_cat[c] = std::max(max_cat[c], p.live[c]);
  }
  for (int c = 0; c < graph::kNumCategories; ++c) {
    if (max_cat[c] == 0) continue;
    std::string upper, lower;
    for (size_t i = 0; i < pts.size(); ++i) {
      int64_t below = 0;
      for (int k = 0; k < c; ++k) below += pts[i].live[k];
      const double x0 = f.x(static_cast<double>(pts[i].time_ns));
      const double x1 = f.x(static_cast<double>(i + 1 < pts.size() ? pts[i + 1].time_ns : t.step_time_ns));
      const double yu = f.y(static_cast<double>(below + pts[i].live[c])), yl = f.y(static_cast<double>(below));
      fmt::format_to(std::back_inserter(upper), "{:.1f},{:.1f} {:.1f},{:.1f} ", x0, yu, x1, yu);
      // The lower edge runs right to left, so each step is written end first.
      lower.insert(0, fmt::format("{:.1f},{:.1f} {:.1f},{:.1f} ", x1, yl, x0, yl));
    }
    fmt::format_to(out, "<polygon class=\"area\" data-category=\"{}\" fill=\"{}\" fill-opacity=\"0.9\" points=\"{}{}\"/>\n",
                   graph::to_string(static_cast<Category>(c)), category_colour(static_cast<Category>(c)), upper, lower);
  }
  // The device limit.
  if (limit_on_scale) {
    fmt::format_to(out,
                   "<line id=\"device-limit\" x1=\"{:.1f}\" y1=\"{:.1f}\" x2=\"{:.1f}\" y2=\"{:.1f}\" stroke=\"#c00\" "
                   "stroke-width=\"1.5\" stroke-dasharray=\"6 3\"/><text x=\"{:.1f}\" y=\"{:.1f}\" font-size=\"11\" "
                   "fill=\"#c00\" text-anchor=\"end\">device limit {} ({})</text>\n",
                   f.left, f.y(static_cast<double>(limit)), f.width - f.right, f.y(static_cast<double>(limit)),
                   f.width - f.right - 4, f.y(static_cast<double>(limit)) - 4, html_escape(a.scenario.device.name),
                   html_escape(human_bytes(limit)));
  } else if (limit > 0) {
    fmt::format_to(out,
                   "<text id=\"device-limit\" x=\"{:.1f}\" y=\"{:.1f}\" font-size=\"11\" fill=\"#c00\" text-anchor=\"end\">"
                   "device limit {} ({}, {:.0f}% used at the peak) is above the chart</text>\n",
                   f.width - f.right, f.top - 6, html_escape(a.scenario.device.name), html_escape(human_bytes(limit)),
                   100.0 * static_cast<double>(r.peak_bytes) / static_cast<double>(limit));
  }
  // The peak and its top contributors.
  const double px = f.x(static_cast<double>(r.peak_time_ns)), py = f.y(static_cast<double>(r.peak_bytes));
  const graph::Op& pop = a.step->graph.op(r.peak_op);
  const bool label_left = px > f.left + f.plot_w() * 0.6;
  const double lx = label_left ? px - 10 : px + 10;
  fmt::format_to(out,
                 "<line x1=\"{0:.1f}\" y1=\"{1:.1f}\" x2=\"{0:.1f}\" y2=\"{2:.1f}\" stroke=\"#000\" stroke-dasharray=\"2 2\"/>"
                 "<circle cx=\"{0:.1f}\" cy=\"{1:.1f}\" r=\"4\" fill=\"#000\"/>\n"
                 "<text id=\"peak-label\" x=\"{3:.1f}\" y=\"{4:.1f}\" font-size=\"12\" text-anchor=\"{5}\">"
                 "<tspan font-weight=\"bold\">peak {6} at {7}, {8} ({9})</tspan>",
                 px, py, f.top + f.plot_h(), lx, std::max(f.top + 14, py + 16), label_left ? "end" : "start",
                 html_escape(human_bytes(r.peak_bytes)), html_escape(fmt_time(r.peak_time_ns)), html_escape(pop.name),
                 graph::to_string(r.peak_phase));
  // Top contributors: the largest categories, then the largest groups made during the step.
  std::array<int, graph::kNumCategories> order{};
  for (int c = 0; c < graph::kNumCategories; ++c) order[static_cast<size_t>(c)] = c;
  std::stable_sort(order.begin(), order.end(), [&](int x, int y) {
    return r.peak_by_category[static_cast<size_t>(x)] > r.peak_by_category[static_cast<size_t>(y)];
  });
  for (size_t k = 0; k < 3; ++k) {
    const int64_t b = r.peak_by_category[static_cast<size_t>(order[k])];
    if (b == 0) break;
    fmt::format_to(out, "<tspan x=\"{:.1f}\" dy=\"14\">{}: {} ({:.0f}%)</tspan>", lx,
                   graph::to_string(static_cast<Category>(order[k])), html_escape(human_bytes(b)),
                   100.0 * static_cast<double>(b) / static_cast<double>(std::max<int64_t>(1, r.peak_bytes)));
  }
  int shown = 0;
  for (const PeakGroup& pg : peak_groups(a)) {
    if (pg.op == "(before the step)") continue;
    if (++shown > 3) break;
    fmt::format_to(out, "<tspan x=\"{:.1f}\" dy=\"14\" fill=\"#444\">  {} from {}{} ({}x): {}</tspan>", lx,
                   graph::to_string(pg.category), html_escape(pg.op),
                   pg.layer >= 0 ? fmt::format(" [layer {}]", pg.layer) : "", pg.count, html_escape(human_bytes(pg.bytes)));
  }
  o += "</text>\n";
  // Legend.
  double lgx = f.left;
  for (int c = 0; c < graph::kNumCategories; ++c) {
    const std::string name(graph::to_string(static_cast<Category>(c)));
    fmt::format_to(out,
                   "<rect x=\"{:.1f}\" y=\"{:.1f}\" width=\"10\" height=\"10\" fill=\"{}\"/><text x=\"{:.1f}\" y=\"{:.1f}\" "
                   "font-size=\"11\">{}</text>\n",
                   lgx, 10.0, category_colour(static_cast<Category>(c)), lgx + 14, 19.0, name);
    lgx += 24 + 7.0 * static_cast<double>(name.size());
  }
  o += "</svg>\n";
  return o;
}

constexpr const char* kStyle = R"(<style>
body { font-family: sans-serif; margin: 24px; color: #222; }
table { border-collapse: collapse; font-size: 13px; }
th, td { padding: 3px 8px; border-bottom: 1px solid #e4e4e4; text-align: left; }
td.n, th.n { text-align: right; font-variant-numeric: tabular-nums; }
.bar { background: #e15759; height: 12px; }
.muted { color: #777; font-size: 13px; }
</style>
)";

}  // namespace

nlohmann::json timeline_json(const Analysis& a) {
  const Timeline t = record_timeline(a);
  nlohmann::json out = nlohmann::json::array();
  for (const Point& p : points(t, static_cast<size_t>(kTimelinePoints))) {
    nlohmann::json row = nlohmann::json::array({p.time_ns, p.total});
    for (int64_t v : p.live) row.push_back(v);
    out.push_back(std::move(row));
  }
  return out;
}

std::string chart_svg(const Analysis& a, const Timeline& t) {
  return "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n" + chart(a, t);
}

std::string report_html(const Analysis& a, const Timeline& t) {
  const graph::Graph& g = a.step->graph;
  const SimResult& r = a.result;
  const Scenario& s = a.scenario;
  std::string o;
  auto out = std::back_inserter(o);
  fmt::format_to(out, "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\n<title>actsim: {}</title>\n{}</head><body>\n",
                 html_escape(s.name), kStyle);
  fmt::format_to(out,
                 "<h1>actsim: {}</h1>\n<p>{} family, {} layers, d_model {}, seq {}, batch {}; device {} ({}). "
                 "Peak <b>{}</b> at {} in {} ({} of the device); step {}.</p>\n",
                 html_escape(s.name), graph::to_string(s.model.family), s.model.n_layers, s.model.d_model, s.model.seq_len,
                 s.training.batch_size, html_escape(s.device.name), html_escape(human_bytes(s.device.memory_bytes)),
                 html_escape(human_bytes(r.peak_bytes)), html_escape(fmt_time(r.peak_time_ns)),
                 graph::to_string(r.peak_phase),
                 s.device.memory_bytes > 0
                     ? fmt::format("{:.1f}%", 100.0 * static_cast<double>(r.peak_bytes) / static_cast<double>(s.device.memory_bytes))
                     : std::string("?"),
                 html_escape(fmt_time(t.step_time_ns)));
  o += "<h2>Live device memory over the step</h2>\n";
  o += chart(a, t);
  // At the peak, by category.
  o += "<h2>At the peak, by category</h2>\n<table><tr><th>category</th><th class=\"n\">bytes</th><th class=\"n\">share</th></tr>\n";
  for (int c = 0; c < graph::kNumCategories; ++c) {
    const int64_t b = r.peak_by_category[static_cast<size_t>(c)];
    if (b == 0) continue;
    fmt::format_to(out,
                   "<tr><td><span style=\"color:{}\">&#9632;</span> {}</td><td class=\"n\">{}</td><td class=\"n\">{:.1f}%</td></tr>\n",
                   category_colour(static_cast<Category>(c)), graph::to_string(static_cast<Category>(c)),
                   html_escape(human_bytes(b)), r.peak_bytes ? 100.0 * static_cast<double>(b) / static_cast<double>(r.peak_bytes) : 0.0);
  }
  o += "</table>\n";
  // Largest storages live at the peak.
  std::vector<StorageId> live = r.live_at_peak;
  std::stable_sort(live.begin(), live.end(),
                   [&](StorageId x, StorageId y) { return g.storage(x).bytes > g.storage(y).bytes; });
  constexpr size_t kTopStorages = 25;
  fmt::format_to(out,
                 "<h2>Largest storages live at the peak</h2>\n<p class=\"muted\">{} of {} storages shown.</p>\n"
                 "<table id=\"peak-storages\"><tr><th>tensor</th><th>category</th><th>op</th><th class=\"n\">layer</th>"
                 "<th>shape</th><th>dtype</th><th class=\"n\">bytes</th></tr>\n",
                 std::min(kTopStorages, live.size()), live.size());
  for (size_t k = 0; k < live.size() && k < kTopStorages; ++k) {
    const graph::Storage& st = g.storage(live[k]);
    const graph::Tensor* tt = st.first != graph::kNoTensor ? &g.tensor(st.first) : nullptr;
    fmt::format_to(out, "<tr><td>{}</td><td>{}</td><td>{}</td><td class=\"n\">{}</td><td>{}</td><td>{}</td><td class=\"n\">{}</td></tr>\n",
                   html_escape(tt ? tt->name : "?"), graph::to_string(st.category),
                   html_escape(st.producer == graph::kNoOp ? "(before the step)" : g.op(st.producer).name), st.layer,
                   tt ? graph::shape_string(tt->shape) : "", tt ? graph::to_string(tt->dtype) : "",
                   html_escape(human_bytes(st.bytes)));
  }
  o += "</table>\n";
  // Per-layer activations saved for backward.
  o += "<h2>Activations saved for backward, per layer</h2>\n<table id=\"layer-bars\">\n";
  int64_t max_layer = a.outside_saved;
  for (int64_t b : a.per_layer_saved) max_layer = std::max(max_layer, b);
  auto bar = [&](const std::string& name, int64_t b) {
    const double w = max_layer > 0 ? 400.0 * static_cast<double>(b) / static_cast<double>(max_layer) : 0;
    fmt::format_to(out, "<tr><td>{}</td><td><div class=\"bar\" style=\"width:{:.0f}px\"></div></td><td class=\"n\">{}</td></tr>\n",
                   name, w, html_escape(human_bytes(b)));
  };
  for (size_t l = 0; l < a.per_layer_saved.size(); ++l) bar(fmt::format("layer {}", l), a.per_layer_saved[l]);
  bar("outside the blocks", a.outside_saved);
  o += "</table>\n<p class=\"muted\">Generated by actsim from a simulation; no network resources are used.</p>\n</body></html>\n";
  return o;
}

// ---- compare ----

namespace {

struct Run {
  std::string label;
  std::vector<std::array<int64_t, 2 + graph::kNumCategories>> pts;  // time, total, per category
  int64_t peak = 0, peak_time = 0, step_time = 0, limit = 0;
};

Run load_run(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw InputError(fmt::format("{}: cannot read", path));
  nlohmann::json j;
  try {
    in >> j;
  } catch (const nlohmann::json::exception& e) {
    throw InputError(fmt::format("{}: not JSON ({})", path, e.what()));
  }
  if (!j.is_object() || !j.contains("timeline") || !j["timeline"].is_array()) {
    throw InputError(fmt::format("{}: no \"timeline\" (write it with `actsim simulate --json --timeline`)", path));
  }
  Run r;
  r.label = j.value("scenario", std::string("run")) + " (" + std::filesystem::path(path).filename().string() + ")";
  try {
    for (const auto& p : j["timeline"]) {
      std::array<int64_t, 2 + graph::kNumCategories> row{};
      if (!p.is_array() || p.size() != row.size()) throw InputError("bad point");
      for (size_t k = 0; k < row.size(); ++k) row[k] = p[k].get<int64_t>();
      r.pts.push_back(row);
      if (row[1] > r.peak) r.peak = row[1], r.peak_time = row[0];
      r.step_time = std::max(r.step_time, row[0]);
    }
    if (j.contains("step_time_ns")) r.step_time = std::max(r.step_time, j["step_time_ns"].get<int64_t>());
    if (j.contains("device")) r.limit = j["device"].value("memory_bytes", int64_t{0});
  } catch (const std::exception&) {
    throw InputError(fmt::format("{}: \"timeline\" must be a list of [time_ns, total_bytes, {} category bytes]", path,
                                 graph::kNumCategories));
  }
  if (r.pts.empty()) throw InputError(fmt::format("{}: \"timeline\" is empty", path));
  return r;
}

}  // namespace

int compare_runs(const std::vector<std::string>& json_files, const std::string& report_html_path) {
  if (json_files.size() < 2) throw InputError("compare: give at least two JSON files from `actsim simulate --json --timeline`");
  std::vector<Run> runs;
  for (const std::string& f : json_files) runs.push_back(load_run(f));
  Frame f;
  int64_t t_max = 1, y_max = 1;
  for (const Run& r : runs) t_max = std::max(t_max, r.step_time), y_max = std::max(y_max, r.peak);
  f.t_max = static_cast<double>(t_max);
  f.y_max = static_cast<double>(y_max) * 1.12;
  static constexpr std::array<const char*, 6> kRunColours = {"#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf"};
  const size_t activation = 2 + static_cast<size_t>(Category::activation);
  std::string svg;
  auto out = std::back_inserter(svg);
  fmt::format_to(out,
                 "<svg xmlns=\"http://www.w3.org/2000/svg\" id=\"memory-chart\" width=\"{0}\" height=\"{1}\" viewBox=\"0 0 {0} {1}\" "
                 "font-family=\"sans-serif\"><rect width=\"{0}\" height=\"{1}\" fill=\"#fff\"/>\n",
                 f.width, f.height);
  axes(svg, f);
  for (size_t k = 0; k < runs.size(); ++k) {
    const Run& r = runs[k];
    const char* colour = kRunColours[k % kRunColours.size()];
    for (size_t col : {size_t{1}, activation}) {
      std::string path;
      for (size_t i = 0; i < r.pts.size(); ++i) {
        const double x0 = f.x(static_cast<double>(r.pts[i][0]));
        const double x1 = f.x(static_cast<double>(i + 1 < r.pts.size() ? r.pts[i + 1][0] : r.step_time));
        const double y = f.y(static_cast<double>(r.pts[i][col]));
        fmt::format_to(std::back_inserter(path), "{:.1f},{:.1f} {:.1f},{:.1f} ", x0, y, x1, y);
      }
      fmt::format_to(out, "<polyline fill=\"none\" stroke=\"{}\" stroke-width=\"{}\"{} points=\"{}\"/>\n", colour,
                     col == 1 ? 2 : 1.2, col == 1 ? "" : " stroke-dasharray=\"5 3\"", path);
    }
    const double px = f.x(static_cast<double>(r.peak_time)), py = f.y(static_cast<double>(r.peak));
    fmt::format_to(out,
                   "<circle cx=\"{:.1f}\" cy=\"{:.1f}\" r=\"4\" fill=\"{}\"/><text class=\"peak-label\" id=\"peak-label-{}\" "
                   "x=\"{:.1f}\" y=\"{:.1f}\" font-size=\"11\" fill=\"{}\">peak {}</text>\n"
                   "<rect x=\"{:.1f}\" y=\"{:.1f}\" width=\"12\" height=\"3\" fill=\"{}\"/><text x=\"{:.1f}\" y=\"{:.1f}\" "
                   "font-size=\"11\">{}</text>\n",
                   px, py, colour, k, px + 6, py - 6, colour, html_escape(human_bytes(r.peak)), f.left + 300.0 * static_cast<double>(k),
                   12.0, colour, f.left + 300.0 * static_cast<double>(k) + 16, 17.0, html_escape(r.label));
  }
  svg += "</svg>\n";
  std::string o;
  auto o_out = std::back_inserter(o);
  fmt::format_to(o_out, "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\n<title>actsim compare</title>\n{}</head><body>\n"
                        "<h1>actsim compare</h1>\n<p class=\"muted\">Solid: total live device memory; dashed: activations.</p>\n{}"
                        "<table id=\"runs\"><tr><th>run</th><th class=\"n\">peak</th><th class=\"n\">at</th><th class=\"n\">step</th>"
                        "<th class=\"n\">vs first</th></tr>\n",
                 kStyle, svg);
  for (const Run& r : runs) {
    fmt::format_to(o_out, "<tr><td>{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{:+.1f}%</td></tr>\n",
                   html_escape(r.label), html_escape(human_bytes(r.peak)), html_escape(fmt_time(r.peak_time)),
                   html_escape(fmt_time(r.step_time)),
                   runs[0].peak ? 100.0 * static_cast<double>(r.peak - runs[0].peak) / static_cast<double>(runs[0].peak) : 0.0);
  }
  o += "</table>\n</body></html>\n";
  OutputSet files;
  for (const std::string& in : json_files) files.protect(in);
  files.add("--report", report_html_path, o);
  files.commit();
  return 0;
}

}  // namespace actsim::report
