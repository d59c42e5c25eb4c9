// The replay executor and the confirmations (replay.hpp).
#include "actsim/replay/replay.hpp"

#include "actsim/schedule/schedule.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <nlohmann/json.hpp>
#include <random>

#include "actsim/util/error.hpp"
#include "actsim/util/bf16.hpp"
#include "actsim/util/fp16.hpp"
#include "actsim/util/hash.hpp"
#include "actsim/util/rng.hpp"
#include "actsim/util/text.hpp"

namespace actsim::replay {

using util::from_bf16;
using util::to_bf16;
using util::fnv1a;
using util::from_f16;
using util::splitmix64;
using util::to_f16;
using backends::Backend;
using backends::OpCall;
using backends::TensorArg;

using graph::Category;
using graph::DType;
using graph::Graph;
using graph::Location;
using graph::Op;
using graph::OpId;
using graph::OpKind;
using graph::Phase;
using graph::StorageId;
using graph::TensorId;
using schedule::Schedule;
using schedule::ScheduleEntry;
using Kind = schedule::ScheduleEntry::Kind;
using Clock = std::chrono::steady_clock;

namespace {

// ---- deterministic values -------------------------------------------------------------------

// Uniform in [0, 1), a pure function of (key, i): values do not depend on storage ids, so a
// rewritten (checkpointed) graph of the same model gets the same weights.
double uniform(uint64_t key, uint64_t i) { return static_cast<double>(splitmix64(key ^ splitmix64(i)) >> 11) * 0x1.0p-53; }

void put(DType dt, uint8_t* p, double v) {
  switch (dt) {
    case DType::f32: { float f = static_cast<float>(v); std::memcpy(p, &f, 4); return; }
    case DType::f64: std::memcpy(p, &v, 8); return;
    case DType::bf16: { uint16_t h = to_bf16(static_cast<float>(v)); std::memcpy(p, &h, 2); return; }
    case DType::f16: { uint16_t h = to_f16(static_cast<float>(v)); std::memcpy(p, &h, 2); return; }
    case DType::i64: { int64_t x = static_cast<int64_t>(v); std::memcpy(p, &x, 8); return; }
    case DType::i32: { int32_t x = static_cast<int32_t>(v); std::memcpy(p, &x, 4); return; }
    case DType::b8: case DType::u8: *p = static_cast<uint8_t>(v != 0 ? (dt == DType::b8 ? 1 : v) : 0); return;
  }
}
double get(DType dt, const uint8_t* p) {
  switch (dt) {
    case DType::f32: { float f; std::memcpy(&f, p, 4); return f; }
    case DType::f64: { double d; std::memcpy(&d, p, 8); return d; }
    case DType::bf16: { uint16_t h; std::memcpy(&h, p, 2); return from_bf16(h); }
    case DType::f16: { uint16_t h; std::memcpy(&h, p, 2); return from_f16(h); }
    case DType::i64: { int64_t x; std::memcpy(&x, p, 8); return static_cast<double>(x); }
    case DType::i32: { int32_t x; std::memcpy(&x, p, 4); return x; }
    case DType::b8: case DType::u8: return *p;
  }
  return 0;
}

bool ends_with(std::string_view s, std::string_view suffix) {
  return s.size() >= suffix.size() && s.substr(s.size() - suffix.size()) == suffix;
}

// The initial bytes of a storage that exists before the step, from its first tensor's name.
std::vector<uint8_t> initial_values(const Schedule& s, StorageId sid, uint64_t seed) {
  const Graph& g = s.graph();
  const graph::Storage& st = g.storage(sid);
  std::vector<uint8_t> out(static_cast<size_t>(st.bytes), 0);
  if (st.first == graph::kNoTensor) return out;
  const graph::Tensor& t = g.tensor(st.first);
  const int64_t es = graph::dtype_size(t.dtype);
  const int64_t n = st.bytes / es;
  const uint64_t key = splitmix64(seed) ^ fnv1a(t.name);
  auto fill = [&](auto&& value) {
    for (int64_t i = 0; i < n; ++i) put(t.dtype, out.data() + i * es, value(i));
  };
  const std::string& name = t.name;
  switch (st.category) {
    case Category::parameter:
      if (t.shape.size() == 1 && ends_with(name, "weight")) fill([&](int64_t i) { return 1.0 + 0.1 * (2 * uniform(key, i) - 1); });
      else if (t.shape.size() == 1) fill([&](int64_t i) { return 0.05 * (2 * uniform(key, i) - 1); });
      else fill([&](int64_t i) { return 0.08 * (2 * uniform(key, i) - 1); });
      break;
    case Category::buffer:
      if (ends_with(name, "attn.bias") && t.shape.size() >= 2) {
        // nanoGPT's causal buffer: torch.tril(torch.ones(T, T))
        const int64_t cols = t.shape.back(), rows = t.shape[t.shape.size() - 2];
        fill([&](int64_t i) { return ((i / cols) % rows) >= (i % cols) ? 1.0 : 0.0; });
      } else if ((ends_with(name, "cos_cached") || ends_with(name, "sin_cached")) && t.shape.size() == 2) {
        // RotaryPositionalEmbedding: inv_freq = 1 / theta^(arange(0, d_k, 2) / d_k), in fp32.
        const int64_t half = t.shape[1], d_k = 2 * half;
        const bool is_cos = ends_with(name, "cos_cached");
        fill([&](int64_t i) {
          const float e = static_cast<float>(2 * (i % half)) / static_cast<float>(d_k);
          const float inv = 1.0f / std::pow(static_cast<float>(s.model.rope_theta), e);
          const float ang = static_cast<float>(i / half) * inv;
          return static_cast<double>(is_cos ? std::cos(ang) : std::sin(ang));
        });
      } else if (ends_with(name, "inv_freq") && t.shape.size() == 1) {
        // Hugging Face rotary embeddings (default rope type): 1 / theta^(arange(0, rd, 2) / rd), fp32.
        const int64_t rd = 2 * t.shape[0];
        fill([&](int64_t i) {
          return 1.0 / std::pow(s.model.rope_theta, static_cast<double>(2 * i) / static_cast<double>(rd));
        });
      } else {
        fill([&](int64_t i) { return 2 * uniform(key, i) - 1; });
      }
      break;
    case Category::optimizer_state:
      if (ends_with(name, ".step")) fill([](int64_t) { return 1.0; });  // one warm-up step done
      else if (ends_with(name, ".exp_avg_sq")) fill([&](int64_t i) { return 1e-4 * uniform(key, i); });
      else fill([&](int64_t i) { return 1e-3 * (2 * uniform(key, i) - 1); });
      break;
    case Category::input: {
      const int64_t vocab = std::max<int64_t>(1, s.model.vocab_size);
      fill([&](int64_t i) { return static_cast<double>(std::min<int64_t>(vocab - 1, static_cast<int64_t>(uniform(key, i) * vocab))); });
      break;
    }
    default: break;
  }
  return out;
}

uint64_t op_seed(const Graph& g, const Op& op, uint64_t seed) {
  // Keyed by the name of the forward op for a recompute or a backward (docs/kernels.md): a
  // recompute draws the same mask, and a fused attention backward regenerates its forward's.
  const Op& key = op.forward != graph::kNoOp ? g.op(op.forward) : op;
  return splitmix64(seed ^ fnv1a(key.name));
}

std::string storage_label(const Graph& g, StorageId s) {
  const graph::Storage& st = g.storage(s);
  return st.first == graph::kNoTensor ? fmt::format("storage {}", index(s)) : g.tensor(st.first).name;
}

// ---- the executor ---------------------------------------------------------------------------

class Executor {
 public:
  Executor(const Schedule& s, Backend& be, const ReplayOptions& o)
      : s_(s), g_(s.graph()), be_(be), be_name_(be.name()), o_(o) {}
  // Never throws: a backend whose free fails (a CUDA error is sticky, so after a kernel fault
  // every later call fails too) costs a leak and one line on stderr, not std::terminate while
  // the fault that got us here is being reported.
  ~Executor() noexcept {
    int64_t failed = 0;
    std::string first;
    for (std::vector<void*>* list : {&buf_, &ws_}) {
      for (void* p : *list) {
        if (!p) continue;
        try {
          be_.free(p);
        } catch (const std::exception& e) {
          if (failed++ == 0) first = e.what();
        } catch (...) {
          if (failed++ == 0) first = "unknown error";
        }
      }
    }
    if (failed > 0) {
      std::fprintf(stderr, "actsim: replay: %lld buffer(s) could not be freed on the %s backend: %s\n",
                   static_cast<long long>(failed), be_name_.c_str(), util::one_line(first).c_str());
    }
  }

