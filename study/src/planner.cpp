#include "actsim/study/planner.hpp"

#include <fmt/format.h>

#include <cmath>
#include <optional>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <exception>
#include <map>
#include <memory>
#include <thread>
#include <string>

#include "actsim/util/error.hpp"
#include "actsim/util/parallel.hpp"
#include "actsim/graph/profile.hpp"
#include "actsim/study/pipeline.hpp"  // issue 13: a pipeline planned on its worst stage

namespace actsim::study {

using sim::StepTables;
using sim::SimResult;
using sim::simulate;

RotorDP::RotorDP(const Chain& chain, int64_t unit, int levels)
    : n_(static_cast<int>(chain.size())), levels_(levels), has_head_(chain.has_head) {
  ACTSIM_ASSERT(unit > 0 && levels >= 0, "bad DP discretisation");
  auto units = [&](int64_t bytes) { return static_cast<int32_t>(std::min<int64_t>((bytes + unit - 1) / unit, levels + 1)); };
  in_.resize(n_ + 1, 0);
  act_.resize(n_);
  for (int i = 0; i < n_; ++i) {
    in_[i] = units(chain.input_bytes[i]);
    act_[i] = units(chain.activation_bytes[i]);
  }
  in_[n_] = 0;
  const bool has_sel = !chain.activation_selective_bytes.empty();
  act_sel_.assign(n_, 0);
  bwd_sel_.assign(n_, 0);
  for (int i = 0; i < n_; ++i) {
    act_sel_[i] = has_sel ? units(chain.activation_selective_bytes[i]) : 0;
    // Without the selective option its backward time is never used: the plain one keeps the
    // homogeneity test below about the blocks that are (an O(n^3) DP otherwise).
    bwd_sel_[i] = has_sel ? chain.backward_selective_ns[i] : chain.backward_ns[i];
  }
  const bool has_off = !chain.offload_penalty_ns.empty();
  off_pen_.assign(n_, 0);
  for (int i = 0; i < n_ && has_off; ++i) off_pen_[i] = chain.offload_penalty_ns[i];
  fwd_saved_ = chain.forward_saved_ns.empty() ? chain.forward_ns : chain.forward_saved_ns;
  bwd_ = chain.backward_ns;
  std::vector<int64_t> fwd = chain.forward_ns;
  const int blocks = has_head_ ? n_ - 1 : n_;
  if (blocks > kExactBlocks) {
    // Note [Planner size]: beyond kExactBlocks the chain is made homogeneous, each block costing
    // the most any block costs (memory and time), so the DP table is 2n keys, not n^2: linear
    // memory, quadratic time. Its plan is then conservative, not exact; like every plan it is
    // simulated before it is returned, so its peak is still checked against the budget.
    auto hmax = [&](auto& v, int n) {
      auto m = *std::max_element(v.begin(), v.begin() + n);
      std::fill(v.begin(), v.begin() + n, m);
    };
    hmax(fwd, blocks);
    hmax(fwd_saved_, blocks);
    hmax(act_, blocks);
    hmax(act_sel_, blocks);
    hmax(off_pen_, blocks);
    hmax(in_, n_);
    int64_t extra = 0;
    for (int i = 0; i < blocks; ++i) extra = std::max(extra, bwd_sel_[i] - bwd_[i]);
    for (int i = 0; i < blocks; ++i) bwd_sel_[i] = bwd_[i] + extra;
  }
  fwd_prefix_.assign(n_ + 1, 0);
  for (int i = 0; i < n_; ++i) fwd_prefix_[i + 1] = fwd_prefix_[i] + fwd[i];
  homogeneous_ = blocks > 0;
  for (int i = 1; i < blocks && homogeneous_; ++i) {
    // Backward times do not matter here: each block's backward runs once in every plan.
    homogeneous_ = fwd[i] == fwd[0] && fwd_saved_[i] == fwd_saved_[0] &&
                   in_[i] == in_[0] && act_[i] == act_[0] && act_sel_[i] == act_sel_[0] &&
                   bwd_sel_[i] - bwd_[i] == bwd_sel_[0] - bwd_[0] && off_pen_[i] == off_pen_[0] &&
                   (i + 1 < n_ ? in_[i + 1] == in_[1] : true);
  }
  if (homogeneous_) {
    for (int i = 0; i < blocks; ++i) {  // a constant shift of every plan's cost
      bwd_sel_[i] = bwd_sel_[i] - bwd_[i] + bwd_[0];
      bwd_[i] = bwd_[0];
    }
  }
  const size_t keys = homogeneous_ ? static_cast<size_t>(2 * n_) : static_cast<size_t>(n_) * n_;
  const size_t total = keys * static_cast<size_t>(levels_ + 1);
  c_.assign(total, kInfeasible);
  choice_.assign(total, -2);
  std::vector<bool> done(keys, false);
  // C(s, t, m): blocks s..t, x_s stored (not counted), the gradient of x_{t+1} given; m units free.
  for (int len = 0; len < n_; ++len) {
    for (int s = n_ - 1 - len; s >= 0; --s) {  // right to left: a head chain is met first
      const int t = s + len;
      if (done[key(s, t)]) continue;
      done[key(s, t)] = true;
      for (int m = 0; m <= levels_; ++m) {
        int64_t best = kInfeasible;
        int32_t pick = -2;
        // F_all(s): keep block s's activations and its output (the next input), then the rest,
        // then block s's backward.
        const int m1 = m - act_[s] - (len == 0 ? 0 : in_[s + 1]);
        if (m1 >= 0) {
          const int64_t rest = len == 0 ? 0 : c_[at(s + 1, t, m1)];
          if (rest < kInfeasible) {
            // Right before its backward a block recomputes only what feeds its saved tensors (the
            // first forward of the last block runs whole: the same constant in every plan).
            best = (len == 0 ? fwd_saved_[s] : fwd[s]) + rest + bwd_[s];
            pick = -1;
          }
        }
        // On the forward pass (a chain ending at the head), block s may instead be kept
        // selectively: less memory, its attention core recomputed in its backward.
        if (has_sel && has_head_ && t == n_ - 1 && s < t) {
          // ... and during its backward the recomputed core brings it back to its full size.
          const int ms = m - act_sel_[s] - in_[s + 1];
          if (ms >= 0 && m >= act_[s]) {
            const int64_t rest = c_[at(s + 1, t, ms)];
            if (rest < kInfeasible && fwd[s] + rest + bwd_sel_[s] < best) {
              best = fwd[s] + rest + bwd_sel_[s];
              pick = -3;
            }
          }
        }
        // ... or offloaded: nothing of it stays on the device until its backward, when it (and
        // the block prefetched next) are back.
        if (has_off && has_head_ && t == n_ - 1 && s < t) {
          const int mo = m - in_[s + 1];
          if (mo >= 0 && m >= 2 * act_[s]) {
            const int64_t rest = c_[at(s + 1, t, mo)];
            const int64_t cost = fwd[s] + rest + bwd_[s] + off_pen_[s];
            if (rest < kInfeasible && cost < best) best = cost, pick = -4;
          }
        }
        c_[at(s, t, m)] = best;
        choice_[at(s, t, m)] = pick;
      }
      // Checkpoint at k: run s..k-1 keeping nothing, store x_k, do k..t, then s..k-1 again. Over
      // k, then m (the rows are contiguous in m); for each m the first k with the least cost wins,
      // as when k is the inner loop. Keys (k, t) and (s, k - 1) are shorter chains than (s, t).
      int64_t* best = &c_[at(s, t, 0)];
      int32_t* pick = &choice_[at(s, t, 0)];
      for (int k = s + 1; k <= t; ++k) {
        const int ik = in_[k];
        const int64_t fwd_k = fwd_prefix_[k] - fwd_prefix_[s];
        const int64_t* right = &c_[at(k, t, 0)];
        const int64_t* left = &c_[at(s, k - 1, 0)];
        const int32_t rel = k - s;  // relative: keys are shared by equal chains
        // An infeasible side (kInfeasible = INT64_MAX / 4, never exceeded) makes the sum at least
        // kInfeasible, which never beats best[m]: no test for it (a loop without branches).
        for (int m = ik; m <= levels_; ++m) {
          const int64_t cost = fwd_k + right[m - ik] + left[m];
          const bool better = cost < best[m];
          best[m] = better ? cost : best[m];
          pick[m] = better ? rel : pick[m];
        }
      }
    }
  }
}

int64_t RotorDP::cost(int level) const {
  if (n_ == 0) return 0;
  return c_[at(0, n_ - 1, std::clamp(level, 0, levels_))];
}

void RotorDP::sequence(int s, int t, int m, std::vector<Op>& out) const {
  const int32_t pick = choice_[at(s, t, m)];
  ACTSIM_ASSERT(pick != -2, "sequence of an infeasible DP state");
  const int32_t k = s + pick;
  if (pick == -3 || pick == -4) {
    out.push_back({pick == -3 ? Step::fwd_keep_selective : Step::fwd_offload, s});
    sequence(s + 1, t, m - (pick == -3 ? act_sel_[s] : 0) - in_[s + 1], out);
    out.push_back({Step::bwd, s});
    return;
  }
  if (pick == -1) {
    out.push_back({Step::fwd_keep, s});
    if (s < t) sequence(s + 1, t, m - act_[s] - in_[s + 1], out);
    out.push_back({Step::bwd, s});
    return;
  }
  for (int j = s; j < k; ++j) out.push_back({Step::fwd_ckpt, j});
  sequence(k, t, m - in_[k], out);
  sequence(s, k - 1, m, out);
}

graph::BlockPlan RotorDP::plan(int level) const {
  const int blocks = has_head_ ? n_ - 1 : n_;
  if (n_ == 0 || cost(level) >= kInfeasible) {
    graph::BlockPlan p;
    p.mode.assign(static_cast<size_t>(blocks), graph::BlockMode::keep);
    p.segment.assign(static_cast<size_t>(blocks), -1);
    return p;
  }
  std::vector<Op> seq;
  sequence(0, n_ - 1, std::clamp(level, 0, levels_), seq);
  return to_plan(seq, blocks);
}

graph::BlockPlan RotorDP::to_plan(const std::vector<Op>& seq, int blocks) {
  graph::BlockPlan p;
  p.mode.assign(static_cast<size_t>(blocks), graph::BlockMode::keep);
  p.segment.assign(static_cast<size_t>(blocks), -1);
  // The prefix up to the first backward is the forward pass: each block runs once there.
  size_t i = 0;
  for (; i < seq.size() && seq[i].step != Step::bwd; ++i) {
    if (seq[i].block >= blocks) continue;  // the head runs once, where the model puts it
    graph::BlockMode mode = graph::BlockMode::recompute;
    if (seq[i].step == Step::fwd_keep) mode = graph::BlockMode::keep;
    if (seq[i].step == Step::fwd_keep_selective) mode = graph::BlockMode::selective;
    if (seq[i].step == Step::fwd_offload) mode = graph::BlockMode::offload;
    p.mode[static_cast<size_t>(seq[i].block)] = mode;
  }
  bool any_recompute = false;
  for (auto m : p.mode) any_recompute = any_recompute || m == graph::BlockMode::recompute;
  if (!any_recompute) return p;
  p.before_backward.assign(static_cast<size_t>(blocks), {});
  std::vector<graph::BlockPlan::Recompute> pending;
  for (; i < seq.size(); ++i) {
    if (seq[i].block >= blocks) continue;
    if (seq[i].step == Step::bwd) {
      p.before_backward[static_cast<size_t>(seq[i].block)] = std::move(pending);
      pending.clear();
    } else {
      pending.push_back({seq[i].block, seq[i].step == Step::fwd_keep});
    }
  }
  for (int b = 0; b < blocks; ++b) {
    p.segment[static_cast<size_t>(b)] = p.mode[static_cast<size_t>(b)] == graph::BlockMode::recompute ? b : -1;
  }
  return p;
}

void RotorDP::all_schedules(int s, int t, std::vector<std::vector<Op>>& out, bool selective, int head) {
  if (s == t) {
    out.push_back({{Step::fwd_keep, s}, {Step::bwd, s}});
    return;
  }
  std::vector<std::vector<Op>> rest;
  all_schedules(s + 1, t, rest, selective, head);
  for (const Step keep : {Step::fwd_keep, Step::fwd_keep_selective}) {
    if (keep == Step::fwd_keep_selective && !(selective && t == head)) continue;
    for (const auto& r : rest) {
      std::vector<Op> q{{keep, s}};
      q.insert(q.end(), r.begin(), r.end());
      q.push_back({Step::bwd, s});
      out.push_back(std::move(q));
    }
  }
  for (int k = s + 1; k <= t; ++k) {
    std::vector<std::vector<Op>> right, left;
    all_schedules(k, t, right, selective, head);
    all_schedules(s, k - 1, left, selective, head);
    for (const auto& r : right) {
      for (const auto& l : left) {
        std::vector<Op> q;
        for (int j = s; j < k; ++j) q.push_back({Step::fwd_ckpt, j});
        q.insert(q.end(), r.begin(), r.end());
        q.insert(q.end(), l.begin(), l.end());
        out.push_back(std::move(q));
      }
    }
  }
}

int64_t RotorDP::advances(int level) const {
  if (n_ == 0 || cost(level) >= kInfeasible) return -1;
  std::vector<Op> seq;
  sequence(0, n_ - 1, std::clamp(level, 0, levels_), seq);
  int64_t n = 0;
  for (const Op& o : seq) n += o.step == Step::fwd_ckpt;
  return n;
}

Chain measure_chain(const Scenario& s) {
  // Blocks are identical, so a three-block copy of the model measures the first, a middle and the
  // last block (the last one's backward lacks the residual accumulation); the chain repeats the
  // middle one. Costs come from the model's own ops either way.
  constexpr int64_t kProbeLayers = 3;
  if (s.model.n_layers > kProbeLayers) {
    Scenario probe = s;
    probe.model.n_layers = kProbeLayers;
    const Chain p = measure_chain(probe);
    Chain c;
    c.has_head = p.has_head;
    const int64_t L = s.model.n_layers;
    for (int64_t i = 0; i <= L; ++i) {
      const size_t k = i == 0 ? 0 : i == L - 1 ? 2 : i == L ? 3 : 1;  // 3 = the head
      c.forward_ns.push_back(p.forward_ns[k]);
      c.backward_ns.push_back(p.backward_ns[k]);
      c.forward_saved_ns.push_back(p.forward_saved_ns[k]);
      c.input_bytes.push_back(p.input_bytes[k]);
      c.activation_bytes.push_back(p.activation_bytes[k]);
      c.activation_selective_bytes.push_back(p.activation_selective_bytes[k]);
      c.backward_selective_ns.push_back(p.backward_selective_ns[k]);
      c.offload_penalty_ns.push_back(p.offload_penalty_ns[k]);
    }
    return c;
  }
  // Each measurement simulates the scenario's step under a fixed policy's plan (simulate_step: no
  // resolving, no planning).
  auto under = [&](graph::CheckpointPolicy::Kind kind) {
    graph::CheckpointPolicy p;
    p.kind = kind;
    return simulate_step(resolve(s, graph::block_plan(p, s.model.n_layers)));
  };
  Analysis a = under(graph::CheckpointPolicy::Kind::none);
  const graph::Graph& g = a.step->graph;
  const int64_t L = s.model.n_layers;
  Chain c;
  c.forward_ns.assign(static_cast<size_t>(L), 0);
  c.backward_ns.assign(static_cast<size_t>(L), 0);
  for (size_t i = 0; i < g.n_ops(); ++i) {
    const graph::Op& op = g.ops()[i];
    if (op.layer < 0 || op.phase == graph::Phase::optimizer) continue;
    auto& v = op.phase == graph::Phase::forward ? c.forward_ns : c.backward_ns;
    v[static_cast<size_t>(op.layer)] += a.tables->duration_ns(graph::OpId{static_cast<uint32_t>(i)});
  }
  // What a block recomputes for its own backward: the recompute ops of checkpointing every block.
  Analysis af = under(graph::CheckpointPolicy::Kind::full);
  c.forward_saved_ns.assign(static_cast<size_t>(L), 0);
  for (size_t i = 0; i < af.step->graph.n_ops(); ++i) {
    const graph::Op& op = af.step->graph.ops()[i];
    if (op.recompute && op.layer >= 0) {
      c.forward_saved_ns[static_cast<size_t>(op.layer)] += af.tables->duration_ns(graph::OpId{static_cast<uint32_t>(i)});
    }
  }
  const int64_t x = s.training.batch_size * s.model.seq_len * s.model.d_model * graph::dtype_size(s.training.dtype);
  c.input_bytes.assign(static_cast<size_t>(L), x);
  c.activation_bytes.resize(static_cast<size_t>(L));
  for (int64_t i = 0; i < L; ++i) c.activation_bytes[static_cast<size_t>(i)] = std::max<int64_t>(0, a.per_layer_saved[static_cast<size_t>(i)] - x);
  // Selective keeping: what each block keeps with its attention core recomputed, and the
  // backward time including that recompute.
  Analysis as = under(graph::CheckpointPolicy::Kind::selective);
  c.activation_selective_bytes.resize(static_cast<size_t>(L));
  c.backward_selective_ns.assign(static_cast<size_t>(L), 0);
  for (int64_t i = 0; i < L; ++i) {
    c.activation_selective_bytes[static_cast<size_t>(i)] = std::max<int64_t>(0, as.per_layer_saved[static_cast<size_t>(i)] - x);
  }
  for (size_t i = 0; i < as.step->graph.n_ops(); ++i) {
    const graph::Op& op = as.step->graph.ops()[i];
    if (op.layer >= 0 && op.phase == graph::Phase::backward) {
      c.backward_selective_ns[static_cast<size_t>(op.layer)] += as.tables->duration_ns(graph::OpId{static_cast<uint32_t>(i)});
    }
  }
  // Offload: the step time it adds, spread evenly over the blocks (copies overlap compute, so
  // this is an estimate; plans using it are simulated before they are chosen).
  const int64_t off_time = under(graph::CheckpointPolicy::Kind::offload).result.step_time_ns;
  c.offload_penalty_ns.assign(static_cast<size_t>(L), std::max<int64_t>(0, (off_time - a.result.step_time_ns) / std::max<int64_t>(1, L)));
  // The head: what the model keeps outside the blocks (embeddings aside, a constant), run once.
  c.has_head = true;
  c.forward_ns.push_back(0);
  c.backward_ns.push_back(0);
  c.forward_saved_ns.push_back(0);
  c.input_bytes.push_back(x);
  c.activation_bytes.push_back(a.outside_saved);
  c.activation_selective_bytes.push_back(a.outside_saved);
  c.backward_selective_ns.push_back(0);
  c.offload_penalty_ns.push_back(0);
  return c;
}

struct PlanShared;
PlanResult plan_for_budget_impl(const Scenario& s, int64_t budget, bool selective, bool offload, PlanShared& shared);
// The search on stage scenario `s`, its candidates simulated on `pipeline` when not null (issue 13).
PlanResult plan_for_budget(const Scenario& s, int64_t budget, const PlanOptions& options, const Scenario* pipeline);

constexpr int64_t kMaxRecomputePerBlock = 4;  // Note [Planner size]

namespace {
graph::CheckpointPolicy full_policy() {
  graph::CheckpointPolicy p;
  p.kind = graph::CheckpointPolicy::Kind::full;
  return p;
}
}  // namespace

// A simulated plan's figures.
struct PlanProbe {
  int64_t peak;
  int64_t time;
};
using Probe = PlanProbe;

namespace {

// The planner simulates a plan in one of two ways. A plan that may be the answer: the step lowered
// with plan `bp`, run by the engine, with the report's figures (kept: the answer's is what
// `actsim plan` prints).
std::shared_ptr<const Analysis> simulate_plan(const Scenario& s, const graph::BlockPlan& bp) {
  Scenario t = s;
  t.checkpoint = bp;
  // issue 13 (pprank): a pipeline's plan is verified on the whole pipeline (every stage's blocks
  // under it, the schedule replayed: the worst stage's peak with its micro-batches in flight).
  if (t.training.parallel.pp > 1 && !t.training.parallel.pp_stage()) return std::make_shared<const Analysis>(analyze(t));
  return std::make_shared<const Analysis>(simulate_step(resolve(t, bp), t));
}

// A plan that is the answer only when little else fits (the least-memory plans): its peak and step
// time alone (the same figures: the engine reads no names), lowered without names and freed at
// once by the thread that built it, whose next lowering reuses the memory.
PlanProbe simulate_figures(const Scenario& s, const graph::BlockPlan& bp) {
  if (s.training.parallel.pp > 1 && !s.training.parallel.pp_stage()) {  // issue 13: the replayed pipeline's
    const std::shared_ptr<const Analysis> a = simulate_plan(s, bp);
    return {a->result.peak_bytes, a->result.step_time_ns};
  }
  const SimResult r = simulate_step_result(resolve(s, bp), s);
  return {r.peak_bytes, r.step_time_ns};
}

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

PlanResult plan_for_budget(const Scenario& s, int64_t budget, const PlanOptions& options) {
  // issue 13 (pprank): a pipeline is planned on its worst stage (the highest peak under the
  // replayed schedule, without checkpointing): the chain is that stage's blocks, the plan covers
  // each stage's L/(pV) blocks (every stage runs it), and every candidate is verified by
  // simulating the whole pipeline with it, so the micro-batches in flight are counted.
  if (s.training.parallel.pp > 1 && !s.training.parallel.pp_stage()) {
    Scenario none = s;
    none.checkpoint = graph::CheckpointPolicy{};
    const Analysis base = analyze(none);
    const Pipeline& pl = *base.pipeline;
    Scenario stage = pl.kinds[static_cast<size_t>(pl.stage_kinds[static_cast<size_t>(pl.worst)][0])]->scenario;
    return plan_for_budget(stage, budget, options, &none);
  }
  return plan_for_budget(s, budget, options, nullptr);
}

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
