// The checkpointing planner: rotor's dynamic program (Beaumont et al. 2019) and the budget search.
#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>
#include <fmt/format.h>

#include <algorithm>
#include <limits>
#include <memory>
#include <vector>

#include "actsim/graph/profile.hpp"
#include "actsim/report/summary.hpp"
#include "actsim/study/analyze.hpp"
#include "actsim/study/planner.hpp"
#include "actsim/study/resolve.hpp"

using namespace actsim;

namespace {

int64_t binom(int64_t n, int64_t k) {
  int64_t r = 1;
  for (int64_t i = 1; i <= k; ++i) r = r * (n - k + i) / i;
  return r;
}

// Revolve (Griewank & Walther; ADOL-C revolve.c numforw): t(l, s) = r*l - C(s+r, s+1), r the
// least integer with C(s+r, s) >= l.
int64_t revolve_numforw(int64_t l, int64_t s) {
  int64_t r = 0;
  while (binom(s + r, s) < l) ++r;
  return r * l - binom(s + r, s + 1);
}

// A homogeneous chain of l steps whose tape (a step's activations) is larger than all the
// checkpoints together: memory for one tape plus s checkpoints is Revolve with s snaps.
int64_t dp_advances(int l, int s) {
  constexpr int64_t kTape = 1000;
  study::Chain c;
  for (int i = 0; i < l; ++i) {
    c.forward_ns.push_back(1);
    c.backward_ns.push_back(0);
    c.input_bytes.push_back(1);
    c.activation_bytes.push_back(kTape);
  }
  study::RotorDP dp(c, 1, static_cast<int>(kTape) + s);
  return dp.advances(static_cast<int>(kTape) + s);
}

study::Scenario small(int layers) {
  return study::load_scenario("", {"model.family=llama", fmt::format("model.n_layers={}", layers), "model.d_model=128",
                                 "model.n_heads=4", "model.seq_len=128", "model.vocab_size=512",
                                 "training.batch_size=2"});
}

struct Sim {
  int64_t peak, time;
};
Sim simulate_plan(const study::Scenario& s, const graph::BlockPlan& p) {
  graph::StepGraph step = graph::lower_training_step(s.model, s.training, graph::profile(s.profile), &p);
  sim::StepTables plan(step.graph, s.device);
  sim::SimResult r = sim::simulate(plan);
  return {r.peak_bytes, r.step_time_ns};
}

}  // namespace

TEST_CASE("study::RotorDP: on a homogeneous chain the recomputed forward steps equal Revolve's closed form",
          "[planner]") {
  CHECK(revolve_numforw(10, 1) == 45);
  CHECK(revolve_numforw(10, 2) == 20);
  CHECK(dp_advances(10, 1) == 45);
  CHECK(dp_advances(10, 2) == 20);
  for (int l = 1; l <= 30; ++l) {
    for (int s = 1; s <= 6; ++s) {
      INFO("l = " << l << ", s = " << s);
      CHECK(dp_advances(l, s) == revolve_numforw(l, s));
    }
  }
}

TEST_CASE("study::RotorDP: the DP's time equals the simulated step time up to one constant", "[planner]") {
  const study::Scenario s = small(5);
  study::Chain c = study::measure_chain(s);
  // The keep/recompute DP (the op-level and offload options are estimated, then simulated).
  c.activation_selective_bytes.clear();
  c.backward_selective_ns.clear();
  c.offload_penalty_ns.clear();
  int64_t total = 0;
  for (size_t i = 0; i < c.size(); ++i) total += c.input_bytes[i] + c.activation_bytes[i];
  study::RotorDP dp(c, (total + 127) / 128, 128);
  int64_t offset = std::numeric_limits<int64_t>::min();
  int plans = 0;
  for (int m = 0; m <= dp.levels(); ++m) {
    if (dp.cost(m) >= study::RotorDP::kInfeasible) continue;
    const Sim r = simulate_plan(s, dp.plan(m));
    if (offset == std::numeric_limits<int64_t>::min()) offset = r.time - dp.cost(m);
    CHECK(r.time - dp.cost(m) == offset);
    ++plans;
  }
  CHECK(plans > 10);
}

TEST_CASE("study::plan_for_budget: equals exhaustive search over every keep/recompute schedule on a small model",
          "[planner]") {
  const study::Scenario s = small(3);
  // Every rotor schedule of 3 blocks + the head, simulated.
  std::vector<std::vector<study::RotorDP::Op>> all;
  study::RotorDP::all_schedules(0, 3, all);
  REQUIRE(all.size() > 20);
  std::vector<Sim> sims;
  for (const auto& seq : all) sims.push_back(simulate_plan(s, study::RotorDP::to_plan(seq, 3)));
  int64_t lo = INT64_MAX, hi = 0;
  for (const Sim& x : sims) lo = std::min(lo, x.peak), hi = std::max(hi, x.peak);
  int checked = 0;
  for (int k = 0; k <= 12; ++k) {
    const int64_t budget = lo + (hi - lo) * k / 12;
    int64_t best = INT64_MAX;
    for (const Sim& x : sims) {
      if (x.peak <= budget) best = std::min(best, x.time);
    }
    const study::PlanResult r = study::plan_for_budget(s, budget, {.selective = false, .offload = false});
    INFO("budget " << budget);
    REQUIRE(r.fits == (best != INT64_MAX));
    CHECK(r.step_time_ns == best);
    CHECK(r.peak_bytes <= budget);
    // With selective keeping (the default) and offload allowed too: within the budget and never
    // slower than the keep/recompute plan.
    for (const study::PlanOptions& o : {study::PlanOptions{}, study::PlanOptions{.selective = true, .offload = true}}) {
      const study::PlanResult rs = study::plan_for_budget(s, budget, o);
      CHECK(rs.fits == r.fits);
      if (rs.fits) {
        CHECK(rs.peak_bytes <= budget);
        CHECK(rs.step_time_ns <= r.step_time_ns);
        CHECK(simulate_plan(s, rs.plan).peak == rs.peak_bytes);
      }
    }
    ++checked;
  }
  CHECK(checked == 13);
}

