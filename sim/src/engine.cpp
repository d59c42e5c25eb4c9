#include "actsim/sim/engine.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <limits>
#include <queue>
#include <variant>

#include "actsim/util/error.hpp"
#include "actsim/sim/calibration.hpp"

namespace actsim::sim {

using graph::Category;
using graph::Graph;
using graph::index;
using graph::Location;
using graph::Op;
using graph::OpKind;
using graph::Phase;

// A ring collective over `group_size` ranks (issue 13): all-reduce moves 2 (N - 1) / N of the
// bytes through each rank's link in 2 (N - 1) steps; reduce-scatter, all-gather and broadcast
// (pipelined) half that. Inside a node the link is NVLink; a group larger than a node runs at the
// network's per-GPU bandwidth.
static int64_t collective_time_ns(const Op& op, const DeviceSpec& d) {
  const int64_t n = op.params.group_size;
  if (n <= 1) return 0;
  const double bw = n <= d.gpus_per_node ? d.link_bandwidth : d.network_bandwidth;
  const double steps = static_cast<double>(op.kind == OpKind::all_reduce ? 2 * (n - 1) : n - 1);
  const double frac = steps / static_cast<double>(n);
  const double s = bw > 0 ? frac * static_cast<double>(op.bytes_moved) / bw : 0;
  const double ns = s * 1e9 + 0.5 + steps * static_cast<double>(d.link_latency_ns);
  if (!(ns < 9.0e18)) return std::numeric_limits<int64_t>::max();
  return static_cast<int64_t>(ns);
}

int64_t op_time_ns(const Graph& g, const Op& op, const DeviceSpec& d) {
  if (op.kernels == 0) return 0;
  if (op.kind == OpKind::offload || op.kind == OpKind::prefetch) {
    // A copy over the host link (pinned memory, one direction at a time on the copy stream).
    const double s = d.host_bandwidth > 0 ? static_cast<double>(op.bytes_moved) / d.host_bandwidth : 0;
    return static_cast<int64_t>(s * 1e9 + 0.5) + d.launch_overhead_ns;
  }
  if (graph::is_collective(op.kind)) return collective_time_ns(op, d);
  graph::DType dt = graph::DType::f32;
  if (!op.outputs.empty()) dt = g.tensor(op.outputs[0]).dtype;
  else if (!op.inputs.empty()) dt = g.tensor(op.inputs[0]).dtype;
  if (!graph::is_floating(dt)) dt = graph::DType::f32;
  bool is_matmul = op.kind == OpKind::mm || op.kind == OpKind::addmm || op.kind == OpKind::bmm ||
                   op.kind == OpKind::flash_attention;
  if (op.kind == OpKind::backward) {
    OpKind fk = g.op(op.forward).kind;
    is_matmul = fk == OpKind::mm || fk == OpKind::addmm || fk == OpKind::bmm || fk == OpKind::flash_attention;
  }
  // Elementwise kernels run on the CUDA cores at the fp32 rate; matmuls on the tensor cores
  // (fp32 matmuls stay fp32: torch.backends.cuda.matmul.allow_tf32 is False by default).
  const double rate = is_matmul ? d.flops(dt) * d.matmul_efficiency : d.flops_fp32;
  const double compute_s = rate > 0 ? op.flops / rate : 0;
  const double memory_s = d.mem_bandwidth > 0 ? static_cast<double>(op.bytes_moved) / d.mem_bandwidth : 0;
  const double s = std::max(compute_s, memory_s);
  // Beyond ~292 years the conversion to int64 would be undefined: saturate, and let the tables'
  // checked total reject it (Note [Checked totals]).
  const double ns = s * 1e9 + 0.5 + static_cast<double>(op.kernels) * static_cast<double>(d.launch_overhead_ns);
  if (!(ns < 9.0e18)) return std::numeric_limits<int64_t>::max();
  return static_cast<int64_t>(s * 1e9 + 0.5) + static_cast<int64_t>(op.kernels) * d.launch_overhead_ns;
}

StepTables::StepTables(const Graph& g, const DeviceSpec& device, const Calibration* calibration)
    : StepTables(Unchecked{}, g, device, calibration) {
  if (!overflow_.empty()) throw ByteOverflow(overflow_);
}

std::optional<StepTables> StepTables::try_build(const Graph& g, const DeviceSpec& device, std::string* why,
                                                const Calibration* calibration) {
  StepTables t(Unchecked{}, g, device, calibration);
  if (t.overflow_.empty()) return t;
  if (why) *why = t.overflow_;
  return std::nullopt;
}

StepTables::StepTables(Unchecked, const Graph& g, const DeviceSpec& device, const Calibration* calibration) : g_(g) {
  const size_t n_ops = g.n_ops();
  const size_t n_st = g.storages().size();
  // Flat copies of what the passes below look up per tensor and per storage (dense arrays of ids
  // instead of the graph's large elements), each filled in one sequential walk.
  const size_t n_t = g.tensors().size();
  std::vector<uint32_t> t_storage(n_t), t_producer(n_t);  // [tensors]; producer UINT32_MAX = none
  std::vector<uint8_t> t_view(n_t);
  for (size_t k = 0; k < n_t; ++k) {
    const graph::Tensor& t = g.tensors()[k];
    t_storage[k] = index(t.storage);
    t_producer[k] = t.producer == graph::kNoOp ? UINT32_MAX : index(t.producer);
    t_view[k] = t.is_view ? 1 : 0;
  }
  std::vector<uint32_t> s_producer(n_st);  // [storages]
  for (size_t k = 0; k < n_st; ++k) {
    const graph::OpId p = g.storages()[k].producer;
    s_producer[k] = p == graph::kNoOp ? UINT32_MAX : index(p);
  }
  op_stream_.resize(n_ops);
  for (size_t k = 0; k < n_ops; ++k) op_stream_[k] = g.ops()[k].stream;

  use_count_.assign(n_st, 0);
  // A storage is used by its producer and by every op that reads, holds or releases one of its
  // tensors (or outputs a view of it); it is freed when the last of those ends.
  std::vector<uint32_t> last_seen(n_st, UINT32_MAX);
  alloc_begin_.reserve(n_ops + 1);
  use_begin_.reserve(n_ops + 1);
  dep_begin_.reserve(n_ops + 1);
  size_t n_uses = 0;
  for (const Op& op : g.ops()) n_uses += op.outputs.size() + op.inputs.size() + op.holds.size() + op.releases.size();
  uses_.reserve(n_uses);
  allocs_.reserve(n_st);
  uint32_t i = 0;
  for (const Op& op : g.ops()) {
    alloc_begin_.push_back(static_cast<uint32_t>(allocs_.size()));
    use_begin_.push_back(static_cast<uint32_t>(uses_.size()));
    auto use = [&](graph::TensorId t) {
      const uint32_t s = t_storage[index(t)];
      if (last_seen[s] == i) return;
      last_seen[s] = i;
      uses_.push_back(StorageId{s});
      ++use_count_[s];
    };
    for (graph::TensorId t : op.outputs) {
      const uint32_t s = t_storage[index(t)];
      if (!t_view[index(t)] && s_producer[s] == i) allocs_.push_back(StorageId{s});
      use(t);
    }
    for (graph::TensorId t : op.inputs) use(t);
    for (graph::TensorId t : op.holds) use(t);
    for (graph::TensorId t : op.releases) use(t);
    // Cross-stream dependencies: producers of an op's inputs that run on another stream.
    dep_begin_.push_back(static_cast<uint32_t>(deps_.size()));
    for (graph::TensorId t : op.inputs) {
      // The op allocating the storage (a view made later, e.g. of a prefetched copy, names no
      // producer of its own).
      uint32_t p = t_producer[index(t)];
      if (p == UINT32_MAX) p = s_producer[t_storage[index(t)]];
      if (p != UINT32_MAX && op_stream_[p] != op.stream) deps_.push_back(OpId{p});
    }
    for (OpId p : op.after) {
      if (op_stream_[index(p)] != op.stream) deps_.push_back(p);
    }
    ++i;
  }
  alloc_begin_.push_back(static_cast<uint32_t>(allocs_.size()));
  use_begin_.push_back(static_cast<uint32_t>(uses_.size()));
  dep_begin_.push_back(static_cast<uint32_t>(deps_.size()));
  st_bytes_.resize(n_st);
  st_cat_.resize(n_st);
  st_host_.resize(n_st);
  size_t k = 0;
  for (const graph::Storage& st : g.storages()) {
    // Storages that exist before the step stay unless an op releases them (none does today).
    if (st.producer == graph::kNoOp || st.keep) use_count_[k] = -1;
    st_bytes_[k] = st.location == Location::host ? st.bytes : g.allocated(st.bytes);
    st_cat_[k] = static_cast<uint8_t>(st.category);
    st_host_[k] = st.location == Location::host;
    ++k;
  }
  op_ws_.reserve(n_ops);
  op_phase_.reserve(n_ops);
  duration_ns_.reserve(n_ops);
  for (const Op& op : g.ops()) {
    op_ws_.push_back(op.workspace_bytes > 0 ? g.allocated(op.workspace_bytes) : 0);
    op_phase_.push_back(static_cast<uint8_t>(op.phase));
    duration_ns_.push_back(calibration ? calibration->op_time_ns(g, op, device) : op_time_ns(g, op, device));
  }
  // Note [Checked totals]: every sum the event loop forms (live bytes, per category, on the
  // host, a report's saved bytes) is at most the sum of every storage and workspace, and every
  // time at most the sum of every duration (streams overlap, they never add). Proven here to fit
  // int64, so the loop itself needs no checked arithmetic and never wraps to a negative answer.
  int64_t total_bytes = 0, total_ns = 0;
  auto add = [](int64_t& total, int64_t x) { return x >= 0 && !__builtin_add_overflow(total, x, &total); };
  bool ok = true;
  for (int64_t b : st_bytes_) ok = ok && add(total_bytes, b);
  for (int64_t b : op_ws_) ok = ok && add(total_bytes, b);
  if (!ok) {
    overflow_ = "the step's byte counts (all storages and workspaces together) overflow int64";
    return;
  }
  for (int64_t t : duration_ns_) ok = ok && add(total_ns, t);
  // Gradient accumulation charges one micro-batch's time micro_batches - 2 more times (Note
  // [Micro-batches]); that time is at most the whole step's.
  int64_t repeated_ns = 0;
  if (g.micro_batches > 2) ok = ok && !__builtin_mul_overflow(g.micro_batches - 2, total_ns, &repeated_ns) &&
                                add(total_ns, repeated_ns);
  if (!ok) overflow_ = "the step's simulated time (all op durations together) overflows int64 nanoseconds";
}

std::span<const StorageId> StepTables::allocs(OpId op) const {
  return {allocs_.data() + alloc_begin_[index(op)], allocs_.data() + alloc_begin_[index(op) + 1]};
}
std::span<const StorageId> StepTables::uses(OpId op) const {
  return {uses_.data() + use_begin_[index(op)], uses_.data() + use_begin_[index(op) + 1]};
}
std::span<const OpId> StepTables::cross_stream_deps(OpId op) const {
  return {deps_.data() + dep_begin_[index(op)], deps_.data() + dep_begin_[index(op) + 1]};
}

namespace {

// Note [Micro-batches]: with gradient accumulation the graph holds the first micro-batch and one
// later micro-batch (Note [Gradient accumulation] in graph/src/lower.cpp), which stands for the
// N - 1 later ones: each starts from the same live bytes and runs the same ops, so simulating it
// once gives every byte of the sequence (the peak, the last micro-batch's boundaries). Its time
// is charged N - 1 times: ops after it start N - 2 of its durations after it ends (observers see
// an idle stretch there), and its events are counted N - 1 times.
struct OpStart {
  OpId op;
};
struct OpEnd {
  OpId op;
};
struct Event {
  int64_t time_ns;
  uint64_t seq;
  std::variant<OpStart, OpEnd> what;
  bool operator>(const Event& o) const { return time_ns != o.time_ns ? time_ns > o.time_ns : seq > o.seq; }
};

class Engine {
 public:
  Engine(const StepTables& p, std::span<Observer* const> obs) : p_(p), g_(p.graph()), obs_(obs) {}

