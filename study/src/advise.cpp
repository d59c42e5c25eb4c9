// The advisor (advise.hpp): candidates as scenario overrides, simulated in parallel, planned only
// where they do not fit, ranked by tokens per second.
#include "actsim/study/advise.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <atomic>
#include <map>
#include <numeric>
#include <optional>
#include <tuple>
#include <type_traits>

#include "actsim/sim/engine.hpp"
#include "actsim/study/analyze.hpp"
#include "actsim/study/planner.hpp"
#include "actsim/study/resolve.hpp"
#include "actsim/util/error.hpp"
#include "actsim/util/parallel.hpp"

namespace actsim::study {

// Note [Advisor axes]: each axis is a scenario key written as `--set` writes it, searched only when
// scenario_keys() has its key, so an axis built on a key that another part of actsim adds switches
// on by itself once that key exists. In order (the order of a candidate's overrides):
//   training.trainable   all (as the scenario has it) and lora, only with --allow lora;
//   training.autocast    none, bf16, fp16 (a value the scenario's profile rules out is dropped:
//                        the scenario loader refuses it, as it refuses flash attention on 1.13);
//   model.attention      eager, flash;
//   micro-batch          training.batch_size = b and training.grad_accum_steps = G / b for each
//                        divisor b of the global batch G (needs training.grad_accum_steps; without
//                        it, the scenario's batch size alone);
//   checkpoint.policy    none; the planner's plan for the budget (budget:BYTES, what `plan` and
//                        `simulate` compute from that policy) where none does not fit.
// The step time of a candidate is the simulated one: with accumulation, all micro-batches, the
// recomputations and the optimizer step; tokens/s = G x seq_len / step time.
//
// Note [Advisor pruning]: the search simulates every point without checkpointing first (one
// simulation each, in parallel). Checkpointing only adds recomputation to a step (the planner's
// plans keep, recompute or recompute selectively, never offload), so a planned candidate is never
// faster than its un-checkpointed simulation: that is an upper bound on its tokens/s. The planner
// (several simulations) runs only for points that do not fit without it, and only where that
// bound beats the top-th fastest candidate that fits without a plan; and, per setting of the other
// axes, the micro-batch sizes are planned smallest first and the search stops at the first size
// no plan fits (a larger micro-batch needs more memory: the batch search's assumption). Both
// prunings only skip candidates that cannot enter the ranking or cannot fit, so the ranking is
// the one of the full search. The threshold comes from the first stage alone: the answer does not
// depend on thread timing.

namespace {

// training.grad_accum_steps, once TrainingConfig has it (Note [Advisor axes]).
template <typename T>
int64_t accum_steps_of(const T& t) {
  if constexpr (requires { t.grad_accum_steps; }) {
    return static_cast<int64_t>(t.grad_accum_steps);
  } else {
    return 1;
  }
}

// training.autocast as --set writes it, once TrainingConfig has it (a DType; f32 means none).
template <typename T>
std::optional<std::string> autocast_of(const T& t) {
  if constexpr (requires { t.autocast; }) {
    if constexpr (std::is_same_v<std::remove_cvref_t<decltype(t.autocast)>, graph::DType>) {
      switch (t.autocast) {
        case graph::DType::f32: return "none";
        case graph::DType::bf16: return "bf16";
        case graph::DType::f16: return "fp16";
        default: break;
      }
    }
  }
  return std::nullopt;
}

bool has_key(const std::vector<std::string>& keys, const std::string& k) {
  return std::find(keys.begin(), keys.end(), k) != keys.end();
}

// The value a key has in `base`, as `--set` writes it; nullopt for a key this file cannot read
// (then an override of it counts as a change unless the key is unset and the value its default).
std::optional<std::string> base_value(const Scenario& base, const std::string& key) {
  if (key == "checkpoint.policy") return base.checkpoint_text();
  if (key == "model.attention") return std::string(graph::to_string(base.model.attention));
  if (key == "training.batch_size") return std::to_string(base.training.batch_size);
  if (key == "training.grad_accum_steps") return std::to_string(accum_steps_of(base.training));
  if (key == "training.autocast") {
    if (std::optional<std::string> v = autocast_of(base.training)) return v;
  }
  static const std::map<std::string, std::string> defaults{{"training.autocast", "none"},
                                                           {"training.trainable", "all"}};
  auto it = defaults.find(key);
  if (it != defaults.end() && base.origin.count(key) == 0) return it->second;
  return std::nullopt;
}

std::vector<std::string> changes_of(const Scenario& base, const std::vector<std::string>& overrides) {
  std::vector<std::string> out;
  for (const std::string& o : overrides) {
    const size_t eq = o.find('=');
    const std::optional<std::string> v = base_value(base, o.substr(0, eq));
    if (!v || *v != o.substr(eq + 1)) out.push_back(o);
  }
  return out;
}

double tokens_per_second(int64_t global, int64_t seq_len, int64_t step_ns) {
  return step_ns > 0 ? static_cast<double>(global) * static_cast<double>(seq_len) * 1e9 / static_cast<double>(step_ns)
                     : 0.0;
}

// One point of the cross product before the checkpoint axis.
struct Point {
  std::vector<std::string> overrides;  // without checkpoint.policy
  int64_t group = 0;                   // the setting of the axes other than the micro-batch
  int64_t micro_batch = 1, accum_steps = 1;
};

// Ranking order: faster first; then the smaller peak, the fewer changes, the earlier point.
bool ranks_before(const AdviseCandidate& a, const AdviseCandidate& b) {
  if (a.tokens_per_second != b.tokens_per_second) return a.tokens_per_second > b.tokens_per_second;
  if (a.peak_bytes != b.peak_bytes) return a.peak_bytes < b.peak_bytes;
  return a.changes.size() < b.changes.size();
}

}  // namespace

std::vector<int64_t> divisors(int64_t n) {
  std::vector<int64_t> lo, hi;
  for (int64_t d = 1; d <= n / d; ++d) {
    if (n % d != 0) continue;
    lo.push_back(d);
    if (d != n / d) hi.push_back(n / d);
  }
  lo.insert(lo.end(), hi.rbegin(), hi.rend());
  return lo;
}

int64_t global_batch(const Scenario& s) { return s.training.batch_size * accum_steps_of(s.training); }

std::string budget_policy_text(int64_t bytes) {
  for (auto [unit, name] : {std::pair<int64_t, const char*>{int64_t{1} << 30, "GiB"}, {int64_t{1} << 20, "MiB"},
                            {int64_t{1} << 10, "KiB"}}) {
    if (bytes % unit == 0) return fmt::format("budget:{}{}", bytes / unit, name);
  }
  return fmt::format("budget:{}", bytes);
}

AdviseHooks default_advise_hooks() {
  AdviseHooks h;
  h.keys = scenario_keys();
  h.apply = [](Scenario& s, const std::vector<std::string>& o) { apply_overrides(s, o); };
  h.simulate = [](const Scenario& s) {
    AdviseHooks::Probe p;
    const ResolvedStep step = resolve(s);
    if (std::optional<sim::SimResult> r = try_simulate_step(step)) {
      p.ok = true;
      p.peak_bytes = r->peak_bytes;
      p.step_time_ns = r->step_time_ns;
    }
    p.plan = s.checkpoint_text();
    return p;
  };
  h.plan = [](const Scenario& s, int64_t budget) {
    AdviseHooks::Probe p;
    try {
      const PlanResult r = plan_for_budget(s, budget);
      p = {.ok = true, .fits = r.fits, .peak_bytes = r.peak_bytes, .step_time_ns = r.step_time_ns,
           .plan = r.plan.describe()};
    } catch (const sim::ByteOverflow&) {
      // Totals beyond int64: no plan makes such a step fit.
    }
    return p;
  };
  return h;
}

AdviseResult advise(const Scenario& s, const AdviseOptions& options) { return advise(s, options, default_advise_hooks()); }

AdviseResult advise(const Scenario& s, const AdviseOptions& options, const AdviseHooks& hooks) {
  AdviseResult res;
  res.budget_bytes = options.budget_bytes > 0 ? options.budget_bytes : s.device.memory_bytes;
  res.global_batch = global_batch(s);
  res.seq_len = s.model.seq_len;
  const int threads = options.threads > 0 ? options.threads : util::hardware_threads();
  const int64_t top = std::max<int64_t>(options.top, 1);
  const int64_t budget = res.budget_bytes;
  const auto& keys = hooks.keys;

  // The axes (Note [Advisor axes]); an empty override keeps the scenario's own value.
  using Choice = std::vector<std::string>;  // the overrides of one value of an axis
  std::vector<std::vector<Choice>> axes;
  if (options.allow_lora) {
    if (!has_key(keys, "training.trainable")) {
      throw InputError("--allow lora: this build has no training.trainable key (LoRA is not simulated yet)");
    }
    axes.push_back({{}, {"training.trainable=lora"}});
    res.axes.push_back({"training.trainable", {base_value(s, "training.trainable").value_or("as given"), "lora"}});
  }
  if (has_key(keys, "training.autocast")) {
    axes.push_back({{"training.autocast=none"}, {"training.autocast=bf16"}, {"training.autocast=fp16"}});
    res.axes.push_back({"training.autocast", {"none", "bf16", "fp16"}});
  }
  if (has_key(keys, "model.attention")) {
    axes.push_back({{"model.attention=eager"}, {"model.attention=flash"}});
    res.axes.push_back({"model.attention", {"eager", "flash"}});
  }
  std::vector<int64_t> micro{s.training.batch_size};
  const bool accum_axis = has_key(keys, "training.grad_accum_steps");
  if (accum_axis) micro = divisors(res.global_batch);
  {
    AdviseAxis a{"micro-batch", {}};
    for (int64_t b : micro) a.values.push_back(fmt::format("{}x{}", b, res.global_batch / b));
    res.axes.push_back(std::move(a));
  }
  res.axes.push_back({"checkpoint.policy", {"none", budget_policy_text(budget)}});

  // The cross product, the micro-batch varying fastest; points the scenario rules out are dropped.
  std::vector<Point> points;
  std::vector<Scenario> scenarios;
  int64_t groups = 1;
  for (const auto& a : axes) groups *= static_cast<int64_t>(a.size());
  for (int64_t g = 0; g < groups; ++g) {
    Choice common;
    int64_t rest = g;
    std::vector<size_t> pick(axes.size());
    for (size_t i = axes.size(); i-- > 0;) {
      pick[i] = static_cast<size_t>(rest % static_cast<int64_t>(axes[i].size()));
      rest /= static_cast<int64_t>(axes[i].size());
    }
    for (size_t i = 0; i < axes.size(); ++i) common.insert(common.end(), axes[i][pick[i]].begin(), axes[i][pick[i]].end());
    for (int64_t b : micro) {
      Point p{common, g, b, res.global_batch / b};
      if (accum_axis) {
        p.overrides.push_back(fmt::format("training.batch_size={}", b));
        p.overrides.push_back(fmt::format("training.grad_accum_steps={}", res.global_batch / b));
      }
      Scenario t = s;
      std::vector<std::string> all = p.overrides;
      all.push_back("checkpoint.policy=none");
      try {
        hooks.apply(t, all);
      } catch (const InputError&) {
        continue;  // the profile rules this value out (flash on PyTorch 1.13, fp16 autocast, ...)
      }
      points.push_back(std::move(p));
      scenarios.push_back(std::move(t));
    }
  }
  res.candidates = static_cast<int64_t>(points.size());

  auto candidate = [&](const Point& p, const std::string& policy) {
    AdviseCandidate c;
    c.overrides = p.overrides;
    c.overrides.push_back("checkpoint.policy=" + policy);
    c.changes = changes_of(s, c.overrides);
    c.micro_batch = p.micro_batch;
    c.accum_steps = p.accum_steps;
    return c;
  };
  auto fill = [&](AdviseCandidate& c, const AdviseHooks::Probe& r) {
    c.simulated = r.ok;
    c.peak_bytes = r.peak_bytes;
    c.step_time_ns = r.step_time_ns;
    c.tokens_per_second = r.ok ? tokens_per_second(res.global_batch, res.seq_len, r.step_time_ns) : 0;
  };

  std::atomic<int64_t> done{0};
  int64_t estimate = static_cast<int64_t>(points.size()) + 1;
  auto tick = [&] {
    if (options.progress) options.progress(done.load(), std::max(estimate, done.load()));
  };

  // Stage 1: every point without checkpointing, and the scenario as given unless a point is it
  // (no changes: the scenario's own values and checkpoint.policy none).
  std::optional<size_t> given_point;
  for (size_t k = 0; k < points.size() && !given_point; ++k) {
    if (candidate(points[k], "none").changes.empty()) given_point = k;
  }
  std::vector<AdviseCandidate> plain(points.size());
  std::vector<char> refused(points.size(), 0);
  const int64_t jobs = static_cast<int64_t>(points.size()) + (given_point ? 0 : 1);
  util::parallel_for(jobs, threads, [&](int64_t i) {
    if (i == static_cast<int64_t>(points.size())) {
      const AdviseHooks::Probe r = hooks.simulate(s);
      AdviseCandidate& c = res.as_given;
      c.plan = r.plan;
      fill(c, r);
    } else {
      const size_t k = static_cast<size_t>(i);
      AdviseCandidate c = candidate(points[k], "none");
      AdviseHooks::Probe r;
      try {
        r = hooks.simulate(scenarios[k]);
      } catch (const InputError&) {
        // A combination that only the lowering refuses (not the scenario loader): ruled out as
        // the loader's refusals are. The scenario as given is simulated apart, and its errors stop.
        refused[k] = 1;
      }
      c.plan = "none";
      fill(c, r);
      c.fits = r.ok && r.peak_bytes <= budget;
      plain[k] = std::move(c);
    }
    ++done;
  }, tick);
  res.simulations = jobs;
  res.candidates -= std::count(refused.begin(), refused.end(), 1);
  if (given_point && refused[*given_point]) {
    // The scenario itself is refused: say so with its own error.
    (void)hooks.simulate(s);
  }
  if (given_point) {
    res.as_given = plain[*given_point];
    res.as_given.overrides.clear();
    res.as_given.changes.clear();
  }
  {
    AdviseCandidate& c = res.as_given;
    c.micro_batch = s.training.batch_size;
    c.accum_steps = accum_steps_of(s.training);
    c.checkpointed = s.is_budget();
    c.fits = c.simulated && c.peak_bytes <= budget;
  }

  std::vector<AdviseCandidate> fitting;
  for (const AdviseCandidate& c : plain) {
    if (c.fits) fitting.push_back(c);
  }
  std::sort(fitting.begin(), fitting.end(), ranks_before);
  // The top-th fastest that fits without a plan: a planned candidate must beat it to be ranked.
  const double threshold =
      static_cast<int64_t>(fitting.size()) >= top ? fitting[static_cast<size_t>(top - 1)].tokens_per_second : 0.0;

  // Stage 2: per group, the points that do not fit, planned smallest micro-batch first.
  std::vector<std::vector<size_t>> by_group(static_cast<size_t>(groups));
  for (size_t k = 0; k < points.size(); ++k) {
    const AdviseCandidate& c = plain[k];
    if (!c.fits && c.simulated) by_group[static_cast<size_t>(points[k].group)].push_back(k);
  }
  std::vector<size_t> busy;
  for (size_t g = 0; g < by_group.size(); ++g) {
    if (!by_group[g].empty()) busy.push_back(g);
  }
  estimate = res.simulations;
  for (size_t g : busy) estimate += static_cast<int64_t>(by_group[g].size());
  std::vector<std::vector<AdviseCandidate>> planned(busy.size());
  std::vector<int64_t> plans(busy.size(), 0), pruned(busy.size(), 0);
  const std::string policy = budget_policy_text(budget);
  util::parallel_for(static_cast<int64_t>(busy.size()), threads, [&](int64_t i) {
    const auto& list = by_group[busy[static_cast<size_t>(i)]];
    bool stop = false;
    for (size_t k : list) {
      if (stop || plain[k].tokens_per_second < threshold) {
        ++pruned[static_cast<size_t>(i)];
        ++done;
        continue;
      }
      const AdviseHooks::Probe r = hooks.plan(scenarios[k], budget);
      ++plans[static_cast<size_t>(i)];
      ++done;
      AdviseCandidate c = candidate(points[k], policy);
      c.checkpointed = true;
      c.plan = r.plan;
      fill(c, r);
      c.fits = r.ok && r.fits && r.peak_bytes <= budget;
      stop = !c.fits;  // a larger micro-batch needs more memory still
      planned[static_cast<size_t>(i)].push_back(std::move(c));
    }
  }, tick);
  for (size_t i = 0; i < busy.size(); ++i) {
    res.plans += plans[i];
    res.pruned += pruned[i];
    for (AdviseCandidate& c : planned[i]) {
      if (c.fits) fitting.push_back(c);
    }
  }
  res.fitting = static_cast<int64_t>(fitting.size());

  std::stable_sort(fitting.begin(), fitting.end(), ranks_before);
  // Two points that simulate alike (a LoRA scenario asked for LoRA again) are one candidate: the
  // one with fewer changes, which ranks first.
  for (const AdviseCandidate& c : fitting) {
    if (static_cast<int64_t>(res.ranked.size()) >= top) break;
    const bool same = std::any_of(res.ranked.begin(), res.ranked.end(), [&](const AdviseCandidate& r) {
      return std::tie(r.peak_bytes, r.step_time_ns, r.micro_batch, r.checkpointed) ==
             std::tie(c.peak_bytes, c.step_time_ns, c.micro_batch, c.checkpointed);
    });
    if (!same) res.ranked.push_back(c);
  }
  if (res.ranked.empty()) {
    // Nothing fits: the least peak seen, planned or not.
    const AdviseCandidate* least = nullptr;
    auto consider = [&](const AdviseCandidate& c) {
      if (c.simulated && (!least || c.peak_bytes < least->peak_bytes)) least = &c;
    };
    for (const AdviseCandidate& c : plain) consider(c);
    for (const auto& list : planned) {
      for (const AdviseCandidate& c : list) consider(c);
    }
    if (least) res.least_peak = *least;
  }
  if (options.progress) options.progress(done.load(), done.load());
  return res;
}

}  // namespace actsim::study
