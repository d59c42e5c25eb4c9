// The --vary option: KEY=V1,V2,... with LO..HI ranges and quoted values (sweep.hpp).
#include <fmt/format.h>

#include <algorithm>
#include <nlohmann/json.hpp>
#include <toml++/toml.h>

#include "actsim/sim/device.hpp"
#include "actsim/study/sweep.hpp"
#include "actsim/util/error.hpp"
#include "actsim/util/text.hpp"

namespace actsim::study {

namespace {

bool parse_int(const std::string& s, int64_t& out) {
  if (s.empty() || s.size() > 18) return false;
  size_t i = s[0] == '-' ? 1 : 0;
  if (i == s.size()) return false;
  for (size_t j = i; j < s.size(); ++j) {
    if (s[j] < '0' || s[j] > '9') return false;
  }
  out = std::stoll(s);
  return true;
}

}  // namespace

void SweepAxis::fail(const std::string& msg) const { throw InputError(fmt::format("--vary {}: {}", text, msg)); }

nlohmann::json sweep_value_json(const std::string& text) {
  try {
    toml::table t = toml::parse("v = " + text);
    const toml::node* n = t.get("v");
    if (auto i = n->as_integer()) return i->get();
    if (auto d = n->as_floating_point()) return d->get();
    if (auto b = n->as_boolean()) return b->get();
    if (auto s = n->as_string()) return s->get();
  } catch (const toml::parse_error&) {
  }
  return text;
}

SweepAxis parse_sweep_axis(const std::string& text) {
  SweepAxis ax;
  ax.text = text;
  const size_t eq = text.find('=');
  if (eq == std::string::npos || eq == 0) ax.fail("expected KEY=V1,V2,...");
  ax.key = text.substr(0, eq);
  const auto& keys = scenario_keys();
  if (std::find(keys.begin(), keys.end(), ax.key) == keys.end()) {
    const std::string hint = sim::closest(ax.key, keys);
    ax.fail(fmt::format("unknown key \"{}\"{}", ax.key, hint.empty() ? "" : fmt::format("; did you mean {}?", hint)));
  }
  const std::string list = text.substr(eq + 1);
  if (list.empty()) ax.fail(fmt::format("empty value list for {}", ax.key));
  const std::vector<std::string> parts = util::split_list(list);
  for (size_t i = 0; i < parts.size(); ++i) {
    const std::string& v = parts[i];
    if (v.empty()) ax.fail(fmt::format("value {} of {} is empty", i + 1, ax.key));
    const size_t dots = v.find("..");
    int64_t a, b;
    if (dots != std::string::npos && v.front() != '"' && parse_int(v.substr(0, dots), a) &&
        parse_int(v.substr(dots + 2), b)) {
      if (a > b) ax.fail(fmt::format("range {} is empty (LO..HI needs LO <= HI)", v));
      if (b - a >= kMaxSweepRuns) ax.fail(fmt::format("range {} has more than {} values", v, kMaxSweepRuns));
      for (int64_t x = a; x <= b; ++x) ax.values.push_back(std::to_string(x));
    } else {
      ax.values.push_back(v);
    }
  }
  return ax;
}

}  // namespace actsim::study
