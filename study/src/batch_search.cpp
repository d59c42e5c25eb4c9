// The batch search (and the sequence-length search of `actsim fit`): the one doubling-then-bisection
// search, and the model-guided batch search that needs about two simulations.
#include "actsim/study/batch_search.hpp"

#include <algorithm>
#include <map>
#include <memory>
#include <optional>
#include <vector>

#include "actsim/graph/lower.hpp"
#include "actsim/sim/engine.hpp"
#include "actsim/study/resolve.hpp"
#include "batch_scaling.hpp"

// Note [Batch search]
// Doubling then bisection lowers and simulates the whole step about 2 log2(b) times (6 for the
// seed's answer of 4: batches 1, 2, 4, 8, 6, 5), and lowering is most of a simulation's time. For
// a fixed structure (batches >= 2 under a fixed policy) every storage's and workspace's bytes are
// affine in the batch (Note [Batch scaling] in sweep.cpp), and the engine's peak is the largest
// live count at an op's start. So:
//   1. A guess from the analysis at the scenario's own batch B: at each op start, the live bytes
//      split into what does not grow with the batch (parameters, buffers, optimizer state,
//      gradients) and what does (inputs, activations, temporaries, workspaces), the latter taken
//      as proportional to the batch; the guess is the largest batch under the device at every
//      op start.
//   2. The step is simulated for real at the guess g and at g + 1. If g fits and g + 1 does not,
//      g is the answer.
//   3. Otherwise the live counts at every op start at g and g + 1 (the same number of op starts)
//      are an affine model in the batch; its answer is the next guess. After kRounds rounds, or
//      when the model and the simulations disagree, the search is doubling then bisection over real
//      simulations (largest_fitting), reusing every answer it has.
//   4. The search lowers until it holds lowerings at two consecutive batches >= 2 (its first pair,
//      g and g + 1). When they are one structure (equal structure_hash, batch_scaling.hpp), every
//      later probe at a batch >= 2 is the g graph with its sizes rewritten (ScaledStep):
//      storage bytes, workspaces, FLOPs and bytes moved, each affine in the batch through the two
//      lowerings (Note [Batch scaling]); the engine simulates it as it would the lowering
//      (tests: "[batch_search][scaled]" compares every size with the lowering's).
// Any answer is two simulations, b fitting and b + 1 not: for a peak that grows with the
// batch (what doubling then bisection assumes too) it is the one answer. A budget policy plans
// again at every batch (the plan depends on it), so its search is doubling then bisection.

namespace actsim::study {

using graph::Category;
using sim::Observer;
using sim::SimResult;
using sim::StepTables;

int64_t largest_fitting(const std::function<bool(int64_t)>& fits, int64_t limit) {
  if (limit < 1 || !fits(1)) return 0;
  int64_t lo = 1, hi = 2;  // fits(lo); hi untested, or not fitting
  for (;;) {
    if (hi > limit) {      // beyond the limit counts as not fitting
      hi = limit + 1;
      break;
    }
    if (!fits(hi)) break;
    lo = hi;
    hi *= 2;
  }
  while (hi - lo > 1) {
    const int64_t mid = lo + (hi - lo) / 2;
    (fits(mid) ? lo : hi) = mid;
  }
  return lo;
}

namespace {

constexpr int kRounds = 3;

// Device bytes live at each op start once its outputs and workspace are allocated (what the engine
// compares against the peak), split into bytes that grow with the batch and bytes that do not.
class StartLive : public Observer {
 public:
  struct Point {
    int64_t fixed = 0, growing = 0;
  };
  std::vector<Point> at_start;         // [op starts, in order]; offsets from the step start until finish()

  explicit StartLive(const StepTables& t) : t_(t) {}
  void on_op_start(graph::OpId, int64_t) override { at_start.push_back(cur_); }
  void on_alloc(graph::StorageId s, graph::OpId, int64_t, int64_t) override { change(s, +1), at_start.back() = cur_; }
  void on_free(graph::StorageId s, graph::OpId, int64_t, int64_t) override { change(s, -1); }
  void on_workspace(graph::OpId, int64_t bytes, int64_t, int64_t) override {
    cur_.growing += bytes;
    if (bytes > 0) at_start.back() = cur_;
  }
  // Adds the step-start figures (the engine reports no events for storages that exist before it).
  void finish(const SimResult& r) {
    Point start;
    for (int c = 0; c < graph::kNumCategories; ++c) (grows(c) ? start.growing : start.fixed) += r.step_start_by_category[c];
    for (Point& p : at_start) p.fixed += start.fixed, p.growing += start.growing;
  }
  static bool grows(int c) {
    const auto cat = static_cast<Category>(c);
    return cat == Category::input || cat == Category::activation || cat == Category::temporary;
  }