  SimResult run();

 private:
  void push(int64_t t, std::variant<OpStart, OpEnd> w) { q_.push({t, seq_++, w}); }
  void try_start(int32_t stream, int64_t now);
  void on(const OpStart& e, int64_t now);
  void on(const OpEnd& e, int64_t now);
  void alloc(StorageId s, OpId by, int64_t now);
  void free(StorageId s, OpId by, int64_t now);

  const StepTables& p_;
  const Graph& g_;
  std::span<Observer* const> obs_;
  std::priority_queue<Event, std::vector<Event>, std::greater<>> q_;
  uint64_t seq_ = 0;
  SimResult r_;
  int64_t live_ = 0, host_live_ = 0, mem_events_ = 0, peak_event_ = -1;
  std::array<int64_t, graph::kNumCategories> live_cat_{};
  std::vector<int32_t> remaining_;        // [storages] uses left
  std::vector<int64_t> alloc_ev_, free_ev_;  // [storages] memory-event index (-1 = none)
  std::vector<std::vector<uint32_t>> stream_ops_;  // per stream, op indices in order
  std::vector<size_t> stream_next_;
  std::vector<bool> stream_busy_;
  std::vector<bool> done_;
  std::array<uint32_t, 3> last_of_phase_{UINT32_MAX, UINT32_MAX, UINT32_MAX};
  // Note [Micro-batches]: the later micro-batch's ops [rep_begin_, rep_end_) and the time and
  // events charged for the rep_extra_ identical micro-batches after it.
  uint32_t rep_begin_ = UINT32_MAX, rep_end_ = UINT32_MAX;
  int64_t rep_extra_ = 0, rep_t0_ = -1, rep_ev0_ = 0, rep_left_ = 0, gate_ns_ = 0, extra_events_ = 0;
  bool rep_done_ = true;
};

void Engine::alloc(StorageId s, OpId by, int64_t now) {
  const int64_t bytes = p_.storage_bytes(s);
  alloc_ev_[index(s)] = mem_events_++;
  if (p_.storage_on_host(s)) {
    host_live_ += bytes;
    r_.host_bytes = std::max(r_.host_bytes, host_live_);
  } else {
    live_ += bytes;
    live_cat_[p_.storage_category(s)] += bytes;
  }
  for (Observer* o : obs_) o->on_alloc(s, by, now, live_);
}

void Engine::free(StorageId s, OpId by, int64_t now) {
  const int64_t bytes = p_.storage_bytes(s);
  free_ev_[index(s)] = mem_events_++;
  if (p_.storage_on_host(s)) {
    host_live_ -= bytes;
  } else {
    live_ -= bytes;
    live_cat_[p_.storage_category(s)] -= bytes;
  }
  for (Observer* o : obs_) o->on_free(s, by, now, live_);
}

void Engine::try_start(int32_t stream, int64_t now) {
  if (stream_busy_[stream] || stream_next_[stream] >= stream_ops_[stream].size()) return;
  OpId op{stream_ops_[stream][stream_next_[stream]]};
  for (OpId d : p_.cross_stream_deps(op)) {
    if (!done_[index(d)]) return;  // retried when that producer ends
  }
  if (index(op) >= rep_end_ && !rep_done_) return;  // after the micro-batches: retried when they end
  stream_busy_[stream] = true;
  ++stream_next_[stream];
  push(index(op) >= rep_end_ ? std::max(now, gate_ns_) : now, OpStart{op});
}

void Engine::on(const OpStart& e, int64_t now) {
  if (index(e.op) == rep_begin_) rep_t0_ = now, rep_ev0_ = r_.events + mem_events_;
  for (Observer* o : obs_) o->on_op_start(e.op, now);
  for (StorageId s : p_.allocs(e.op)) alloc(s, e.op, now);
  const int64_t ws = p_.workspace_bytes(e.op);
  if (ws > 0) {
    live_ += ws;
    live_cat_[static_cast<size_t>(Category::temporary)] += ws;
    ++mem_events_;
    for (Observer* o : obs_) o->on_workspace(e.op, ws, now, live_);
  }
  if (live_ > r_.peak_bytes) {
    r_.peak_bytes = live_;
    r_.peak_time_ns = now;
    r_.peak_op = e.op;
    r_.peak_phase = p_.phase(e.op);
    r_.peak_by_category = live_cat_;
    peak_event_ = mem_events_ - 1;
  }
  push(now + p_.duration_ns(e.op), OpEnd{e.op});
}

void Engine::on(const OpEnd& e, int64_t now) {
  const int64_t ws = p_.workspace_bytes(e.op);
  if (ws > 0) {
    live_ -= ws;
    live_cat_[static_cast<size_t>(Category::temporary)] -= ws;
    ++mem_events_;
    for (Observer* o : obs_) o->on_workspace(e.op, -ws, now, live_);
  }
  for (StorageId s : p_.uses(e.op)) {
    int32_t& left = remaining_[index(s)];
    if (left > 0 && --left == 0) free(s, e.op, now);
  }
  for (Observer* o : obs_) o->on_op_end(e.op, now);
  done_[index(e.op)] = true;
  const uint32_t i = index(e.op);
  if (i == last_of_phase_[0]) r_.live_end_forward = live_, r_.phase_end_ns[0] = now;
  if (i == last_of_phase_[1]) r_.live_end_backward = live_, r_.phase_end_ns[1] = now;
  if (i == last_of_phase_[2]) r_.live_end_optimizer = live_, r_.phase_end_ns[2] = now;
  if (i >= rep_begin_ && i < rep_end_ && --rep_left_ == 0) {
    // Note [Micro-batches]: the later micro-batch has run once; the rep_extra_ more like it take
    // as long, allocate and free alike, and end where it ended. What follows starts after them;
    // the last micro-batch's phases end that much later.
    rep_done_ = true;
    const int64_t gap = rep_extra_ * (now - rep_t0_);
    gate_ns_ = now + gap;
    extra_events_ = rep_extra_ * (r_.events + mem_events_ - rep_ev0_);
    for (size_t k = 0; k < 2; ++k) {
      if (last_of_phase_[k] >= rep_begin_ && last_of_phase_[k] < rep_end_) r_.phase_end_ns[k] += gap;
    }
  }
  stream_busy_[p_.stream(e.op)] = false;
  for (size_t s = 0; s < stream_ops_.size(); ++s) try_start(static_cast<int32_t>(s), now);
}

SimResult Engine::run() {
  const size_t n_st = g_.storages().size();
  remaining_.resize(n_st);
  alloc_ev_.assign(n_st, -1);
  free_ev_.assign(n_st, -1);
  done_.assign(g_.n_ops(), false);
  for (size_t s = 0; s < n_st; ++s) remaining_[s] = p_.use_count(StorageId{static_cast<uint32_t>(s)});
  // Parameters, buffers, optimizer state and inputs exist before the step.
  for (size_t s = 0; s < n_st; ++s) {
    const graph::Storage& st = g_.storages()[s];
    if (st.producer != graph::kNoOp) continue;
    const int64_t bytes = p_.storage_bytes(StorageId{static_cast<uint32_t>(s)});
    if (st.location == Location::host) {
      host_live_ += bytes;
    } else {
      live_ += bytes;
      live_cat_[static_cast<size_t>(st.category)] += bytes;
    }
  }
  r_.host_bytes = host_live_;
  r_.live_step_start = r_.peak_bytes = live_;
  r_.step_start_by_category = r_.peak_by_category = live_cat_;
  for (size_t i = 0; i < g_.n_ops(); ++i) {
    const Op& op = g_.ops()[i];
    if (static_cast<size_t>(op.stream) >= stream_ops_.size()) stream_ops_.resize(op.stream + 1);
    stream_ops_[op.stream].push_back(static_cast<uint32_t>(i));
    if (op.kind != OpKind::zero_grad) last_of_phase_[static_cast<size_t>(op.phase)] = static_cast<uint32_t>(i);
  }
  if (g_.micro_batches > 2 && g_.last_micro_batch != graph::kNoOp) {
    rep_begin_ = index(g_.last_micro_batch);
    rep_end_ = index(g_.after_micro_batches);
    rep_extra_ = g_.micro_batches - 2;
    rep_left_ = static_cast<int64_t>(rep_end_ - rep_begin_);
    rep_done_ = rep_left_ == 0;
  }
  stream_next_.assign(stream_ops_.size(), 0);
  stream_busy_.assign(stream_ops_.size(), false);
  for (size_t s = 0; s < stream_ops_.size(); ++s) try_start(static_cast<int32_t>(s), 0);
  int64_t now = 0;
  while (!q_.empty()) {
    Event ev = q_.top();
    q_.pop();
    ACTSIM_ASSERT(ev.time_ns >= now, "simulated time went backwards");
    now = ev.time_ns;
    ++r_.events;
    std::visit([&](const auto& e) { on(e, now); }, ev.what);
  }
  for (size_t s = 0; s < stream_ops_.size(); ++s) {
    ACTSIM_ASSERT(stream_next_[s] == stream_ops_[s].size(), "ops left unscheduled (a dependency never ran)");
  }
  r_.events += mem_events_ + extra_events_;
  r_.step_time_ns = now;
  r_.live_end_step = live_;
  // Storages live at the peak: allocated at or before the peak's event and not freed by then.
  for (size_t s = 0; s < n_st; ++s) {
    const graph::Storage& st = g_.storages()[s];
    if (st.location == Location::host) continue;
    const bool pre = st.producer == graph::kNoOp;
    const bool allocated = pre || (alloc_ev_[s] >= 0 && alloc_ev_[s] <= peak_event_);
    const bool freed = free_ev_[s] >= 0 && free_ev_[s] <= peak_event_;
    if (allocated && !freed) r_.live_at_peak.push_back(StorageId{static_cast<uint32_t>(s)});
  }
  if (r_.peak_op == graph::kNoOp && g_.n_ops() > 0) r_.peak_op = OpId{0};
  return r_;
}

}  // namespace

SimResult simulate(const StepTables& tables, std::span<Observer* const> observers) {
  Engine e(tables, observers);
  return e.run();
}

}  // namespace actsim::sim
