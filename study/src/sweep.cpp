#include "actsim/study/sweep.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <exception>
#include <map>
#include <memory>
#include <mutex>
#include <numeric>
#include <thread>
#include <toml++/toml.h>

#include "actsim/util/error.hpp"
#include "actsim/graph/lower.hpp"
#include "actsim/sim/engine.hpp"
#include "actsim/study/analyze.hpp"
#include "actsim/util/units.hpp"

// Note [Batch scaling]
// Lowering a step graph costs ~25 ms for seed-gpt2-xl; simulating it ~2.5 ms. A sweep over batch
// sizes would spend nearly all its time lowering graphs that differ only in sizes: for a batch of
// 2 or more, the ops, tensors, storages and their order do not depend on the batch (a batch of 1
// does: size-1 dims make views where PyTorch otherwise copies), and every storage's bytes, every
// op's FLOPs, bytes moved and workspace are affine in the batch. So rows that share everything but
// training.batch_size and device.name share one model: three reference points (the two smallest
// batches >= 2 and the largest) are analyzed in full; the two smallest give, for every op start,
// the live device bytes at that moment (what the engine compares against the peak) and every op's
// FLOPs and bytes moved as affine functions of the batch; the largest must then match exactly,
// element by element and in its analyzed peak, step time and saved bytes, or the whole group is
// analyzed row by row. With one stream the events run in op order whatever the durations, so the
// peak is the largest of those affine live counts and the step time the sum of the op times at
// the row's batch on the row's device. Multi-stream graphs (offload) are always analyzed in full:
// there the durations decide the event order.

