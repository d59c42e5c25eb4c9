// The planner's dynamic program (rotor) and the chain it plans over, measured from the model's own
// ops. The search that simulates its plans: planner_search.cpp; the entry: planner_pipeline.cpp.
#include "actsim/study/planner.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>

#include "actsim/util/error.hpp"
#include "actsim/graph/profile.hpp"

namespace actsim::study {

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

}  // namespace actsim::study
