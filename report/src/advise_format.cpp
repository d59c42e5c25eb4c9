// The advisor's formats: the JSON contract and the ranked table (advise_format.hpp).
#include "actsim/report/advise_format.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <string_view>

#include "actsim/util/units.hpp"

namespace actsim::report {

using study::AdviseCandidate;
using study::AdviseResult;
using util::human_bytes;

namespace {

std::string join_values(const std::vector<std::string>& v, const char* sep) { return fmt::format("{}", fmt::join(v, sep)); }

std::string changes_text(const AdviseCandidate& c) {
  return c.changes.empty() ? "(none: the scenario as it is, without checkpointing)" : join_values(c.changes, " ");
}

std::string set_options(const std::vector<std::string>& changes) {
  std::string out;
  for (const std::string& c : changes) out += " --set " + c;
  return out;
}

}  // namespace

nlohmann::json advise_candidate_json(const AdviseCandidate& c, const AdviseCandidate* as_given) {
  nlohmann::json j{{"changes", c.changes},
                   {"overrides", c.overrides},
                   {"micro_batch", c.micro_batch},
                   {"grad_accum_steps", c.accum_steps},
                   {"checkpoint", c.plan},
                   {"checkpointed", c.checkpointed},
                   {"fits", c.fits},
                   {"peak_bytes", c.peak_bytes},
                   {"step_time_ns", c.step_time_ns},
                   {"tokens_per_second", c.tokens_per_second}};
  if (as_given && as_given->tokens_per_second > 0) j["speedup"] = c.tokens_per_second / as_given->tokens_per_second;
  return j;
}

nlohmann::json advise_json(const study::Scenario& s, const AdviseResult& r) {
  nlohmann::json searched = nlohmann::json::array();
  for (const study::AdviseAxis& a : r.axes) searched.push_back({{"axis", a.name}, {"values", a.values}});
  nlohmann::json ranked = nlohmann::json::array();
  for (size_t i = 0; i < r.ranked.size(); ++i) {
    nlohmann::json c = advise_candidate_json(r.ranked[i], &r.as_given);
    c["rank"] = i + 1;
    ranked.push_back(std::move(c));
  }
  nlohmann::json as_given = advise_candidate_json(r.as_given, nullptr);
  as_given.erase("changes");
  as_given.erase("overrides");
  return {{"scenario", s.name},
          {"device", s.device.name},
          {"budget_bytes", r.budget_bytes},
          {"global_batch", r.global_batch},
          {"seq_len", r.seq_len},
          {"fits", !r.ranked.empty()},
          {"searched", searched},
          {"search",
           {{"candidates", r.candidates},
            {"fitting", r.fitting},
            {"simulations", r.simulations},
            {"plans", r.plans},
            {"pruned", r.pruned}}},
          {"as_given", as_given},
          {"ranked", ranked},
          {"least_peak", r.ranked.empty() && r.least_peak.simulated ? advise_candidate_json(r.least_peak, nullptr)
                                                                     : nlohmann::json(nullptr)}};
}

std::string advise_table(const study::Scenario& s, const AdviseResult& r, const std::string& simulate_command) {
  std::string out = fmt::format("actsim advise: {} on {} ({}), budget {}\n", s.name, s.device.name,
                                human_bytes(s.device.memory_bytes), human_bytes(r.budget_bytes));
  out += fmt::format("  global batch {} x seq_len {} = {} tokens per optimizer step\n", r.global_batch, r.seq_len,
                     r.global_batch * r.seq_len);
  std::vector<std::string> axes;
  for (const study::AdviseAxis& a : r.axes) axes.push_back(a.name + " " + join_values(a.values, "|"));
  out += "  searched: " + join_values(axes, "; ") + "\n";
  const AdviseCandidate& g = r.as_given;
  if (g.simulated) {
    out += fmt::format("  as given: peak {}{}, step {:.3f} ms, {:.1f} tokens/s (checkpoint {})\n", human_bytes(g.peak_bytes),
                       g.fits ? "" : " (does not fit)", g.step_time_ns / 1e6, g.tokens_per_second, g.plan);
  }
  out += fmt::format("  {} candidates, {} fit ({} simulations, {} planner searches, {} skipped by their bound)\n\n",
                     r.candidates, r.fitting, r.simulations, r.plans, r.pruned);
  if (r.ranked.empty()) {
    if (r.least_peak.simulated) {
      out += fmt::format("  no candidate fits the budget of {}: the least peak is {} ({} over), with{}\n",
                         human_bytes(r.budget_bytes), human_bytes(r.least_peak.peak_bytes),
                         human_bytes(r.least_peak.peak_bytes - r.budget_bytes),
                         r.least_peak.changes.empty() ? " the scenario as it is" : set_options(r.least_peak.changes));
    } else {
      out += fmt::format("  no candidate fits the budget of {}: none could be simulated\n", human_bytes(r.budget_bytes));
    }
    return out;
  }
  size_t plan_width = std::string_view("checkpoint").size();
  for (const AdviseCandidate& c : r.ranked) plan_width = std::max(plan_width, c.plan.size());
  out += fmt::format("  {:>4}  {:>10}  {:>7}  {:>12}  {:>10}  {:>11}  {:<{}}  {}\n", "rank", "tokens/s", "speedup", "step",
                     "peak", "micro x acc", "checkpoint", plan_width, "changes (--set)");
  for (size_t i = 0; i < r.ranked.size(); ++i) {
    const AdviseCandidate& c = r.ranked[i];
    const std::string speedup = g.tokens_per_second > 0 ? fmt::format("{:.2f}x", c.tokens_per_second / g.tokens_per_second) : "-";
    out += fmt::format("  {:>4}  {:>10.1f}  {:>7}  {:>9.3f} ms  {:>10}  {:>11}  {:<{}}  {}\n", i + 1, c.tokens_per_second,
                       speedup, c.step_time_ns / 1e6, human_bytes(c.peak_bytes),
                       fmt::format("{}x{}", c.micro_batch, c.accum_steps), c.plan, plan_width, changes_text(c));
  }
  out += fmt::format("\n  the fastest: {}{}\n", simulate_command, set_options(r.ranked[0].changes));
  return out;
}

}  // namespace actsim::report