namespace actsim::study {

using util::human_bytes;

using sim::SimResult;
using sim::DeviceSpec;
using sim::Observer;
using sim::simulate;
using sim::op_time_ns;
using sim::closest;
using graph::OpId;
using graph::StorageId;

namespace {

constexpr int64_t kMaxRuns = 100000;       // more is a mistake on the command line, not a sweep

[[noreturn]] void fail_axis(const std::string& text, const std::string& msg) {
  throw InputError(fmt::format("--vary {}: {}", text, msg));
}

bool parse_int(const std::string& s, int64_t& out) {
  if (s.empty() || s.size() > 18) return false;
  size_t i = s[0] == '-' ? 1 : 0;
  if (i == s.size()) return false;
  for (size_t j = i; j < s.size(); ++j) {
    if (s[j] < '0' || s[j] > '9') return false;
  }
  out = std::stoll(s);
  return true;
}

// A value typed as --set parses it: a TOML scalar if it is one, else the text.
nlohmann::json typed_value(const std::string& text) {
  try {
    toml::table t = toml::parse("v = " + text);
    const toml::node* n = t.get("v");
    if (auto i = n->as_integer()) return i->get();
    if (auto d = n->as_floating_point()) return d->get();
    if (auto b = n->as_boolean()) return b->get();
    if (auto s = n->as_string()) return s->get();
  } catch (const toml::parse_error&) {
  }
  return text;
}

// The value as the user means it in a table or CSV cell: TOML strings without their quotes.
std::string plain_value(const std::string& text) {
  nlohmann::json j = typed_value(text);
  return j.is_string() ? j.get<std::string>() : text;
}

// Runs fn(0..n-1) on `threads` workers; the calling thread reports progress. The first exception
// (by job index) is rethrown after every worker has stopped.
void parallel_jobs(int64_t n, int threads, const std::function<void(int64_t)>& fn,
                   const std::function<void()>& tick) {
  if (n == 0) return;
  std::atomic<int64_t> next{0};
  std::atomic<int> running{0};
  std::mutex m;
  std::condition_variable cv;
  std::vector<std::exception_ptr> errors(static_cast<size_t>(n));
  const int workers = static_cast<int>(std::min<int64_t>(threads, n));
  std::vector<std::thread> pool;
  running = workers;
  for (int w = 0; w < workers; ++w) {
    pool.emplace_back([&] {
      for (int64_t i; (i = next.fetch_add(1)) < n;) {
        try {
          fn(i);
        } catch (...) {
          errors[static_cast<size_t>(i)] = std::current_exception();
          next = n;  // stop handing out work
        }
      }
      std::lock_guard<std::mutex> lock(m);
      --running;
      cv.notify_all();
    });
  }
  {
    std::unique_lock<std::mutex> lock(m);
    while (running > 0) {
      cv.wait_for(lock, std::chrono::milliseconds(100));
      if (tick) tick();
    }
  }
  for (std::thread& t : pool) t.join();
  for (const std::exception_ptr& e : errors) {
    if (e) std::rethrow_exception(e);
  }
}

uint64_t mix(uint64_t h, uint64_t v) { return (h ^ v) * 0x100000001b3ULL; }

// A hash of everything the engine reads from a graph except sizes, FLOPs and bytes moved.
uint64_t structure_hash(const graph::Graph& g) {
  uint64_t h = 0xcbf29ce484222325ULL;
  auto ids = [&](const auto& v) {
    h = mix(h, v.size());
    for (auto x : v) h = mix(h, graph::index(x));
  };
  for (const graph::Op& op : g.ops()) {
    h = mix(h, static_cast<uint64_t>(op.kind));
    h = mix(h, static_cast<uint64_t>(op.phase));
    h = mix(h, static_cast<uint64_t>(op.stream));
    h = mix(h, static_cast<uint64_t>(op.kernels));
    h = mix(h, op.forward == graph::kNoOp ? ~0ULL : graph::index(op.forward));
    ids(op.inputs), ids(op.outputs), ids(op.holds), ids(op.releases), ids(op.after);
  }
  for (const graph::Tensor& t : g.tensors()) {
    h = mix(h, graph::index(t.storage));
    h = mix(h, t.producer == graph::kNoOp ? ~0ULL : graph::index(t.producer));
    h = mix(h, (t.is_view ? 1 : 0) | static_cast<uint64_t>(t.dtype) << 1);
  }
  for (const graph::Storage& s : g.storages()) {
    h = mix(h, s.producer == graph::kNoOp ? ~0ULL : graph::index(s.producer));
    h = mix(h, (s.keep ? 1 : 0) | static_cast<uint64_t>(s.location) << 1 | static_cast<uint64_t>(s.category) << 3);
  }
  return h;
}

// Records, for every op start, the device bytes live once its outputs and workspace are allocated
// (the figure the engine compares against the peak).
class StartLive : public Observer {
 public:
  std::vector<int64_t> live;               // [op starts, in order]
  void on_op_start(OpId, int64_t) override { live.push_back(cur_); }
  void on_alloc(StorageId, OpId, int64_t, int64_t l) override { cur_ = live.back() = l; }
  void on_free(StorageId, OpId, int64_t, int64_t l) override { cur_ = l; }
  void on_workspace(OpId, int64_t bytes, int64_t, int64_t l) override {
    cur_ = l;
    if (bytes > 0) live.back() = l;
  }
  explicit StartLive(int64_t start) : cur_(start) {}

 private:
  int64_t cur_;
};

// One fully analyzed reference point of a batch-scaling group.
struct Reference {
  int64_t batch = 0;
  SimResult result;
  int64_t saved_bytes = 0;
  uint64_t hash = 0;
  bool single_stream = true;
  std::vector<int64_t> start_live;         // [ops]
  std::vector<double> flops;               // [ops]
  std::vector<int64_t> bytes_moved;        // [ops]
  DeviceSpec device;
  std::shared_ptr<const graph::StepGraph> step;
};

Reference analyze_reference(const Scenario& s) {
  Analysis a = analyze(s);
  Reference r;
  r.batch = s.training.batch_size;
  r.result = a.result;
  r.saved_bytes = a.saved_bytes;
  r.device = s.device;
  const graph::Graph& g = a.step->graph;
  r.hash = structure_hash(g);
  for (const graph::Op& op : g.ops()) {
    r.single_stream = r.single_stream && op.stream == 0;
    r.flops.push_back(op.flops);
    r.bytes_moved.push_back(op.bytes_moved);
  }
  StartLive obs(a.result.live_step_start);
  Observer* list[] = {&obs};
  (void)simulate(*a.tables, list);
  r.start_live = std::move(obs.live);
  a.tables.reset();
  r.step = std::shared_ptr<const graph::StepGraph>(std::move(a.step));
  return r;
}

// Affine in the batch: value(b) = at_lo + slope * (b - lo).
struct AffineI {
  int64_t at_lo = 0, slope = 0;
  int64_t at(int64_t b, int64_t lo) const { return at_lo + slope * (b - lo); }
};
struct AffineD {
  double at_lo = 0, slope = 0;
  double at(int64_t b, int64_t lo) const { return at_lo + slope * static_cast<double>(b - lo); }
};

// The batch-scaling model of one group (Note [Batch scaling]); `ok` false when it does not hold.
struct BatchModel {
  bool ok = false;
  int64_t lo = 0;
  std::shared_ptr<const graph::StepGraph> step;  // the lo reference's graph (op kinds, dtypes)
  AffineI step_start, saved;
  std::vector<AffineI> start_live, bytes_moved;  // [ops]
  std::vector<AffineD> flops;                    // [ops]

