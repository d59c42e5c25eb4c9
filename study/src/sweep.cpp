// A sweep: the cross product of --vary values, validated up front, simulated in parallel, with
// rows that differ only in the batch size scaled from one model (batch_scaling.hpp).
#include "actsim/study/sweep.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <atomic>
#include <map>
#include <numeric>

#include "actsim/study/analyze.hpp"
#include "actsim/util/error.hpp"
#include "actsim/util/parallel.hpp"
#include "batch_scaling.hpp"

namespace actsim::study {

namespace {

// The axis to blame for a run that is bad input, found by applying its values one axis at a time
// (no error message is read): the first axis whose value, on top of the base and the values of
// the axes before it, makes the scenario invalid. A value bad on its own is blamed on its own
// axis whatever the message names; a bad combination on the axis that completes it.
size_t first_failing_axis(const Scenario& base, const std::vector<std::string>& sets) {
  Scenario t = base;
  for (size_t k = 0; k < sets.size(); ++k) {
    try {
      apply_overrides(t, {sets[k]});
      (void)resolve(t);
    } catch (const InputError&) {
      return k;
    }
  }
  return sets.size() - 1;  // not reached: the whole run failed, so its last prefix does
}

}  // namespace

std::vector<SweepRow> run_sweep(const Scenario& base, const std::vector<SweepAxis>& axes, const SweepOptions& opts,
                                SweepStats* stats) {
  ACTSIM_ASSERT(opts.threads >= 1, "run_sweep needs at least one thread");
  ACTSIM_ASSERT(!axes.empty(), "run_sweep needs at least one axis");
  for (size_t i = 0; i < axes.size(); ++i) {
    for (size_t j = 0; j < i; ++j) {
      if (axes[j].key == axes[i].key) axes[i].fail(fmt::format("{} is already varied by --vary {}", axes[i].key, axes[j].text));
    }
  }
  int64_t total = 1;
  for (const SweepAxis& ax : axes) {
    ACTSIM_ASSERT(!ax.values.empty(), "an axis without values");
    total *= static_cast<int64_t>(ax.values.size());
    if (total > kMaxSweepRuns) ax.fail(fmt::format("the cross product has more than {} runs", kMaxSweepRuns));
  }

  // Every combination is applied and validated before anything runs: bad input never leaves half
  // a sweep behind.
  std::vector<SweepRow> rows(static_cast<size_t>(total));
  std::vector<Scenario> scen(static_cast<size_t>(total));
  for (int64_t r = 0; r < total; ++r) {
    SweepRow& row = rows[static_cast<size_t>(r)];
    row.values.resize(axes.size());
    std::vector<std::string> sets;
    int64_t rest = r;
    for (size_t k = axes.size(); k-- > 0;) {
      const auto n = static_cast<int64_t>(axes[k].values.size());
      row.values[k] = axes[k].values[static_cast<size_t>(rest % n)];
      rest /= n;
    }
    for (size_t k = 0; k < axes.size(); ++k) sets.push_back(axes[k].key + "=" + row.values[k]);
    Scenario s = base;
    try {
      apply_overrides(s, sets);
      (void)resolve(s);
    } catch (const InputError& e) {
      std::string msg = e.what();
      const std::string set_prefix = "--set: ";  // the origin of every value a sweep applies
      if (msg.rfind(set_prefix, 0) == 0) msg = msg.substr(set_prefix.size());
      if (axes.size() > 1) msg += fmt::format(" (in the run {})", fmt::join(sets, ", "));
      axes[first_failing_axis(base, sets)].fail(msg);
    }
    scen[static_cast<size_t>(r)] = std::move(s);
  }

  // Groups of rows that differ only in batch size and device (Note [Batch scaling]).
  std::map<std::string, std::vector<int64_t>> groups;
  for (int64_t r = 0; r < total; ++r) {
    std::string key;
    for (size_t k = 0; k < axes.size(); ++k) {
      if (axes[k].key == "training.batch_size" || axes[k].key == "device.name") continue;
      key += rows[static_cast<size_t>(r)].values[k] + '\x1f';
    }
    groups[key].push_back(r);
  }
  struct Group {
    std::vector<int64_t> rows;               // rows analyzed in full, or scaled
    std::vector<int64_t> scaled;             // rows for the model (batch >= lo)
    int64_t ref_index = -1;                  // first of its three references
    BatchModel model;
  };
  std::vector<Group> gs;
  std::vector<Scenario> ref_scen;
  std::vector<int64_t> direct;               // rows analyzed in full
  for (auto& [key, members] : groups) {
    std::vector<int64_t> batches;
    for (int64_t r : members) {
      if (scen[static_cast<size_t>(r)].training.batch_size >= 2) batches.push_back(scen[static_cast<size_t>(r)].training.batch_size);
    }
    std::sort(batches.begin(), batches.end());
    const int64_t n_big = static_cast<int64_t>(batches.size());
    batches.erase(std::unique(batches.begin(), batches.end()), batches.end());
    // Offload runs a copy stream: its event order depends on the durations (no model holds).
    const graph::BlockPlan bp = resolve(scen[static_cast<size_t>(members.front())]).plan;
    const bool multi_stream = std::find(bp.mode.begin(), bp.mode.end(), graph::BlockMode::offload) != bp.mode.end();
    // A pipeline (issue 13) is its stages' replay: no batch model, every row analyzed in full.
    const bool pipeline = scen[static_cast<size_t>(members.front())].training.parallel.pp > 1;
    if (multi_stream || pipeline || batches.size() < 3 || n_big < 4) {
      direct.insert(direct.end(), members.begin(), members.end());
      continue;
    }
    Group g;
    g.ref_index = static_cast<int64_t>(ref_scen.size());
    int64_t any = -1;
    for (int64_t r : members) {
      if (scen[static_cast<size_t>(r)].training.batch_size >= 2) {
        g.scaled.push_back(r);
        if (any < 0) any = r;
      } else {
        direct.push_back(r);
      }
    }
    for (int64_t b : {batches[0], batches[1], batches.back()}) {
      Scenario s = scen[static_cast<size_t>(any)];
      s.training.batch_size = b;
      ref_scen.push_back(std::move(s));
    }
    gs.push_back(std::move(g));
  }

  std::atomic<int64_t> done{0};
  auto tick = [&] {
    if (opts.progress) opts.progress(done.load(), total);
  };
  auto finish = [&](int64_t r, int64_t peak, int64_t time, int64_t saved) {
    SweepRow& row = rows[static_cast<size_t>(r)];
    row.peak_bytes = peak;
    row.step_time_ns = time;
    row.saved_bytes = saved;
    row.fits = peak <= scen[static_cast<size_t>(r)].device.memory_bytes;
    ++done;
  };
  auto analyze_row = [&](int64_t r) {
    Analysis a = analyze(scen[static_cast<size_t>(r)]);
    finish(r, a.result.peak_bytes, a.result.step_time_ns, a.saved_bytes);
  };
  std::atomic<int64_t> n_analyzed{0}, n_scaled{0};

  // 1. References and rows analyzed in full. References first: they are the larger graphs.
  std::vector<Reference> refs(ref_scen.size());
  const auto n_refs = static_cast<int64_t>(ref_scen.size());
  util::parallel_for(n_refs + static_cast<int64_t>(direct.size()), opts.threads, [&](int64_t i) {
    ++n_analyzed;
    if (i < n_refs) refs[static_cast<size_t>(i)] = analyze_reference(ref_scen[static_cast<size_t>(i)]);
    else analyze_row(direct[static_cast<size_t>(i - n_refs)]);
  }, tick);

  // 2. Each group's model, checked against its references.
  util::parallel_for(static_cast<int64_t>(gs.size()), opts.threads, [&](int64_t i) {
    Group& g = gs[static_cast<size_t>(i)];
    const auto k = static_cast<size_t>(g.ref_index);
    g.model = build_model(refs[k], refs[k + 1], refs[k + 2]);
  }, tick);
  refs.clear();

  // 3. Rows: from a model in chunks, or (where a model does not hold) analyzed in full.
  struct Job {
    int64_t group;                           // -1: analyze row `first` in full
    int64_t first, count;                    // into Group::scaled
  };
  std::vector<Job> jobs;
  constexpr int64_t kChunk = 16;
  for (size_t gi = 0; gi < gs.size(); ++gi) {
    const Group& g = gs[gi];
    const auto n = static_cast<int64_t>(g.scaled.size());
    if (!g.model.ok) {
      for (int64_t r : g.scaled) jobs.push_back({-1, r, 1});
      continue;
    }
    for (int64_t f = 0; f < n; f += kChunk) jobs.push_back({static_cast<int64_t>(gi), f, std::min(kChunk, n - f)});
  }
  util::parallel_for(static_cast<int64_t>(jobs.size()), opts.threads, [&](int64_t i) {
    const Job& j = jobs[static_cast<size_t>(i)];
    if (j.group < 0) {
      ++n_analyzed;
      analyze_row(j.first);
      return;
    }
    const Group& g = gs[static_cast<size_t>(j.group)];
    graph::Op scratch;
    for (int64_t k = j.first; k < j.first + j.count; ++k) {
      const int64_t r = g.scaled[static_cast<size_t>(k)];
      const Scenario& s = scen[static_cast<size_t>(r)];
      BatchModel::Eval e = g.model.eval(s.training.batch_size, s.device, scratch);
      ++n_scaled;
      finish(r, e.peak_bytes, e.step_time_ns, e.saved_bytes);
    }
  }, tick);
  tick();
  if (stats) stats->analyzed = n_analyzed, stats->scaled = n_scaled;
  mark_pareto(rows);
  return rows;
}

void mark_pareto(std::vector<SweepRow>& rows) {
  std::vector<size_t> order(rows.size());
  std::iota(order.begin(), order.end(), size_t{0});
  std::sort(order.begin(), order.end(), [&](size_t a, size_t b) {
    return rows[a].peak_bytes != rows[b].peak_bytes ? rows[a].peak_bytes < rows[b].peak_bytes
                                                    : rows[a].step_time_ns < rows[b].step_time_ns;
  });
  // Walk by increasing peak; within one peak, only the fastest can be on the frontier, and only
  // if every row with a strictly smaller peak is slower.
  int64_t best_time_below = INT64_MAX;       // fastest among strictly smaller peaks
  for (size_t i = 0; i < order.size();) {
    size_t j = i;
    while (j < order.size() && rows[order[j]].peak_bytes == rows[order[i]].peak_bytes) ++j;
    const int64_t fastest = rows[order[i]].step_time_ns;
    for (size_t k = i; k < j; ++k) {
      SweepRow& r = rows[order[k]];
      r.pareto = r.step_time_ns == fastest && fastest < best_time_below;
    }
    best_time_below = std::min(best_time_below, fastest);
    i = j;
  }
}

}  // namespace actsim::study
