// The planner's search: the DP's plans at a few memory levels, each simulated (once: plans repeat
// across levels and variants), the fastest that fits chosen.
#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <exception>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "actsim/study/planner.hpp"
#include "actsim/util/parallel.hpp"
#include "planner_probes.hpp"

namespace actsim::study {

struct PlanShared;
PlanResult plan_for_budget_impl(const Scenario& s, int64_t budget, bool selective, bool offload, PlanShared& shared);

constexpr int64_t kMaxRecomputePerBlock = 4;  // Note [Planner size]

namespace {
graph::CheckpointPolicy full_policy() {
  graph::CheckpointPolicy p;
  p.kind = graph::CheckpointPolicy::Kind::full;
  return p;
}
}  // namespace

using Probe = PlanProbe;

namespace {

// A plan's identity: equal keys, equal lowered steps.
std::string plan_key(const graph::BlockPlan& p) {
  std::string k;
  k.reserve(p.mode.size() * 6);
  for (size_t i = 0; i < p.mode.size(); ++i) {
    k += static_cast<char>('0' + static_cast<int>(p.mode[i]));
    k += std::to_string(p.segment[i]);
    k += ',';
  }
  k += '|';
  for (graph::OpKind o : p.keep_kinds) k += std::to_string(static_cast<int>(o)) + ",";
  k += '|';
  for (const auto& list : p.before_backward) {
    for (const auto& rc : list) k += std::to_string(rc.block) + (rc.keep_all ? "+" : "-");
    k += ';';
  }
  return k;
}

}  // namespace

// Frees what the search is done with on a thread of its own: a lowered step is ~10^5 small
// allocations, and freeing them is a fifth of a simulation's time (off the critical path when
// there is a core to spare).
class Reaper {
 public:
  ~Reaper() {
    {
      std::lock_guard<std::mutex> l(m_);
      done_ = true;
    }
    cv_.notify_one();
    if (t_.joinable()) t_.join();
  }
  void drop(std::shared_ptr<const Analysis> a) {
    if (!a) return;
    {
      std::lock_guard<std::mutex> l(m_);
      if (!t_.joinable()) t_ = std::thread([this] { run(); });
      q_.push_back(std::move(a));
    }
    cv_.notify_one();
  }

 private:
  void run() {
    std::unique_lock<std::mutex> l(m_);
    for (;;) {
      cv_.wait(l, [&] { return done_ || !q_.empty(); });
      if (q_.empty()) return;
      std::shared_ptr<const Analysis> a = std::move(q_.back());
      q_.pop_back();
      l.unlock();
      a.reset();
      l.lock();
    }
  }
  std::mutex m_;
  std::condition_variable cv_;
  std::vector<std::shared_ptr<const Analysis>> q_;
  bool done_ = false;
  std::thread t_;
};

// What every variant of the search shares (each simulation is a lowering and simulation of the
// whole step, the bulk of a plan's time at many layers): the chain, and every plan simulated so
// far (the variants and levels propose the same plans again and again: the trivial plan, full
// recomputation, the least-memory plan), and the fastest plan that fits so far, with its analysis
// when it was simulated as a possible answer (simulate_plan; else `actsim plan` analyzes it).
struct PlanShared {
  std::optional<Chain> chain;
  std::map<std::string, Probe> probes;  // plan_key -> figures
  int64_t simulations = 0;
  int64_t estimate = 0;                 // simulations expected in all (progress)
  int64_t budget = 0;
  const PlanOptions* options = nullptr;
  std::shared_ptr<const Analysis> fastest;  // of the fastest plan within the budget so far, if kept
  std::string fastest_key;                  // that plan's key (empty: none fits yet)
  int64_t fastest_time = 0;
  const Scenario* pipeline = nullptr;   // issue 13 (pprank): probes simulate this pipeline, not the stage
  Reaper reaper;  // last member: destroyed (joined) first