  ReplayResult run();

  // Stepwise use (tightness probes share the unpoisoned prefix of their runs).
  struct State {
    std::vector<std::vector<uint8_t>> contents;  // [storages] bytes of each live storage
    std::vector<bool> live;                      // [storages]
    std::vector<uint32_t> ws_ops;                // ops whose workspace is live
    int64_t in_use = 0, peak = 0;
    bool snapped = false;
  };
  void begin();
  bool step(size_t entry, bool stop_after_backward);  // false: stopped before the optimizer
  ReplayResult finish(bool stopped);
  State save();
  void restore(const State& st);
  void poison(StorageId s) { be_.fill_nan(buf_[index(s)], g_.storage(s).bytes); }
  void ensure_snapshot() {
    if (!snapped_) snapshot();
  }
  const ReplayResult& partial() const { return r_; }

 private:
  void alloc(StorageId s) {
    const graph::Storage& st = g_.storage(s);
    buf_[index(s)] = be_.alloc(st.bytes);
    if (st.location == Location::device) count(g_.allocated(st.bytes));
  }
  void count(int64_t bytes) {
    in_use_ += bytes;
    r_.peak_bytes = std::max(r_.peak_bytes, in_use_);
  }
  // `counted`: what the allocation added to in_use_ (0 for host memory).
  void release(void*& p, int64_t bytes, int64_t counted) {
    if (o_.poison_freed) be_.fill_nan(p, bytes);
    be_.free(p);
    p = nullptr;
    in_use_ -= counted;
  }
  TensorArg arg(TensorId t) const {
    const graph::Tensor& tt = g_.tensor(t);
    return {.base = buf_[index(tt.storage)], .dtype = tt.dtype, .shape = tt.shape, .strides = tt.strides,
            .offset = tt.offset};
  }
  // A tensor's elements in logical (row-major) order, as raw bytes.
  std::vector<uint8_t> read(TensorId t) {
    const graph::Tensor& tt = g_.tensor(t);
    const graph::Storage& st = g_.storage(tt.storage);
    std::vector<uint8_t> all(static_cast<size_t>(st.bytes));
    be_.synchronize();
    if (st.bytes) be_.download(all.data(), buf_[index(tt.storage)], st.bytes);
    const int64_t es = graph::dtype_size(tt.dtype), n = graph::numel(tt.shape);
    std::vector<uint8_t> out(static_cast<size_t>(n * es));
    std::vector<int64_t> idx(tt.shape.size(), 0);
    for (int64_t i = 0; i < n; ++i) {
      int64_t off = tt.offset;
      for (size_t d = 0; d < idx.size(); ++d) off += idx[d] * tt.strides[d];
      std::memcpy(out.data() + i * es, all.data() + off * es, static_cast<size_t>(es));
      for (size_t d = idx.size(); d-- > 0;) {
        if (++idx[d] < tt.shape[d]) break;
        idx[d] = 0;
      }
    }
    return out;
  }
  void snapshot() {
    snapped_ = true;
    r_.loss_bytes = read(s_.step.loss);
    r_.loss = get(g_.tensor(s_.step.loss).dtype, r_.loss_bytes.data());
    r_.grads.resize(s_.step.params.size());
    for (size_t i = 0; i < s_.step.param_grads.size(); ++i) {
      if (s_.step.param_grads[i] != graph::kNoTensor) r_.grads[i] = read(s_.step.param_grads[i]);
    }
  }
  void run_op(size_t entry, uint32_t id);