 private:
  void change(graph::StorageId s, int sign) {
    if (t_.storage_on_host(s)) return;
    (grows(t_.storage_category(s)) ? cur_.growing : cur_.fixed) += sign * t_.storage_bytes(s);
  }
  const StepTables& t_;
  Point cur_;
};

// One simulation of the step at a batch size.
struct Probe {
  bool fits = false;
  std::vector<int64_t> start_live;     // [op starts] total live bytes; empty when its totals overflow
};

int64_t floor_div(int64_t a, int64_t b) {  // b > 0
  return a / b - ((a % b != 0) && (a < 0));
}

// The total live bytes at every op start.
std::vector<int64_t> totals(StartLive& obs, const SimResult& r) {
  obs.finish(r);
  std::vector<int64_t> out;
  out.reserve(obs.at_start.size());
  for (const StartLive::Point& p : obs.at_start) out.push_back(p.fixed + p.growing);
  return out;
}

class BatchSearch {
 public:
  BatchSearch(ResolvedStep base, int64_t limit) : base_(std::move(base)), limit_(limit) {}

  // Step 1 of Note [Batch search]: the batch's own analysis (tables and result) gives its answer
  // and the first guess.
  int64_t guess_from(const StepTables& tables, const SimResult& r, int64_t batch) {
    StartLive obs(tables);
    Observer* list[] = {&obs};
    const SimResult again = sim::simulate(tables, list);
    const int64_t m = base_.device.memory_bytes;
    obs.finish(again);
    Probe p;
    p.fits = r.peak_bytes <= m;
    for (const auto& pt : obs.at_start) p.start_live.push_back(pt.fixed + pt.growing);
    known_[batch] = std::move(p);
    // fixed + growing * b / batch <= m at every op start
    int64_t g = limit_;
    for (const auto& pt : obs.at_start) {
      if (pt.fixed > m) return 0;
      if (pt.growing > 0) {
        const long double b = static_cast<long double>(m - pt.fixed) * static_cast<long double>(batch) /
                              static_cast<long double>(pt.growing);
        g = std::min<int64_t>(g, b >= static_cast<long double>(limit_) ? limit_ : static_cast<int64_t>(b));
      }
    }
    return g;
  }

  int64_t run(int64_t g) {
    for (int round = 0; round < kRounds; ++round) {
      if (std::optional<int64_t> b = answer()) return *b;  // e.g. the scenario's own batch of 1 does not fit
      g = std::clamp<int64_t>(g, 1, limit_);
      if (known_.count(1) && known_[1].fits && g == 1) g = std::min<int64_t>(2, limit_);  // 1 and 2 differ in structure
      if (g == limit_) {
        if (probe(g).fits) return g;
        break;
      }
      // One after the other on this thread (a second thread would fault in a heap of its own, and
      // make every malloc take its locks). On the loaded 2-core machine that was 1.18x less CPU
      // time and wall clock for the whole command (bench/compare_cpu.py, 11 runs alternated); on
      // an idle machine the wall clock grows by about one probe. Both lowerings are kept for step
      // 4 (the seed's peak RSS: 29 MiB).
      const Probe& p = probe(g);
      if (!known_.count(g + 1)) remember(g + 1, simulate_at(g + 1));
      if (std::optional<int64_t> b = answer()) return *b;
      const Probe& q = known_[g + 1];
      if (p.start_live.empty() || p.start_live.size() != q.start_live.size()) break;
      const int64_t b = predict(p, q, g);
      if (b == g) break;                 // the model says g, the simulations say otherwise
      g = b;
    }
    return largest_fitting([this](int64_t b) { return probe(b).fits; }, limit_);
  }

 private:
  Probe simulate_at(int64_t b) {
    if (!scaled_ && pair_ && b >= 2) {    // step 4, once a third batch >= 2 is probed
      scaled_ = std::make_unique<ScaledStep>(std::move(*kept_), *pair_, kept_batch_);
      kept_.reset();
      pair_.reset();
      if (!scaled_->ok()) scaled_.reset(), failed_ = true;
    }
    if (scaled_ && b >= 2) {
      const graph::Graph* g = scaled_->at(b);
      return g ? simulate(*g) : Probe{};
    }
    ResolvedStep r = base_;
    r.training.batch_size = b;
    graph::StepGraph step = graph::lower_training_step(r.model, r.training, *r.runtime, &r.plan, {.names = false, .validate = false});
    Probe p = simulate(step.graph);
    if (b >= 2) keep(b, std::move(step));
    return p;
  }
  Probe simulate(const graph::Graph& g) const {
    std::optional<StepTables> t = StepTables::try_build(g, base_.device);
    Probe p;
    if (!t) return p;                    // its byte or time totals overflow int64: it does not fit
    StartLive obs(*t);
    Observer* list[] = {&obs};
    const SimResult res = sim::simulate(*t, list);
    p.fits = res.peak_bytes <= base_.device.memory_bytes;
    p.start_live = totals(obs, res);
    return p;
  }
  // Step 4: the first lowering at a batch >= 2 is kept, and a second at the next batch; the
  // ScaledStep is made from them when a third batch is probed (most searches end before).
  void keep(int64_t b, graph::StepGraph step) {
    if (failed_ || pair_) return;
    if (!kept_) {
      kept_ = std::make_unique<graph::StepGraph>(std::move(step));
      kept_batch_ = b;
    } else if (b == kept_batch_ + 1) {
      pair_ = std::make_unique<graph::StepGraph>(std::move(step));
    } else if (b + 1 == kept_batch_) {
      pair_ = std::move(kept_);
      kept_ = std::make_unique<graph::StepGraph>(std::move(step));
      kept_batch_ = b;
    }
  }
  const Probe& probe(int64_t b) {
    auto it = known_.find(b);
    if (it != known_.end()) return it->second;
    return known_[b] = simulate_at(b);
  }
  void remember(int64_t b, Probe p) {
    if (!known_.count(b)) known_[b] = std::move(p);
  }
  // A batch that fits next to one that does not; 0 when a batch of 1 does not fit.
  std::optional<int64_t> answer() const {
    auto one = known_.find(1);
    if (one != known_.end() && !one->second.fits) return 0;
    for (auto it = known_.begin(); it != known_.end(); ++it) {
      auto nx = std::next(it);
      if (nx != known_.end() && nx->first == it->first + 1 && it->second.fits && !nx->second.fits) return it->first;
    }
    return std::nullopt;
  }
  // The largest b with p + (b - g)(q - p) <= memory at every op start (the affine model through
  // the simulations at g and g + 1).
  int64_t predict(const Probe& p, const Probe& q, int64_t g) const {
    const int64_t m = base_.device.memory_bytes;
    int64_t b = limit_;
    for (size_t i = 0; i < p.start_live.size(); ++i) {
      const int64_t at = p.start_live[i], d = q.start_live[i] - at;
      if (d > 0) b = std::min(b, g + floor_div(m - at, d));
      else if (at > m) return 1;          // never fits at or beyond g
    }
    return std::clamp<int64_t>(b, 1, limit_);
  }

