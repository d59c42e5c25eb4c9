// actsim::study advisor — the fastest way to train a scenario's model on its device: a search over
// checkpoint plans, autocast, the attention implementation, the micro-batch size (with gradient
// accumulation keeping the global batch) and, when allowed, LoRA; ranked by simulated tokens/s.
//
//   Scenario s = load_scenario("scenarios/seed-gpt2-xl.toml", {});
//   AdviseResult r = advise(s, {.budget_bytes = 40LL << 30});
//   r.ranked[0].changes;                 // {"model.attention=flash", "training.autocast=bf16"}
//   r.ranked[0].tokens_per_second;       // global batch x seq_len / simulated step time
//
// Every axis is a scenario key set with the same "KEY=VALUE" strings `--set` takes, and an axis is
// searched only when its key is one of scenario_keys() (Note [Advisor axes] in advise.cpp): pasting
// a candidate's `changes` into `actsim simulate --set` reproduces its peak and step time.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "actsim/study/scenario.hpp"

namespace actsim::study {

struct AdviseOptions {
  int64_t budget_bytes = 0;   // a candidate fits when its simulated peak is at most this; 0 = the device's memory
  bool allow_lora = false;    // also try training.trainable=lora (the scenario's lora.* keys, or their defaults)
  int threads = 0;            // worker threads; 0 = util::hardware_threads()
  int64_t top = 10;           // how many fitting candidates to rank
  // Called on the calling thread about every 100 ms: simulations done, an estimate of the total.
  std::function<void(int64_t done, int64_t estimate)> progress;
};

// One searched axis: the scenario key(s) and the values tried, as `--set` writes them.
struct AdviseAxis {
  std::string name;                  // "model.attention", "checkpoint.policy", "micro-batch", ...
  std::vector<std::string> values;   // "eager", "flash"; for the micro-batch "4x2" (size x accumulation)
};

// One point of the search, simulated.
struct AdviseCandidate {
  std::vector<std::string> overrides;  // every KEY=VALUE that makes it (applied to the scenario)
  std::vector<std::string> changes;    // the overrides whose value differs from the scenario's
  int64_t micro_batch = 1;             // training.batch_size
  int64_t accum_steps = 1;             // training.grad_accum_steps
  bool checkpointed = false;           // a planner's budget plan (checkpoint.policy=budget:...)
  std::string plan;                    // the plan's description ("none", "40 kept, 8 recomputed")
  bool simulated = false;              // false: the scenario rules it out, or its totals overflow
  bool fits = false;                   // simulated and peak_bytes <= the budget
  int64_t peak_bytes = 0;
  int64_t step_time_ns = 0;            // all micro-batches, recomputations and the optimizer step
  double tokens_per_second = 0;        // global batch x seq_len / step time
};

struct AdviseResult {
  int64_t budget_bytes = 0;
  int64_t global_batch = 1;            // training.batch_size x training.grad_accum_steps of the scenario
  int64_t seq_len = 0;
  std::vector<AdviseAxis> axes;        // what was searched, in the order of Note [Advisor axes]
  AdviseCandidate as_given;            // the scenario as it is (its own checkpoint policy)
  std::vector<AdviseCandidate> ranked; // the fastest fitting candidates, fastest first (at most `top`)
  int64_t candidates = 0;              // points of the search (the checkpoint axis counted once)
  int64_t fitting = 0;                 // of them, those found to fit (with or without a plan)
  int64_t simulations = 0;             // un-checkpointed simulations run
  int64_t plans = 0;                   // planner searches run
  int64_t pruned = 0;                  // planner searches skipped (Note [Advisor pruning])
  // When nothing fits: the candidate with the least peak seen (its figures say how far off it is).
  AdviseCandidate least_peak;
};

// What the search asks of the simulator; advise() fills these with the real ones (apply_overrides,
// simulate_step, plan_for_budget). Tests replace them to check the ranking and the pruning.
struct AdviseHooks {
  std::vector<std::string> keys;       // the scenario keys there are (scenario_keys())
  // Applies overrides to a copy of the scenario; throws InputError when the scenario rules them out.
  std::function<void(Scenario&, const std::vector<std::string>&)> apply;
  struct Probe {
    bool ok = false;                   // false: the totals overflow int64 (does not fit)
    bool fits = false;                 // the planner found a plan within the budget (plan only)
    int64_t peak_bytes = 0, step_time_ns = 0;
    std::string plan;                  // the plan's description (plan only)
  };
  std::function<Probe(const Scenario&)> simulate;                  // the scenario as it is
  std::function<Probe(const Scenario&, int64_t budget)> plan;      // the planner's budget plan
};
AdviseHooks default_advise_hooks();

// Searches, simulates and ranks (Note [Advisor pruning]). Throws InputError for a bad option only.
AdviseResult advise(const Scenario& s, const AdviseOptions& options);
AdviseResult advise(const Scenario& s, const AdviseOptions& options, const AdviseHooks& hooks);

// The positive divisors of n, ascending: the micro-batch sizes that keep a global batch of n.
std::vector<int64_t> divisors(int64_t n);

// The global batch of a scenario: training.batch_size x training.grad_accum_steps (1 without the key).
int64_t global_batch(const Scenario& s);

// "budget:80GiB": a checkpoint.policy value that names `bytes` exactly (GiB, MiB, KiB or bytes).
std::string budget_policy_text(int64_t bytes);

}  // namespace actsim::study