  const Schedule& s_;
  const Graph& g_;
  Backend& be_;
  std::string be_name_;  // for the destructor's message (name() is not called there)
  const ReplayOptions& o_;
  ReplayResult r_;
  std::vector<void*> buf_;  // [storages] backend buffer, null when not allocated
  std::vector<void*> ws_;   // [ops] workspace buffer while the op's workspace is live
  int64_t in_use_ = 0;      // device bytes in use (counting allocator)
  bool snapped_ = false;
  Clock::time_point start_;
};

void Executor::run_op(size_t entry, uint32_t id) {
  const Op& op = g_.ops()[id];
  OpCall call{.graph = &g_, .op = graph::OpId{id}, .workspace = ws_[id], .seed = op_seed(g_, op, o_.seed)};
  for (TensorId t : op.inputs) call.inputs.push_back(arg(t));
  for (TensorId t : op.outputs) call.outputs.push_back(arg(t));
  for (TensorId t : op.grad_outputs) call.grad_outputs.push_back(arg(t));
  const auto t0 = Clock::now();
  try {
    be_.run(call);
    be_.synchronize();
  } catch (const std::exception& e) {
    throw ReplayError(fmt::format("{}: entry {}: op {} ({}, kind {}) failed on the {} backend: {}", s_.source, entry + 1,
                                  id, op.name, to_string(op.kind), be_.name(), e.what()));
  }
  const double measured = be_.last_run_seconds();
  r_.op_seconds[id] = measured > 0 ? measured : std::chrono::duration<double>(Clock::now() - t0).count();
  r_.step_seconds += r_.op_seconds[id];
}

void Executor::begin() {
  start_ = Clock::now();
  r_.backend = be_.name();
  buf_.assign(g_.storages().size(), nullptr);
  ws_.assign(g_.n_ops(), nullptr);
  r_.op_seconds.assign(g_.n_ops(), 0.0);
  r_.timeline.assign(s_.entries.size(), -1);
  if (o_.keep_initial_values) r_.initial.resize(g_.storages().size());
  // Parameters, buffers, optimizer state and inputs exist before the step.
  for (size_t i = 0; i < g_.storages().size(); ++i) {
    const StorageId sid{static_cast<uint32_t>(i)};
    if (g_.storage(sid).producer != graph::kNoOp) continue;
    alloc(sid);
    std::vector<uint8_t> v = initial_values(s_, sid, o_.seed);
    if (!v.empty()) be_.upload(buf_[i], v.data(), static_cast<int64_t>(v.size()));
    if (o_.keep_initial_values) r_.initial[i] = std::move(v);
  }
  r_.bytes_step_start = in_use_;
  r_.peak_bytes = in_use_;
}

bool Executor::step(size_t i, bool stop_after_backward) {
  const ScheduleEntry& e = s_.entries[i];
  switch (e.kind) {
    case Kind::alloc: alloc(StorageId{e.id}); break;
    case Kind::free: {
      if (!o_.free_buffers) break;
      const graph::Storage& st = g_.storage(StorageId{e.id});
      release(buf_[e.id], st.bytes, st.location == Location::device ? g_.allocated(st.bytes) : 0);
      break;
    }
    case Kind::ws_alloc:
      ws_[e.id] = be_.alloc(e.bytes);
      count(e.bytes);
      break;
    case Kind::ws_free: release(ws_[e.id], e.bytes, e.bytes); break;
    case Kind::run: {
      const Op& op = g_.ops()[e.id];
      if (!snapped_ && op.phase == Phase::optimizer) {
        snapshot();
        if (stop_after_backward) return false;
      }
      if (o_.poison_storage && o_.poison_before_entry == i) poison(*o_.poison_storage);
      run_op(i, e.id);
      break;
    }
  }
  if (e.is_memory()) r_.timeline[i] = in_use_;
  return true;
}

ReplayResult Executor::finish(bool stopped) {
  if (!snapped_) snapshot();
  r_.completed_optimizer = !stopped;
  if (!stopped) {
    for (TensorId p : s_.step.params) r_.params_after.push_back(read(p));
  }
  r_.wall_seconds = std::chrono::duration<double>(Clock::now() - start_).count();
  return std::move(r_);
}

ReplayResult Executor::run() {
  begin();
  bool stopped = false;
  const size_t n = s_.entries.size();
  for (size_t i = 0; i < n && !stopped; ++i) {
    stopped = !step(i, o_.stop_after_backward);
    if (o_.progress && (i % 512 == 511 || i + 1 == n)) o_.progress(static_cast<int64_t>(i + 1), static_cast<int64_t>(n));
  }
  return finish(stopped);
}

Executor::State Executor::save() {
  State st;
  st.contents.resize(buf_.size());
  st.live.assign(buf_.size(), false);
  be_.synchronize();
  for (size_t i = 0; i < buf_.size(); ++i) {
    if (!buf_[i]) continue;
    st.live[i] = true;
    const int64_t bytes = g_.storages()[i].bytes;
    st.contents[i].resize(static_cast<size_t>(bytes));
    if (bytes) be_.download(st.contents[i].data(), buf_[i], bytes);
  }
  for (size_t i = 0; i < ws_.size(); ++i) {
    if (ws_[i]) st.ws_ops.push_back(static_cast<uint32_t>(i));
  }
  st.in_use = in_use_;
  st.peak = r_.peak_bytes;
  st.snapped = snapped_;
  return st;
}

void Executor::restore(const State& st) {
  for (void*& p : buf_) {
    if (p) be_.free(p), p = nullptr;
  }
  for (void*& p : ws_) {
    if (p) be_.free(p), p = nullptr;
  }
  for (size_t i = 0; i < buf_.size(); ++i) {
    if (!st.live[i]) continue;
    buf_[i] = be_.alloc(g_.storages()[i].bytes);
    if (!st.contents[i].empty()) be_.upload(buf_[i], st.contents[i].data(), static_cast<int64_t>(st.contents[i].size()));
  }
  for (uint32_t op : st.ws_ops) ws_[op] = be_.alloc(g_.ops()[op].workspace_bytes);
  in_use_ = st.in_use;
  r_.peak_bytes = st.peak;
  snapped_ = st.snapped;
  r_.grads.clear();
  r_.loss_bytes.clear();
}

std::string first_difference(const Schedule& s, const std::vector<std::vector<uint8_t>>& a,
                             const std::vector<std::vector<uint8_t>>& b, const std::vector<TensorId>& tensors,
                             const char* what) {
  const Graph& g = s.graph();
  for (size_t i = 0; i < a.size() && i < b.size(); ++i) {
    if (a[i] == b[i]) continue;
    const TensorId t = tensors[i];
    const DType dt = g.tensor(t).dtype;
    const size_t es = static_cast<size_t>(graph::dtype_size(dt));
    for (size_t k = 0; k + es <= a[i].size() && k + es <= b[i].size(); k += es) {
      if (std::memcmp(a[i].data() + k, b[i].data() + k, es) != 0) {
        return fmt::format("{} of {} differs at element {}: {} vs {}", what, g.tensor(t).name, k / es,
                           get(dt, a[i].data() + k), get(dt, b[i].data() + k));
      }
    }
    return fmt::format("{} of {} differs in size", what, g.tensor(t).name);
  }
  return "";
}

}  // namespace

ReplayResult run(const Schedule& s, Backend& be, const ReplayOptions& opts) {
  Executor ex(s, be, opts);
  return ex.run();
}

bool grads_equal(const ReplayResult& a, const ReplayResult& b) { return a.loss_bytes == b.loss_bytes && a.grads == b.grads; }

SafetyCheck confirm_safety(const Schedule& s, Backend& be, const ReplayResult& freed, uint64_t seed,
                           std::function<void(int64_t done, int64_t total)> progress) {
  ReplayResult kept = run(s, be, {.seed = seed, .free_buffers = false, .progress = std::move(progress)});
  SafetyCheck c;
  if (freed.loss_bytes != kept.loss_bytes) {
    c.detail = fmt::format("loss differs: {} (freed at the simulated points) vs {} (nothing freed)", freed.loss, kept.loss);
    return c;
  }
  std::string d = first_difference(s, freed.grads, kept.grads, s.step.param_grads, "the gradient");
  if (d.empty() && freed.completed_optimizer && kept.completed_optimizer) {
    d = first_difference(s, freed.params_after, kept.params_after, s.step.params, "the updated parameter");
  }
  c.ok = d.empty();
  c.detail = d.empty() ? "loss, every gradient and every updated parameter equal bit for bit" : d;
  return c;
}

TightnessCheck confirm_tightness(const Schedule& s, Backend& be, const ReplayResult& reference,
                                 const TightnessOptions& opts) {
  const Graph& g = s.graph();
  TightnessCheck c;
  // Saved activations: storages created during the step that backward really reads as saved
  // tensors (a backward op's inputs after its incoming gradients), and, under checkpointing, the
  // forward tensors a recompute op reads (what torch.utils.checkpoint keeps). A forward op's
  // `saved` list alone is not enough: inside a checkpointed block those tensors are dropped.
  std::vector<bool> saved(g.storages().size(), false);
  auto mark = [&](TensorId t) {
    const StorageId sid = g.tensor(t).storage;
    if (g.storage(sid).producer != graph::kNoOp) saved[index(sid)] = true;
  };
  for (const Op& op : g.ops()) {
    if (op.kind == OpKind::backward) {
      for (size_t k = static_cast<size_t>(std::max<int8_t>(op.n_grad_inputs, 0)); k < op.inputs.size(); ++k) mark(op.inputs[k]);
    } else if (op.recompute) {
      for (TensorId t : op.inputs) {
        const OpId p = g.tensor(t).producer;
        if (p != graph::kNoOp && g.op(p).phase == Phase::forward && !g.op(p).recompute) mark(t);
      }
    }
  }
  // The last op reading each storage, as the index of its run entry.
  std::vector<int64_t> last_read(g.storages().size(), -1);
  for (size_t i = 0; i < s.entries.size(); ++i) {
    if (s.entries[i].kind != Kind::run) continue;
    for (TensorId t : g.ops()[s.entries[i].id].inputs) last_read[index(g.tensor(t).storage)] = static_cast<int64_t>(i);
  }
  std::vector<uint32_t> cand;
  for (uint32_t i = 0; i < saved.size(); ++i) {
    if (saved[i]) cand.push_back(i);
  }
  c.candidates = static_cast<int64_t>(cand.size());
  if (cand.size() > opts.max_checked) {
    std::mt19937_64 rng(opts.seed);
    std::shuffle(cand.begin(), cand.end(), rng);
    cand.resize(opts.max_checked);
    std::sort(cand.begin(), cand.end());
  }
  // One probe per candidate: poison before the run entry of its last reader.
  struct Probe {
    size_t item;
    size_t entry;
  };
  std::vector<Probe> shared, alone;
  for (uint32_t si : cand) {
    const StorageId sid{si};
    TightnessItem item{.name = storage_label(g, sid), .storage = sid};
    if (last_read[si] < 0) {
      item.reason = "no op reads it after it is saved";
    } else {
      item.last_reader = g.ops()[s.entries[static_cast<size_t>(last_read[si])].id].name;
      const bool in_optimizer = g.ops()[s.entries[static_cast<size_t>(last_read[si])].id].phase == Phase::optimizer;
      (opts.share_prefix && !in_optimizer ? shared : alone).push_back({c.items.size(), static_cast<size_t>(last_read[si])});
    }
    c.items.push_back(std::move(item));
  }
  c.checked = static_cast<int64_t>(c.items.size());
  // Every probe's run equals the reference run up to its poison point, so one executor walks the
  // step once; at each probe it saves the live buffers, runs the poisoned rest of the backward,
  // and restores them. Probes whose reader is in the optimizer step run whole, alone.
  std::sort(shared.begin(), shared.end(), [](const Probe& a, const Probe& b) { return a.entry < b.entry; });
  const ReplayOptions plain{.seed = opts.seed};
  const int64_t n_probes = static_cast<int64_t>(shared.size() + alone.size());
  int64_t probes_done = 0;
  auto probed = [&] {
    if (opts.progress) opts.progress(++probes_done, n_probes);
  };
  if (!shared.empty()) {
    Executor ex(s, be, plain);
    ex.begin();
    size_t i = 0;
    for (const Probe& pr : shared) {
      for (; i < pr.entry; ++i) ex.step(i, false);
      Executor::State saved_state = ex.save();
      TightnessItem& item = c.items[pr.item];
      try {
        ex.poison(item.storage);
        for (size_t j = i; j < s.entries.size() && ex.step(j, true); ++j) {
        }
        ex.ensure_snapshot();
        item.confirmed = ex.partial().loss_bytes != reference.loss_bytes ||
                         ex.partial().grads != reference.grads;
      } catch (const ReplayError&) {
        item.confirmed = true;  // the poisoned values broke an op outright (an index out of range)
      }
      ex.restore(saved_state);
      probed();
    }
  }
  for (const Probe& pr : alone) {
    TightnessItem& item = c.items[pr.item];
    try {
      ReplayResult r = run(s, be, {.seed = opts.seed, .poison_storage = item.storage, .poison_before_entry = pr.entry});
      item.confirmed = !grads_equal(reference, r) || r.params_after != reference.params_after;
    } catch (const ReplayError&) {
      item.confirmed = true;
    }
    probed();
  }
  for (TightnessItem& item : c.items) {
    if (item.confirmed) {
      ++c.confirmed;
      continue;
    }
    if (!item.reason.empty()) continue;
    const Op* reader = &g.ops()[s.entries[static_cast<size_t>(last_read[index(item.storage)])].id];
    const DType dt = g.tensor(g.storage(item.storage).first).dtype;
    const OpKind fk = reader && reader->kind == OpKind::backward && reader->forward != graph::kNoOp
                          ? g.op(reader->forward).kind
                          : (reader ? reader->kind : OpKind::view);
    if (dt == DType::b8 || dt == DType::u8) {
      item.reason = fmt::format("a mask: its poisoned 0xFF bytes still read as true where it matters, so {} computes the same",
                                item.last_reader);
    } else if (fk == OpKind::mean_last) {
      item.reason = fmt::format("{} uses only its shape: mean's backward needs the input's sizes, not its values "
                                "(torch 1.13 saves the input anyway)", item.last_reader);
    } else {
      item.reason = fmt::format("unexplained: poisoning it before its last reader {} changed neither the loss nor any "
                                "gradient (the reader may use only its shape, or the values may not reach the result)",
                                item.last_reader);
    }
  }
  return c;
}

MemoryCheck confirm_memory(const Schedule& s, const ReplayResult& r) {
  MemoryCheck c;
  c.simulated_peak_bytes = s.simulated_peak_bytes;
  c.measured_peak_bytes = r.peak_bytes;
  const Graph& g = s.graph();
  if (s.simulated_live_step_start && r.bytes_step_start != s.simulated_live_step_start) {
    c.detail = fmt::format("before the step: simulated {} B in use, measured {} B", s.simulated_live_step_start,
                           r.bytes_step_start);
    return c;
  }
  for (size_t i = 0; i < s.entries.size() && i < r.timeline.size(); ++i) {
    const ScheduleEntry& e = s.entries[i];
    if (!e.is_memory()) continue;
    ++c.events_compared;
    if (r.timeline[i] != e.live) {
      const bool st = e.kind == Kind::alloc || e.kind == Kind::free;
      c.detail = fmt::format("entry {} ({} of {}): simulated {} B in use, measured {} B", i + 1, to_string(e.kind),
                             st ? storage_label(g, StorageId{e.id}) : g.ops()[e.id].name, e.live, r.timeline[i]);
      return c;
    }
  }
  if (r.peak_bytes != s.simulated_peak_bytes) {
    c.detail = fmt::format("high-water mark: simulated {} B, measured {} B", s.simulated_peak_bytes, r.peak_bytes);
    return c;
  }
  c.ok = true;
  c.detail = fmt::format("peak {} B and all {} memory events equal", r.peak_bytes, c.events_compared);
  return c;
}

bool torch_checkable(const Schedule& s, std::string& why_not) {
  if (s.profile != graph::ProfileId::torch_cpu) {
    why_not = "the PyTorch check runs only under runtime.profile=torch-cpu";
  } else if (s.model.dropout != 0) {
    why_not = "the PyTorch check needs model.dropout = 0 (dropout masks differ between generators)";
  } else if (s.model.attention != graph::Attention::eager) {
    why_not = "the PyTorch check needs model.attention = eager (torch 1.13 has no SDPA)";
  } else if (s.training.autocast_on()) {  // autocast recipe (issue 12)
    why_not = "the PyTorch check runs without autocast (training.autocast = none)";
  } else if (s.training.dtype != DType::f32 && s.training.dtype != DType::f64) {
    why_not = "the PyTorch check compares fp32 (or fp64) runs only";
  } else {
    why_not.clear();
    return true;
  }
  return false;
}

std::string torch_dump(const Schedule& s, const ReplayResult& r) {
  const Graph& g = s.graph();
  ACTSIM_ASSERT(r.initial.size() == g.storages().size(), "torch_dump needs keep_initial_values");
  nlohmann::json arrays = nlohmann::json::array();
  std::string blob;
  auto add = [&](const std::string& name, const char* role, const graph::Tensor& t, const std::vector<uint8_t>& bytes,
                 bool contiguous_values) {
    const bool is_int = !graph::is_floating(t.dtype);
    const int64_t n = graph::numel(t.shape), es = graph::dtype_size(t.dtype);
    const size_t off = blob.size();
    for (int64_t i = 0; i < n; ++i) {
      // Pre-step storages are read through the tensor's own view; results are already logical.
      int64_t e = i;
      if (!contiguous_values) {
        e = t.offset;
        int64_t rem = i;
        for (size_t d = t.shape.size(); d-- > 0;) {
          e += (rem % t.shape[d]) * t.strides[d];
          rem /= t.shape[d];
        }
      }
      const double v = get(t.dtype, bytes.data() + e * es);
      if (is_int) {
        const int64_t x = static_cast<int64_t>(v);
        blob.append(reinterpret_cast<const char*>(&x), 8);
      } else {
        const float f = static_cast<float>(v);
        blob.append(reinterpret_cast<const char*>(&f), 4);
      }
    }
    arrays.push_back({{"name", name}, {"role", role}, {"dtype", is_int ? "int64" : "float32"}, {"shape", t.shape},
                      {"offset", off}, {"nbytes", blob.size() - off}});
  };
  for (size_t i = 0; i < g.storages().size(); ++i) {
    const graph::Storage& st = g.storages()[i];
    if (st.producer != graph::kNoOp || st.first == graph::kNoTensor) continue;
    const char* role = st.category == Category::parameter ? "param"
                       : st.category == Category::buffer  ? "buffer"
                       : st.category == Category::input   ? "input"
                                                          : nullptr;
    if (!role) continue;
    const graph::Tensor& t = g.tensor(st.first);
    add(t.name, role, t, r.initial[i], false);
  }
  for (size_t i = 0; i < s.step.params.size(); ++i) {
    if (s.step.param_grads[i] == graph::kNoTensor || r.grads[i].empty()) continue;
    const graph::Tensor& p = g.tensor(s.step.params[i]);
    graph::Tensor gt = g.tensor(s.step.param_grads[i]);
    add(p.name, "grad", gt, r.grads[i], true);
  }
  const graph::ModelConfig& m = s.model;
  nlohmann::json h = {{"format", "actsim-torch-dump"},
                      {"version", 1},
                      {"model", schedule::model_json(m)},
                      {"dtype", std::string(graph::to_string(s.training.dtype))},
                      {"batch_size", s.training.batch_size},
                      {"loss", r.loss},
                      {"arrays", arrays}};
  return h.dump() + "\n" + blob;
}

}  // namespace actsim::replay
