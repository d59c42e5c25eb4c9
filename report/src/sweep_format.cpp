// The sweep's formats: CSV, JSON, an aligned table (sweep_format.hpp).
#include "actsim/report/sweep_format.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <nlohmann/json.hpp>

#include "actsim/util/text.hpp"
#include "actsim/util/units.hpp"

namespace actsim::report {

using study::SweepAxis;
using study::SweepRow;
using util::human_bytes;

namespace {

// The value as the user means it in a table or CSV cell: TOML strings without their quotes.
std::string plain_value(const std::string& text) {
  nlohmann::json j = study::sweep_value_json(text);
  return j.is_string() ? j.get<std::string>() : text;
}

}  // namespace

std::string sweep_csv(const std::vector<SweepAxis>& axes, const std::vector<SweepRow>& rows) {
  std::string out;
  for (const SweepAxis& ax : axes) out += util::csv_field(ax.key) + ",";
  out += "peak_bytes,step_time_ns,saved_bytes,fits,pareto\n";
  for (const SweepRow& r : rows) {
    for (const std::string& v : r.values) out += util::csv_field(plain_value(v)) + ",";
    out += fmt::format("{},{},{},{},{}\n", r.peak_bytes, r.step_time_ns, r.saved_bytes, r.fits ? "true" : "false",
                       r.pareto ? "true" : "false");
  }
  return out;
}

nlohmann::json sweep_json(const std::vector<SweepAxis>& axes, const std::vector<SweepRow>& rows) {
  nlohmann::json out = nlohmann::json::array();
  for (const SweepRow& r : rows) {
    nlohmann::json o = nlohmann::json::object();
    for (size_t k = 0; k < axes.size(); ++k) o[axes[k].key] = study::sweep_value_json(r.values[k]);
    o["peak_bytes"] = r.peak_bytes;
    o["step_time_ns"] = r.step_time_ns;
    o["saved_bytes"] = r.saved_bytes;
    o["fits"] = r.fits;
    o["pareto"] = r.pareto;
    out.push_back(std::move(o));
  }
  return out;
}

std::string sweep_table(const std::vector<SweepAxis>& axes, const std::vector<SweepRow>& rows) {
  std::vector<std::string> head;
  for (const SweepAxis& ax : axes) head.push_back(ax.key);
  for (const char* h : {"peak", "step time", "saved", "fits", "pareto"}) head.emplace_back(h);
  std::vector<std::vector<std::string>> cells;
  for (const SweepRow& r : rows) {
    std::vector<std::string> c;
    for (const std::string& v : r.values) c.push_back(plain_value(v));
    c.push_back(human_bytes(r.peak_bytes));
    c.push_back(fmt::format("{:.3f} ms", r.step_time_ns / 1e6));
    c.push_back(human_bytes(r.saved_bytes));
    c.push_back(r.fits ? "yes" : "no");
    c.push_back(r.pareto ? "*" : "");
    cells.push_back(std::move(c));
  }
  std::vector<size_t> width(head.size());
  for (size_t k = 0; k < head.size(); ++k) {
    width[k] = head[k].size();
    for (const auto& c : cells) width[k] = std::max(width[k], c[k].size());
  }
  const size_t n_axes = axes.size();
  auto line = [&](const std::vector<std::string>& c) {
    std::string l;
    for (size_t k = 0; k < c.size(); ++k) {
      // Varied values left-aligned, figures right-aligned.
      l += k < n_axes ? fmt::format("{:<{}}  ", c[k], width[k]) : fmt::format("{:>{}}  ", c[k], width[k]);
    }
    while (!l.empty() && l.back() == ' ') l.pop_back();
    return l + "\n";
  };
  std::string out = line(head);
  for (const auto& c : cells) out += line(c);
  int64_t n_pareto = 0, n_fit = 0;
  for (const SweepRow& r : rows) n_pareto += r.pareto, n_fit += r.fits;
  out += fmt::format("{} runs, {} fit the device, {} on the Pareto frontier of peak against step time (*)\n",
                     rows.size(), n_fit, n_pareto);
  return out;
}

}  // namespace actsim::report