  ResolvedStep base_;
  int64_t limit_;
  std::map<int64_t, Probe> known_;
  std::unique_ptr<graph::StepGraph> kept_;  // step 4: the first lowering at a batch >= 2
  std::unique_ptr<graph::StepGraph> pair_;  // ... and the one at kept_batch_ + 1
  int64_t kept_batch_ = 0;
  std::unique_ptr<ScaledStep> scaled_;      // step 4: every later probe's graph
  bool failed_ = false;                     // the two were not one structure: lower every probe
};

}  // namespace

int64_t max_batch_size(const Analysis& a) {
  const Scenario& s = a.scenario;
  if (a.pipeline) {
    // issue 13, pipeline parallelism: the largest micro-batch at which every stage fits, each
    // size a whole pipeline (its stages' lowerings and the schedule's replay).
    return largest_fitting([&](int64_t b) {
      if (b == s.training.batch_size) return a.result.peak_bytes <= s.device.memory_bytes;
      Scenario t = s;
      t.training.batch_size = b;
      try {
        return analyze(t).result.peak_bytes <= t.device.memory_bytes;
      } catch (const sim::ByteOverflow&) {
        return false;
      }
    });
  }
  if (s.is_budget()) {
    // The planner plans again at every batch size.
    return largest_fitting([&](int64_t b) {
      if (b == s.training.batch_size) return a.result.peak_bytes <= s.device.memory_bytes;
      Scenario t = s;
      t.training.batch_size = b;
      std::optional<SimResult> r = try_simulate_step(resolve(t));
      return r && r->peak_bytes <= t.device.memory_bytes;
    });
  }
  BatchSearch search(resolve(s, a.block_plan), kMaxSearchedSize);
  const int64_t g = search.guess_from(*a.tables, a.result, s.training.batch_size);
  return search.run(g);
}

int64_t max_batch_size(const Scenario& s) {
  if (s.training.parallel.pp > 1 && !s.training.parallel.pp_stage()) return max_batch_size(analyze(s));  // issue 13
  if (s.is_budget()) {
    return largest_fitting([&](int64_t b) {
      Scenario t = s;
      t.training.batch_size = b;
      std::optional<SimResult> r = try_simulate_step(resolve(t));
      return r && r->peak_bytes <= t.device.memory_bytes;
    });
  }
  const ResolvedStep base = resolve(s);
  BatchSearch search(base, kMaxSearchedSize);
  const graph::StepGraph step =
      graph::lower_training_step(base.model, base.training, *base.runtime, &base.plan, {.names = false, .validate = false});
  std::optional<StepTables> t = StepTables::try_build(step.graph, base.device);
  if (!t) return search.run(1);          // the scenario's own batch overflows: no guess from it
  const SimResult r = sim::simulate(*t);
  return search.run(search.guess_from(*t, r, s.training.batch_size));
}

int64_t max_seq_len(const Scenario& s) {
  const std::optional<ResolvedStep> base = s.is_budget() ? std::nullopt : std::optional(resolve(s));
  return largest_fitting([&](int64_t t) {
    Scenario u = s;
    u.model.seq_len = t;
    u.origin["model.seq_len"] = "--set";
    if (scenario_problem(u)) return false;  // a length the scenario rules out does not fit
    ResolvedStep r = base ? *base : resolve(u);  // a budget plans again at every length
    r.model.seq_len = t;
    std::optional<SimResult> res = try_simulate_step(r);
    return res && res->peak_bytes <= r.device.memory_bytes;
  });
}

}  // namespace actsim::study