  // A simulated plan: `a` its analysis, or null when only its figures `p` were simulated.
  void record(std::string key, Probe p, std::shared_ptr<const Analysis> a) {
    ++simulations;
    if (options && options->progress) options->progress(simulations, std::max(simulations, estimate));
    if (p.peak <= budget && (fastest_key.empty() || p.time < fastest_time)) {
      reaper.drop(std::move(fastest));
      fastest = std::move(a), fastest_key = key, fastest_time = p.time;
    } else {
      reaper.drop(std::move(a));
    }
    probes.emplace(std::move(key), p);
  }
  // `answer`: a plan that may be the answer (its analysis `a` is kept while it is the fastest that
  // fits); otherwise its figures alone.
  static Probe simulate(const Scenario& s, const graph::BlockPlan& bp, bool answer, std::shared_ptr<const Analysis>& a) {
    if (!answer) return simulate_figures(s, bp);
    a = simulate_plan(s, bp);
    return {a->result.peak_bytes, a->result.step_time_ns};
  }
  Probe probe(const Scenario& s, const graph::BlockPlan& bp, bool answer = true) {
    std::string k = plan_key(bp);
    auto it = probes.find(k);
    if (it != probes.end()) return it->second;
    std::shared_ptr<const Analysis> a;
    const Probe p = simulate(pipeline ? *pipeline : s, bp, answer, a);
    record(k, p, std::move(a));
    return probes.at(k);
  }
  // Simulates the plans not simulated yet, several at once (independent lowerings); `answers[i]`
  // as probe's `answer` for plans[i].
  void probe_all(const Scenario& s, const std::vector<const graph::BlockPlan*>& plans, const std::vector<bool>& answers) {
    struct Todo {
      std::string key;
      const graph::BlockPlan* plan;
      bool answer;
      Probe figures{};
      std::shared_ptr<const Analysis> analysis;
    };
    std::vector<Todo> todo;
    for (size_t i = 0; i < plans.size(); ++i) {
      std::string k = plan_key(*plans[i]);
      bool dup = probes.count(k) > 0;
      for (Todo& t : todo) {
        if (t.key != k) continue;
        dup = true;
        t.answer = t.answer || answers[i];
      }
      if (!dup) todo.push_back({std::move(k), plans[i], answers[i]});
    }
    // The figures-only plans run first: each thread frees such a graph before its next lowering,
    // which reuses the memory (fewer pages to fault in). Every plan runs; an error is the first
    // plan's in `plans` order, as one loop over them would throw.
    std::vector<size_t> order;
    for (int pass = 0; pass < 2; ++pass) {
      for (size_t i = 0; i < todo.size(); ++i) {
        if (todo[i].answer == (pass == 1)) order.push_back(i);
      }
    }
    std::vector<std::exception_ptr> errors(todo.size());
    util::parallel_for(static_cast<int64_t>(order.size()), util::hardware_threads(), [&](int64_t j) {
      const size_t i = order[static_cast<size_t>(j)];
      Todo& t = todo[i];
      try {
        t.figures = simulate(pipeline ? *pipeline : s, *t.plan, t.answer, t.analysis);
      } catch (...) {
        errors[i] = std::current_exception();
      }
    });
    for (const std::exception_ptr& e : errors) {
      if (e) std::rethrow_exception(e);
    }
    for (Todo& t : todo) record(std::move(t.key), t.figures, std::move(t.analysis));
  }
};

PlanResult plan_for_budget(const Scenario& s, int64_t budget, const PlanOptions& options, const Scenario* pipeline) {
  // The keep/recompute plan (the DP is exact there), then with the op-level and offload options
  // (estimated in the DP): every answer is simulated, and the fastest that fits wins, so the
  // options never make a plan slower.
  PlanShared shared;
  shared.options = &options;
  shared.budget = budget;
  shared.pipeline = pipeline;
  // The baseline and full recomputation, then per variant its least-memory plan and about three
  // probes around the memory model's guess.
  shared.estimate = 2 + 4 * (1 + options.selective + options.offload);
  PlanResult best = plan_for_budget_impl(s, budget, false, false, shared);
  auto consider = [&](PlanResult r) {
    const int64_t least = std::min(best.min_peak_bytes, r.min_peak_bytes);
    const bool better = r.fits ? (!best.fits || r.step_time_ns < best.step_time_ns)
                               : (!best.fits && r.peak_bytes < best.peak_bytes);
    if (better) best = std::move(r);
    best.min_peak_bytes = least;
  };
  if (options.selective) consider(plan_for_budget_impl(s, budget, true, false, shared));
  if (options.offload) consider(plan_for_budget_impl(s, budget, options.selective, true, shared));
  best.simulations = shared.simulations;
  if (!shared.fastest_key.empty() && shared.fastest_key == plan_key(best.plan)) {
    // Simulated for its figures alone (a least-memory plan): its report is lowered now, once.
    best.analysis = shared.fastest ? shared.fastest : simulate_plan(s, best.plan);
  }
  return best;
}

PlanResult plan_for_budget_impl(const Scenario& s, int64_t budget, bool selective, bool offload, PlanShared& shared) {
  PlanResult r;
  r.budget_bytes = budget;
  const int64_t L = s.model.n_layers;
  auto simulate_plan = [&](const graph::BlockPlan& bp) { return shared.probe(s, bp); };
  graph::BlockPlan none = graph::block_plan(graph::CheckpointPolicy{}, L);

  if (!shared.chain) shared.chain = measure_chain(s);
  Chain chain = *shared.chain;
  if (!selective) {
    chain.activation_selective_bytes.clear();
    chain.backward_selective_ns.clear();
  }
  if (!offload) chain.offload_penalty_ns.clear();
  int64_t total = 0;
  for (size_t i = 0; i < chain.size(); ++i) total += chain.input_bytes[i] + chain.activation_bytes[i];
  constexpr int kLevels = 192;
  const int64_t unit = std::max<int64_t>(1, (total + kLevels - 1) / kLevels);
  const auto t0 = std::chrono::steady_clock::now();
  RotorDP dp(chain, unit, kLevels);
  r.dp_ns = std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - t0).count();