TEST_CASE("study::plan_for_budget: peak never above the budget, and more memory is never slower", "[planner]") {
  const study::Scenario s = small(8);
  const study::PlanResult none = study::plan_for_budget(s, INT64_MAX / 4);
  REQUIRE(none.fits);
  CHECK(none.plan.is_trivial());
  const int64_t lo = none.min_peak_bytes, hi = none.baseline_peak_bytes;
  int64_t prev_time = INT64_MAX;
  for (int k = 0; k <= 24; ++k) {
    const int64_t budget = lo + (hi - lo) * k / 24;
    const study::PlanResult r = study::plan_for_budget(s, budget);
    INFO("budget " << budget);
    REQUIRE(r.fits);
    CHECK(r.peak_bytes <= budget);
    CHECK(r.step_time_ns <= prev_time);
    CHECK(simulate_plan(s, r.plan).peak == r.peak_bytes);
    prev_time = r.step_time_ns;
  }
}

TEST_CASE("study::plan_for_budget: when nothing fits, the least memory any plan reaches is the answer", "[planner]") {
  const study::Scenario s = small(4);
  const study::PlanResult r = study::plan_for_budget(s, 1024);
  CHECK_FALSE(r.fits);
  CHECK(r.min_peak_bytes > 1024);
  CHECK(r.min_peak_bytes <= r.baseline_peak_bytes);
  CHECK(r.peak_bytes == r.min_peak_bytes);
}

TEST_CASE("study::plan_for_budget: the kept analysis is the chosen plan's, and each plan is simulated once", "[planner]") {
  const study::Scenario s = small(6);
  const study::PlanResult none = study::plan_for_budget(s, INT64_MAX / 4);
  int checked = 0;
  for (int k = 0; k <= 6; ++k) {
    const int64_t budget = none.min_peak_bytes + (none.baseline_peak_bytes - none.min_peak_bytes) * k / 6;
    std::vector<int64_t> seen;
    study::PlanOptions o;
    o.progress = [&](int64_t done, int64_t estimate) {
      CHECK(done <= estimate);
      seen.push_back(done);
    };
    const study::PlanResult r = study::plan_for_budget(s, budget, o);
    INFO("budget " << budget);
    REQUIRE(r.fits);
    // Progress counts every simulation once, in order; none is repeated for the same plan.
    REQUIRE(static_cast<int64_t>(seen.size()) == r.simulations);
    for (size_t i = 0; i < seen.size(); ++i) CHECK(seen[i] == static_cast<int64_t>(i + 1));
    // Baseline, least-memory, full recomputation and most-memory plans, then a few probes per
    // variant: fewer than the 2 + 2 x 9 of bisecting 193 levels per variant.
    CHECK(r.simulations <= 16);
    // The analysis handed back is what analyzing the chosen plan gives.
    REQUIRE(r.analysis);
    study::Scenario chosen = s;
    chosen.checkpoint = r.plan;
    const study::Analysis a = study::analyze(chosen);
    CHECK(r.analysis->result.peak_bytes == r.peak_bytes);
    CHECK(r.analysis->result.step_time_ns == r.step_time_ns);
    CHECK(report::to_json(*r.analysis) == report::to_json(a));
    ++checked;
  }
  CHECK(checked == 7);
}

TEST_CASE("study::simulate_step_result: the planner's figures-only probes (no names, no report) give the analysis's figures",
          "[planner]") {
  const study::Scenario s = small(6);
  std::vector<graph::BlockPlan> plans;
  for (const auto kind : {graph::CheckpointPolicy::Kind::none, graph::CheckpointPolicy::Kind::full,
                          graph::CheckpointPolicy::Kind::selective, graph::CheckpointPolicy::Kind::offload}) {
    graph::CheckpointPolicy p;
    p.kind = kind;
    plans.push_back(graph::block_plan(p, 6));
  }
  // The DP's least-memory plan, the other plan the planner simulates for its figures alone.
  const study::Chain c = study::measure_chain(s);
  int64_t total = 0;
  for (size_t i = 0; i < c.size(); ++i) total += c.input_bytes[i] + c.activation_bytes[i];
  const study::RotorDP dp(c, (total + 191) / 192, 192);
  int lo = 0;
  while (lo <= 192 && dp.cost(lo) >= study::RotorDP::kInfeasible) ++lo;
  REQUIRE(lo <= 192);
  plans.push_back(dp.plan(lo));
  REQUIRE(!plans.back().before_backward.empty());
  for (const graph::BlockPlan& bp : plans) {
    const study::Analysis a = study::simulate_step(study::resolve(s, bp), s);
    const sim::SimResult r = study::simulate_step_result(study::resolve(s, bp), s);
    CHECK(r.peak_bytes == a.result.peak_bytes);
    CHECK(r.step_time_ns == a.result.step_time_ns);
    CHECK(r.events == a.result.events);
    CHECK(r.live_end_step == a.result.live_end_step);
  }
}
