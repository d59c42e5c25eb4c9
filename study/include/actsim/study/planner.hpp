// actsim::study planner — the fastest checkpointing plan whose simulated peak fits a memory budget.
//
//   Scenario s = load_scenario("scenarios/llama-3-8b.toml", {});
//   PlanResult r = plan_for_budget(s, 60LL << 30);
//   r.fits; r.plan.before_backward;      // per block: what is recomputed, when
//
// The plan space is the one of rotor (Beaumont et al. 2019, "Optimal checkpointing for
// heterogeneous chains"): over the chain of transformer blocks, each block's forward either keeps
// its activations for its backward (F_all) or keeps only its output as a checkpoint, and segments
// are recomputed, possibly in a nested way (Revolve's binomial schedules are the homogeneous case).
// A dynamic program over (first block, last block, memory) minimises the time of the recomputed
// forward ops, which the engine adds exactly (one stream); per-block costs come from simulating
// the model's own ops (op granularity). The memory model is calibrated against the simulator and
// every returned plan is simulated: its peak never exceeds the budget.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

#include "actsim/graph/checkpoint.hpp"
#include "actsim/study/analyze.hpp"
#include "actsim/study/scenario.hpp"

namespace actsim::study {

// One chain of blocks for the DP: per block forward/backward time, checkpoint (input) bytes and
// the bytes its kept activations add beyond its input.
struct Chain {
  std::vector<int64_t> forward_ns, backward_ns, input_bytes, activation_bytes;  // [n]
  // Forward time of only the ops that feed the block's saved tensors: what a recomputation right
  // before the block's backward runs (the block's output is not needed then). [n]; empty = forward_ns.
  std::vector<int64_t> forward_saved_ns;
  // Keeping a block selectively (Megatron-LM: the attention core is recomputed in its backward):
  // the bytes it then keeps beyond its input, and its backward time with that recompute. [n];
  // empty = no selective option.
  std::vector<int64_t> activation_selective_bytes, backward_selective_ns;
  // Offloading a block's saved activations to host memory: the extra step time it costs (copies
  // the compute does not hide, measured with the offload policy). [n]; empty = no offload option.
  std::vector<int64_t> offload_penalty_ns;
  // The last element is the model's head (final norm, logits, loss): it runs once, between the
  // last block's forward and its backward, and is never a recompute choice; plans leave it out.
  bool has_head = false;
  size_t size() const { return forward_ns.size(); }
};

// The rotor dynamic program over `chain` with memory in `levels` units of `unit` bytes.
class RotorDP {
 public:
  RotorDP(const Chain& chain, int64_t unit, int levels);
  static constexpr int64_t kInfeasible = INT64_MAX / 4;
  // Chains of more blocks are planned as homogeneous (Note [Planner size] in planner.cpp).
  static constexpr int kExactBlocks = 128;
  // Least total time (forwards, recomputations and backwards) with `level` memory units free for
  // checkpoints and kept activations; kInfeasible if none.
  int64_t cost(int level) const;
  // The schedule reaching cost(level), as a block plan (initial forward modes + recomputations).
  graph::BlockPlan plan(int level) const;
  // Forward evaluations that keep nothing for backward (Revolve's "advances") in plan(level).
  int64_t advances(int level) const;
  int levels() const { return levels_; }

  // A schedule as rotor writes it: forward keeping activations (F_all), forward keeping only the
  // output (F_ck / advance), backward.
  enum class Step : uint8_t { fwd_keep, fwd_ckpt, bwd, fwd_keep_selective, fwd_offload };
  struct Op {
    Step step;
    int32_t block;
  };
  // The block plan of a schedule over `blocks` blocks (ops on block >= blocks, the head, dropped).
  static graph::BlockPlan to_plan(const std::vector<Op>& seq, int blocks);
  // Every schedule of the chain s..t (all choices at every step), for exhaustive search; with
  // `selective`, blocks on the forward pass (chains ending at `head`) may also be kept selectively.
  static void all_schedules(int s, int t, std::vector<std::vector<Op>>& out, bool selective = false, int head = -1);

 private:
  void sequence(int s, int t, int m, std::vector<Op>& out) const;
  // Identical blocks make C depend on the chain's length only (and on whether it ends with the
  // head): O(n^2 m) instead of O(n^3 m).
  size_t key(int s, int t) const {
    if (!homogeneous_) return static_cast<size_t>(s) * n_ + static_cast<size_t>(t);
    return (has_head_ && t == n_ - 1) ? static_cast<size_t>(n_ + (t - s)) : static_cast<size_t>(t - s);
  }
  size_t at(int s, int t, int m) const { return key(s, t) * static_cast<size_t>(levels_ + 1) + m; }
  bool homogeneous_ = false;
  int n_, levels_;
  bool has_head_;
  std::vector<int64_t> c_;      // [s][t][m] least time
  std::vector<int32_t> choice_; // [key(s,t)][m]: -1 = keep s (F_all), -3 = keep s selectively,
                                // d > 0 = checkpoint at s + d
  std::vector<int32_t> in_, act_, act_sel_;  // units
  std::vector<int64_t> bwd_sel_, off_pen_;
  std::vector<int64_t> fwd_prefix_;
  std::vector<int64_t> fwd_saved_, bwd_;
};

struct PlanResult {
  bool fits = false;                 // a plan with peak <= budget exists
  int64_t budget_bytes = 0;
  graph::BlockPlan plan;             // the chosen plan (the least-memory plan when nothing fits)
  int64_t peak_bytes = 0;            // its simulated peak
  int64_t step_time_ns = 0;          // its simulated step time
  int64_t baseline_peak_bytes = 0;   // no checkpointing
  int64_t baseline_step_time_ns = 0;
  int64_t min_peak_bytes = 0;        // the least peak any plan reaches
  int64_t dp_ns = 0;                 // time spent in the dynamic program (wall clock)
  int64_t simulations = 0;           // plans simulated to choose
  // The chosen plan's analysis when the search kept it (it simulates that plan anyway): what
  // `analyze` of the scenario with this plan returns. Null when it was not kept.
  std::shared_ptr<const Analysis> analysis;
};

// The fastest plan whose simulated peak is at most `budget` (a larger budget never gives a slower
// plan: the plan is the DP's optimum at the largest memory level whose plan fits, and the levels'
// plans get faster as the level grows).
struct PlanOptions {
  // Let blocks on the forward pass be kept selectively (Megatron-LM's attention-core recompute,
  // an op-level choice inside the block). The DP's memory model is exact for keep/recompute plans
  // only; the answer is still simulated and within the budget, and never slower than without it.
  bool selective = true;
  // Let blocks on the forward pass offload their saved activations (copy stream). Its time is
  // estimated in the DP; the answer is simulated and taken only when faster. Off by default: with
  // it, a larger budget is no longer guaranteed to give a plan at least as fast.
  bool offload = false;
  // Called after each simulation the search runs, with the count so far and an estimate of the
  // total (the count can pass the estimate; callers clamp).
  std::function<void(int64_t done, int64_t estimate)> progress;
};
PlanResult plan_for_budget(const Scenario& s, int64_t budget, const PlanOptions& options = {});

// The chain of a scenario's blocks, measured by simulating it without checkpointing.
Chain measure_chain(const Scenario& s);

}  // namespace actsim::study