  struct Eval {
    int64_t peak_bytes, step_time_ns, saved_bytes;
  };
  Eval eval(int64_t b, const DeviceSpec& device, graph::Op& scratch) const {
    Eval e{step_start.at(b, lo), 0, saved.at(b, lo)};
    for (const AffineI& l : start_live) e.peak_bytes = std::max(e.peak_bytes, l.at(b, lo));
    const graph::Graph& g = step->graph;
    for (size_t i = 0; i < flops.size(); ++i) {
      const graph::Op& op = g.ops()[i];
      scratch.kind = op.kind;
      scratch.kernels = op.kernels;
      scratch.forward = op.forward;
      scratch.outputs.clear();
      scratch.inputs.clear();
      if (!op.outputs.empty()) scratch.outputs.push_back(op.outputs[0]);
      if (!op.inputs.empty()) scratch.inputs.push_back(op.inputs[0]);
      scratch.flops = flops[i].at(b, lo);
      scratch.bytes_moved = bytes_moved[i].at(b, lo);
      e.step_time_ns += op_time_ns(g, scratch, device);
    }
    return e;
  }
};

bool fit_int(int64_t lo_v, int64_t mid_v, int64_t hi_v, int64_t lo, int64_t mid, int64_t hi, AffineI& out) {
  const int64_t d = mid_v - lo_v;
  if (d % (mid - lo) != 0) return false;
  out = {lo_v, d / (mid - lo)};
  return out.at(hi, lo) == hi_v;
}
bool fit_double(double lo_v, double mid_v, double hi_v, int64_t lo, int64_t mid, int64_t hi, AffineD& out) {
  const double d = mid_v - lo_v;
  const double slope = d / static_cast<double>(mid - lo);
  if (slope * static_cast<double>(mid - lo) != d) return false;
  out = {lo_v, slope};
  return out.at(hi, lo) == hi_v;
}

BatchModel build_model(const Reference& lo, const Reference& mid, const Reference& hi) {
  BatchModel m;
  if (!lo.single_stream || lo.hash != mid.hash || lo.hash != hi.hash) return m;
  const size_t n = lo.flops.size();
  if (lo.start_live.size() != n || mid.start_live.size() != n || hi.start_live.size() != n) return m;
  const int64_t a = lo.batch, b = mid.batch, c = hi.batch;
  m.lo = a;
  m.step = lo.step;
  if (!fit_int(lo.result.live_step_start, mid.result.live_step_start, hi.result.live_step_start, a, b, c, m.step_start) ||
      !fit_int(lo.saved_bytes, mid.saved_bytes, hi.saved_bytes, a, b, c, m.saved)) {
    return m;
  }
  m.start_live.resize(n), m.bytes_moved.resize(n), m.flops.resize(n);
  for (size_t i = 0; i < n; ++i) {
    if (!fit_int(lo.start_live[i], mid.start_live[i], hi.start_live[i], a, b, c, m.start_live[i]) ||
        !fit_int(lo.bytes_moved[i], mid.bytes_moved[i], hi.bytes_moved[i], a, b, c, m.bytes_moved[i]) ||
        !fit_double(lo.flops[i], mid.flops[i], hi.flops[i], a, b, c, m.flops[i])) {
      return m;
    }
  }
  // The model must reproduce each reference exactly, on that reference's device.
  graph::Op scratch;
  for (const Reference* r : {&lo, &mid, &hi}) {
    BatchModel::Eval e = m.eval(r->batch, r->device, scratch);
    if (e.peak_bytes != r->result.peak_bytes || e.step_time_ns != r->result.step_time_ns ||
        e.saved_bytes != r->saved_bytes) {
      return m;
    }
  }
  m.ok = true;
  return m;
}

// Splits on commas outside double quotes.
std::vector<std::string> split_values(const std::string& s) {
  std::vector<std::string> out(1);
  bool quoted = false;
  for (char c : s) {
    if (c == '"') quoted = !quoted;
    if (c == ',' && !quoted) out.emplace_back();
    else out.back() += c;
  }
  return out;
}

std::string csv_field(const std::string& s) {
  if (s.find_first_of(",\"\n") == std::string::npos) return s;
  std::string out = "\"";
  for (char c : s) {
    if (c == '"') out += '"';
    out += c;
  }
  return out + "\"";
}

}  // namespace

SweepAxis parse_sweep_axis(const std::string& text) {
  SweepAxis ax;
  ax.text = text;
  const size_t eq = text.find('=');
  if (eq == std::string::npos || eq == 0) fail_axis(text, "expected KEY=V1,V2,...");
  ax.key = text.substr(0, eq);
  const auto& keys = scenario_keys();
  if (std::find(keys.begin(), keys.end(), ax.key) == keys.end()) {
    const std::string hint = closest(ax.key, keys);
    fail_axis(text, fmt::format("unknown key \"{}\"{}", ax.key, hint.empty() ? "" : fmt::format("; did you mean {}?", hint)));
  }
  const std::string list = text.substr(eq + 1);
  if (list.empty()) fail_axis(text, fmt::format("empty value list for {}", ax.key));
  const std::vector<std::string> parts = split_values(list);
  for (size_t i = 0; i < parts.size(); ++i) {
    const std::string& v = parts[i];
    if (v.empty()) fail_axis(text, fmt::format("value {} of {} is empty", i + 1, ax.key));
    const size_t dots = v.find("..");
    int64_t a, b;
    if (dots != std::string::npos && v.front() != '"' && parse_int(v.substr(0, dots), a) &&
        parse_int(v.substr(dots + 2), b)) {
      if (a > b) fail_axis(text, fmt::format("range {} is empty (LO..HI needs LO <= HI)", v));
      if (b - a >= kMaxRuns) fail_axis(text, fmt::format("range {} has more than {} values", v, kMaxRuns));
      for (int64_t x = a; x <= b; ++x) ax.values.push_back(std::to_string(x));
    } else {
      ax.values.push_back(v);
    }
  }
  return ax;
}

std::vector<SweepRow> run_sweep(const Scenario& base, const std::vector<SweepAxis>& axes, const SweepOptions& opts,
                                SweepStats* stats) {
  ACTSIM_ASSERT(opts.threads >= 1, "run_sweep needs at least one thread");
  ACTSIM_ASSERT(!axes.empty(), "run_sweep needs at least one axis");
  for (size_t i = 0; i < axes.size(); ++i) {
    for (size_t j = 0; j < i; ++j) {
      if (axes[j].key == axes[i].key) fail_axis(axes[i].text, fmt::format("{} is already varied by --vary {}", axes[i].key, axes[j].text));
    }
  }
  int64_t total = 1;
  for (const SweepAxis& ax : axes) {
    ACTSIM_ASSERT(!ax.values.empty(), "an axis without values");
    total *= static_cast<int64_t>(ax.values.size());
    if (total > kMaxRuns) fail_axis(ax.text, fmt::format("the cross product has more than {} runs", kMaxRuns));
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
      const std::string set_prefix = "--set: ";
      if (msg.rfind(set_prefix, 0) == 0) msg = msg.substr(set_prefix.size());
      const SweepAxis* blame = nullptr;
      for (const SweepAxis& ax : axes) {
        if (!blame && msg.rfind(ax.key, 0) == 0) blame = &ax;
      }
      for (const SweepAxis& ax : axes) {
        if (!blame && msg.find(ax.key) != std::string::npos) blame = &ax;
      }
      if (!blame) blame = &axes.front();
      if (axes.size() > 1) msg += fmt::format(" (in the run {})", fmt::join(sets, ", "));
      fail_axis(blame->text, msg);
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
    if (multi_stream || batches.size() < 3 || n_big < 4) {
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
  parallel_jobs(n_refs + static_cast<int64_t>(direct.size()), opts.threads, [&](int64_t i) {
    ++n_analyzed;
    if (i < n_refs) refs[static_cast<size_t>(i)] = analyze_reference(ref_scen[static_cast<size_t>(i)]);
    else analyze_row(direct[static_cast<size_t>(i - n_refs)]);
  }, tick);

  // 2. Each group's model, checked against its references.
  parallel_jobs(static_cast<int64_t>(gs.size()), opts.threads, [&](int64_t i) {
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
  parallel_jobs(static_cast<int64_t>(jobs.size()), opts.threads, [&](int64_t i) {
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

std::string sweep_csv(const std::vector<SweepAxis>& axes, const std::vector<SweepRow>& rows) {
  std::string out;
  for (const SweepAxis& ax : axes) out += csv_field(ax.key) + ",";
  out += "peak_bytes,step_time_ns,saved_bytes,fits,pareto\n";
  for (const SweepRow& r : rows) {
    for (const std::string& v : r.values) out += csv_field(plain_value(v)) + ",";
    out += fmt::format("{},{},{},{},{}\n", r.peak_bytes, r.step_time_ns, r.saved_bytes, r.fits ? "true" : "false",
                       r.pareto ? "true" : "false");
  }
  return out;
}

nlohmann::json sweep_json(const std::vector<SweepAxis>& axes, const std::vector<SweepRow>& rows) {
  nlohmann::json out = nlohmann::json::array();
  for (const SweepRow& r : rows) {
    nlohmann::json o = nlohmann::json::object();
    for (size_t k = 0; k < axes.size(); ++k) o[axes[k].key] = typed_value(r.values[k]);
    o["peak_bytes"] = r.peak_bytes;
    o["step_time_ns"] = r.step_time_ns;
    o["saved_bytes"] = r.saved_bytes;
    o["fits"] = r.fits;
    o["pareto"] = r.pareto;
    out.push_back(std::move(o));
  }
  return out;
}

std::string sweep_table(const std::vector<SweepAxis>& axes, const std::vector<SweepRow>& rows) {
  std::vector<std::string> head;
  for (const SweepAxis& ax : axes) head.push_back(ax.key);
  for (const char* h : {"peak", "step time", "saved", "fits", "pareto"}) head.emplace_back(h);
  std::vector<std::vector<std::string>> cells;
  for (const SweepRow& r : rows) {
    std::vector<std::string> c;
    for (const std::string& v : r.values) c.push_back(plain_value(v));
    c.push_back(human_bytes(r.peak_bytes));
    c.push_back(fmt::format("{:.3f} ms", r.step_time_ns / 1e6));
    c.push_back(human_bytes(r.saved_bytes));
    c.push_back(r.fits ? "yes" : "no");
    c.push_back(r.pareto ? "*" : "");
    cells.push_back(std::move(c));
  }
  std::vector<size_t> width(head.size());
  for (size_t k = 0; k < head.size(); ++k) {
    width[k] = head[k].size();
    for (const auto& c : cells) width[k] = std::max(width[k], c[k].size());
  }
  const size_t n_axes = axes.size();
  auto line = [&](const std::vector<std::string>& c) {
    std::string l;
    for (size_t k = 0; k < c.size(); ++k) {
      // Varied values left-aligned, figures right-aligned.
      l += k < n_axes ? fmt::format("{:<{}}  ", c[k], width[k]) : fmt::format("{:>{}}  ", c[k], width[k]);
    }
    while (!l.empty() && l.back() == ' ') l.pop_back();
    return l + "\n";
  };
  std::string out = line(head);
  for (const auto& c : cells) out += line(c);
  int64_t n_pareto = 0, n_fit = 0;
  for (const SweepRow& r : rows) n_pareto += r.pareto, n_fit += r.fits;
  out += fmt::format("{} runs, {} fit the device, {} on the Pareto frontier of peak against step time (*)\n",
                     rows.size(), n_fit, n_pareto);
  return out;
}

}  // namespace actsim::study
