// Batch scaling of a sweep: reference points, the affine model, its checks (batch_scaling.hpp).
#include "batch_scaling.hpp"

#include <algorithm>

#include "actsim/study/analyze.hpp"
#include "actsim/util/hash.hpp"

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

using graph::OpId;
using graph::StorageId;
using sim::DeviceSpec;
using sim::Observer;

// A hash of everything the engine reads from a graph except sizes, FLOPs and bytes moved.
uint64_t structure_hash(const graph::Graph& g) {
  util::Fnv1a h;
  auto ids = [&](const auto& v) {
    h.add_word(v.size());
    for (auto x : v) h.add_word(graph::index(x));
  };
  for (const graph::Op& op : g.ops()) {
    h.add_word(static_cast<uint64_t>(op.kind));
    h.add_word(static_cast<uint64_t>(op.phase));
    h.add_word(static_cast<uint64_t>(op.stream));
    h.add_word(static_cast<uint64_t>(op.kernels));
    h.add_word(op.forward == graph::kNoOp ? ~0ULL : graph::index(op.forward));
    ids(op.inputs), ids(op.outputs), ids(op.holds), ids(op.releases), ids(op.after);
  }
  for (const graph::Tensor& t : g.tensors()) {
    h.add_word(graph::index(t.storage));
    h.add_word(t.producer == graph::kNoOp ? ~0ULL : graph::index(t.producer));
    h.add_word((t.is_view ? 1 : 0) | static_cast<uint64_t>(t.dtype) << 1);
  }
  for (const graph::Storage& s : g.storages()) {
    h.add_word(s.producer == graph::kNoOp ? ~0ULL : graph::index(s.producer));
    h.add_word((s.keep ? 1 : 0) | static_cast<uint64_t>(s.location) << 1 | static_cast<uint64_t>(s.category) << 3);
  }
  return h.value();
}


ScaledStep::ScaledStep(graph::StepGraph lo, const graph::StepGraph& hi, int64_t b) : step_(std::move(lo)), lo_(b) {
  const graph::Graph &g = step_.graph, &h = hi.graph;
  ok_ = g.ops().size() == h.ops().size() && g.storages().size() == h.storages().size() &&
        structure_hash(g) == structure_hash(h);
  if (!ok_) return;
  storage_.reserve(g.storages().size());
  for (size_t i = 0; i < g.storages().size(); ++i) {
    storage_.push_back({g.storages()[i].bytes, h.storages()[i].bytes - g.storages()[i].bytes});
  }
  for (size_t i = 0; i < g.ops().size(); ++i) {
    const graph::Op &p = g.ops()[i], &q = h.ops()[i];
    workspace_.push_back({p.workspace_bytes, q.workspace_bytes - p.workspace_bytes});
    moved_.push_back({p.bytes_moved, q.bytes_moved - p.bytes_moved});
    flops_.push_back({p.flops, q.flops - p.flops});
  }
}

const graph::Graph* ScaledStep::at(int64_t b) {
  bool overflow = false;
  auto value = [&](const AffineI& a) {
    int64_t d = 0, v = 0;
    overflow |= __builtin_mul_overflow(a.slope, b - lo_, &d) || __builtin_add_overflow(a.at_lo, d, &v) || v < 0;
    return v;
  };
  step_.graph.rewrite_sizes([&](graph::Graph& g) {
    for (size_t i = 0; i < storage_.size(); ++i) g.mutable_storage(StorageId{static_cast<uint32_t>(i)}).bytes = value(storage_[i]);
    for (size_t i = 0; i < workspace_.size(); ++i) {
      graph::Op& op = g.mutable_op(OpId{static_cast<uint32_t>(i)});
      op.workspace_bytes = value(workspace_[i]);
      op.bytes_moved = value(moved_[i]);
      op.flops = flops_[i].at(b, lo_);
    }
  });
  return overflow ? nullptr : &step_.graph;
}

namespace {

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

}  // namespace

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
  (void)sim::simulate(*a.tables, list);
  r.start_live = std::move(obs.live);
  a.tables.reset();
  r.step = std::shared_ptr<const graph::StepGraph>(std::move(a.step));
  return r;
}

BatchModel::Eval BatchModel::eval(int64_t b, const sim::DeviceSpec& device, graph::Op& scratch) const {
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
    e.step_time_ns += sim::op_time_ns(g, scratch, device);
  }
  return e;
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

}  // namespace actsim::study