  // The least level with a plan, and the levels' plans (plans repeat across levels).
  int lo_level = 0;
  while (lo_level <= kLevels && dp.cost(lo_level) >= RotorDP::kInfeasible) ++lo_level;
  std::map<int, graph::BlockPlan> plans;
  auto plan_at = [&](int level) -> const graph::BlockPlan& {
    auto it = plans.find(level);
    if (it != plans.end()) return it->second;
    return plans.emplace(level, dp.plan(level)).first->second;
  };
  // Note [Planner size]: the least-memory plans recompute a block once per later block, which is
  // quadratic in L (500,000 block forwards at 1,000 layers: a graph of tens of GB to lower and
  // simulate). Plans recomputing more than kMaxRecomputePerBlock x L blocks are left out: the
  // least level rises until its plan is within that (plans recompute less as memory grows).
  auto recomputes = [&](int level) {
    const graph::BlockPlan& bp = plan_at(level);
    int64_t n = 0;
    for (const auto& list : bp.before_backward) n += static_cast<int64_t>(list.size());
    return n;
  };
  const int64_t cap = kMaxRecomputePerBlock * L;
  if (lo_level <= kLevels && recomputes(lo_level) > cap) {
    int bad = lo_level, good = kLevels + 1;  // recomputes(bad) > cap; good: within it, or beyond the levels
    while (good - bad > 1) {
      const int mid = bad + (good - bad) / 2;
      (recomputes(mid) > cap ? bad : good) = mid;
    }
    lo_level = good;
  }
  auto probe = [&](int level) { return simulate_plan(plan_at(level)); };
  auto fits = [&](int level) { return probe(level).peak <= budget; };
  const graph::BlockPlan full_plan = graph::block_plan(full_policy(), L);
  // Plans every answer needs, simulated together: no checkpointing (the baseline), the
  // least-memory plan and full recomputation (does anything fit? the least memory any plan
  // reaches), the most-memory plan (the answer for a generous budget).
  // The least-memory plans (the DP's, full recomputation) are answers only when little fits:
  // their figures alone.
  if (lo_level <= kLevels) {
    shared.probe_all(s, {&none, &plan_at(lo_level), &full_plan, &plan_at(kLevels)}, {true, false, false, true});
  }
  const Probe base = simulate_plan(none);
  r.baseline_peak_bytes = base.peak;
  r.baseline_step_time_ns = base.time;
  if (base.peak <= budget) {
    r.fits = true;
    r.plan = none;
    r.peak_bytes = base.peak;
    r.step_time_ns = base.time;
  } else if (lo_level > kLevels || !fits(lo_level)) {
    r.fits = false;
  } else {
    // Largest level whose plan fits: the DP's optimum only improves with memory, so this is the
    // fastest plan among the levels' optima that fits. The peak grows about linearly with the
    // level: interpolation search between the bracket's simulated peaks, every other step a
    // bisection when the bracket did not halve (so never worse than twice bisection's probes);
    // levels with equal plans cost nothing.
    int lo = lo_level, hi = kLevels + 1;  // fits(lo), !fits(hi) (hi = beyond the last level)
    if (fits(kLevels)) lo = kLevels;
    else hi = kLevels;
    bool bisect = false;
    while (hi - lo > 1) {
      int mid = lo + (hi - lo) / 2;
      if (!bisect) {
        const int64_t plo = probe(lo).peak, phi = probe(hi).peak;
        if (phi > plo) {
          const double x = static_cast<double>(budget - plo) / static_cast<double>(phi - plo);
          mid = lo + static_cast<int>(x * (hi - lo));
        }
        mid = std::clamp(mid, lo + 1, hi - 1);
      }
      const int width = hi - lo;
      (fits(mid) ? lo : hi) = mid;
      bisect = !bisect && 2 * (hi - lo) > width;
    }
    r.fits = true;
    r.plan = plan_at(lo);
    const Probe p = probe(lo);
    r.peak_bytes = p.peak;
    r.step_time_ns = p.time;
  }
  // The least memory any plan reaches: the DP's least-memory plan, or full recomputation.
  Probe least = lo_level <= kLevels ? probe(lo_level) : base;
  const Probe full = simulate_plan(full_plan);
  r.min_peak_bytes = std::min({least.peak, full.peak, base.peak});
  if (!r.fits) {
    const bool full_is_least = full.peak <= least.peak;
    r.plan = full_is_least ? full_plan : plan_at(lo_level);
    r.peak_bytes = full_is_least ? full.peak : least.peak;
    r.step_time_ns = full_is_least ? full.time : least.time;
  }
  return r;
}

}  // namespace actsim::study
