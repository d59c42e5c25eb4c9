// Pipeline parallelism (issue 13, pp helper): the stage lowerings, their single-micro-batch
// segments and the replay of the schedule over the stages (pipeline_schedule.cpp).
#include "actsim/study/pipeline.hpp"

#include <algorithm>
#include <limits>
#include <map>
#include <string_view>
#include <variant>

#include "actsim/study/analyze.hpp"
#include "actsim/study/planner.hpp"
#include "actsim/util/error.hpp"

namespace actsim::study {

namespace {

// Live bytes per phase from one micro-batch's simulation: the peak of each phase, the gradients
// live at the backward's peak, the forward's peak before the loss, and a later micro-batch's
// backward peak (PpSegment::bwd_peak_later).
class PhasePeaks : public sim::Observer {
 public:
  // `produced`: (op, bytes) of each parameter's gradient, by the op that produces the tensor
  // (.grad), in op order; `node`: per op, the autograd node it belongs to; `loss_begin`: the
  // first op of the loss (the last stage; else past every op).
  PhasePeaks(const sim::StepTables& t, std::vector<std::pair<uint32_t, int64_t>> produced, std::vector<uint32_t> node,
             uint32_t loss_begin)
      : t_(t), produced_(std::move(produced)), node_(std::move(node)), loss_begin_(loss_begin) {
    for (const auto& [op, bytes] : produced_) pg_total_ += bytes;
  }
  void on_alloc(graph::StorageId s, graph::OpId by, int64_t, int64_t live) override {
    if (!t_.storage_on_host(s) && t_.storage_category(s) == static_cast<uint8_t>(graph::Category::gradient)) {
      grads_ += t_.storage_bytes(s);
    }
    retire(by);
    see(by, live);
  }
  void on_free(graph::StorageId s, graph::OpId by, int64_t, int64_t) override {
    if (!t_.storage_on_host(s) && t_.storage_category(s) == static_cast<uint8_t>(graph::Category::gradient)) {
      grads_ -= t_.storage_bytes(s);
    }
    retire(by);
  }
  void on_workspace(graph::OpId op, int64_t bytes, int64_t, int64_t live) override {
    retire(op);
    if (bytes > 0) see(op, live);
  }
  std::array<int64_t, 3> peak{};
  int64_t fwd_peak_body = 0;   // the forward's peak before loss_begin
  int64_t bwd_peak_later = 0;  // a later micro-batch's backward: .grad exists, new gradients retire
  int64_t grads_at_bwd_peak = 0;

 private:
  // A later backward's gradient of a parameter is a temporary: AccumulateGrad (which runs as
  // soon as its node has) adds it into .grad and frees it. Once an op of another node runs, the
  // gradients produced by earlier nodes are gone.
  void retire(graph::OpId op) {
    if (t_.phase(op) != graph::Phase::backward) return;
    const uint32_t k = graph::index(op);
    while (next_ < produced_.size() && produced_[next_].first < k && node_[produced_[next_].first] != node_[k]) {
      retired_ += produced_[next_++].second;
    }
  }
  void see(graph::OpId op, int64_t live) {
    const size_t ph = static_cast<size_t>(t_.phase(op));
    if (live > peak[ph]) {
      peak[ph] = live;
      if (ph == static_cast<size_t>(graph::Phase::backward)) grads_at_bwd_peak = grads_;
    }
    if (ph == static_cast<size_t>(graph::Phase::forward) && graph::index(op) < loss_begin_) fwd_peak_body = std::max(fwd_peak_body, live);
    if (ph == static_cast<size_t>(graph::Phase::backward)) bwd_peak_later = std::max(bwd_peak_later, live + pg_total_ - retired_);
  }
  const sim::StepTables& t_;
  std::vector<std::pair<uint32_t, int64_t>> produced_;
  std::vector<uint32_t> node_;
  uint32_t loss_begin_ = 0;
  size_t next_ = 0;
  int64_t pg_total_ = 0, grads_ = 0, retired_ = 0;
};

PpSegment segment_of(const Analysis& a, const Scenario& s) {
  const sim::StepTables& t = *a.tables;
  const graph::Graph& g = a.step->graph;
  // Each parameter's gradient (.grad) by the op producing it, once per storage (tied weights).
  std::vector<std::pair<uint32_t, int64_t>> produced;
  std::vector<bool> seen(g.storages().size(), false);
  int64_t pg_total = 0;
  for (graph::TensorId gr : a.step->param_grads) {
    if (gr == graph::kNoTensor) continue;
    const graph::Tensor& x = g.tensor(gr);
    if (seen[graph::index(x.storage)] || x.producer == graph::kNoOp) continue;
    seen[graph::index(x.storage)] = true;
    produced.emplace_back(graph::index(x.producer), t.storage_bytes(x.storage));
    pg_total += t.storage_bytes(x.storage);
  }
  std::sort(produced.begin(), produced.end());
  // The loss begins with the first op that reads the logits (the last stage): the first op of the
  // lowering's cross_entropy scope.
  const bool first = s.training.parallel.pp_embedding, last = s.training.parallel.pp_head;
  uint32_t loss_begin = std::numeric_limits<uint32_t>::max();
  graph::TensorId logits = graph::kNoTensor;
  if (last) {
    for (size_t i = 0; i < g.n_ops() && logits == graph::kNoTensor; ++i) {
      const graph::Op& o = g.op(graph::OpId{static_cast<uint32_t>(i)});
      if (o.name.find("cross_entropy") != std::string::npos && !o.inputs.empty()) {
        loss_begin = static_cast<uint32_t>(i);
        logits = o.inputs[0];
      }
    }
  }
  std::vector<uint32_t> node(g.n_ops());
  for (size_t i = 0; i < g.n_ops(); ++i) {
    const graph::OpId f = g.op(graph::OpId{static_cast<uint32_t>(i)}).forward;
    // A helper op of a node (a bias gradient's sum_to) has no forward op of its own.
    node[i] = f != graph::kNoOp ? graph::index(f) : i > 0 ? node[i - 1] : 0;
  }
  ACTSIM_ASSERT(!last || logits != graph::kNoTensor, "a last stage's loss is found by its ops' names (lowered with names)");
  PhasePeaks pk(t, std::move(produced), std::move(node), loss_begin);
  sim::Observer* obs[] = {&pk};
  const sim::SimResult r = sim::simulate(t, obs);
  int64_t recv = 0;
  for (const graph::Tensor& x : g.tensors()) {
    if (x.producer == graph::kNoOp && x.name == "pp.recv_activation") recv = t.storage_bytes(x.storage);
  }
  // ppdp: the live bytes at the end of backward as if the received input's gradient were still
  // held. The lowering drops it by pp.send_input_grad, which (a release, not an op of the phase)
  // ends the backward after it (r.live_end_backward counts it) unless DDP's finalize follows it.
  int64_t end_bwd = r.live_end_backward;
  {
    bool sent = false, after = false;
    for (size_t i = 0; i < g.n_ops(); ++i) {
      const graph::Op& o = g.op(graph::OpId{static_cast<uint32_t>(i)});
      const std::string_view nm = o.name;
      if (nm.size() >= 18 && nm.substr(nm.size() - 18) == "pp.send_input_grad") sent = true;  // in its scope
      else if (sent && o.phase == graph::Phase::backward && o.kind != graph::OpKind::zero_grad) after = true;
    }
    if (after) end_bwd += recv;  // the input's gradient has its shape and dtype
  }
  PpSegment sg;
  sg.base = r.live_step_start - recv;
  sg.held = r.live_end_forward - sg.base;
  sg.fwd_peak = std::max(pk.peak[0], r.live_step_start) - sg.base;
  sg.bwd_peak = std::max(pk.peak[1], r.live_end_forward) - sg.base;
  sg.bwd_peak_grads = pk.grads_at_bwd_peak;
  sg.grads = end_bwd - r.live_step_start;
  sg.opt_peak = std::max(pk.peak[2], end_bwd) - end_bwd;
  sg.opt_end = r.live_end_step - end_bwd;
  for (size_t i = 0; i < g.n_ops(); ++i) {
    const graph::OpId op{static_cast<uint32_t>(i)};
    if (t.stream(op) != 0) continue;
    if (t.phase(op) == graph::Phase::forward) sg.fwd_ns += t.duration_ns(op);
    else if (t.phase(op) == graph::Phase::backward) sg.bwd_ns += t.duration_ns(op);
  }
  sg.opt_ns = std::max<int64_t>(0, r.step_time_ns - r.phase_end_ns[1]);
  // The activation (forward) or its gradient (backward) to the neighbouring stage: NVLink when
  // the whole model's ranks fit one node, else the network (stages are the outermost coordinate,
  // as Megatron-LM orders ranks).
  const graph::ParallelConfig& p = s.training.parallel;
  // With tensor parallelism each tp rank sends to its peer: under sequence parallelism its
  // sequence shard (s/t tokens), without it the replicated output.
  const int64_t seq = p.tp > 1 && p.sp ? s.model.seq_len / p.tp : s.model.seq_len;
  const int64_t bytes = s.training.batch_size * seq * s.model.d_model * graph::dtype_size(s.training.dtype);
  const double bw = p.tp * p.dp * p.pp <= s.device.gpus_per_node ? s.device.link_bandwidth : s.device.network_bandwidth;
  sg.p2p_ns = (bw > 0 ? static_cast<int64_t>(static_cast<double>(bytes) / bw * 1e9 + 0.5) : 0) + s.device.link_latency_ns;
  // Note [PipelineStage's buffers]: torch.distributed.pipelining's PipelineStage allocates, when
  // the schedule first runs, one receive buffer per micro-batch for the activation it receives
  // (not on the first stage) and one for the gradient of its output (not on the last), reused by
  // every step and never freed; the lowering's received input is the first of them. The
  // schedule's step() splits the whole batch, m micro-batches of idx (first stage) or targets
  // (last stage), the caller's tensors: m - 1 more than the lowering's. The last stage's loss
  // of each micro-batch stays in the schedule's list until step() returns (no `losses` list passed).
  const int64_t m = p.pp_micro();
  int64_t inputs = 0;
  for (const graph::Tensor& x : g.tensors()) {
    if (x.producer == graph::kNoOp && x.name != "pp.recv_activation" && g.storage(x.storage).category == graph::Category::input) {
      inputs += t.storage_bytes(x.storage);
    }
  }
  sg.persist = (m - 1) * inputs + (first ? 0 : m * recv) + (last ? 0 : m * bytes);
  // The lowering's received input is one micro-batch's (live from the step's start): here it is
  // one of the persistent buffers, so not held per micro-batch.
  sg.held -= recv, sg.fwd_peak -= recv, sg.bwd_peak -= recv;
  sg.fwd_peak_body = last ? std::max(pk.fwd_peak_body, r.live_step_start) - r.live_step_start : sg.fwd_peak;
  sg.bwd_peak_later = std::max(pk.bwd_peak_later, r.live_end_forward + pg_total) - r.live_step_start;
  sg.out = last ? (logits != graph::kNoTensor ? t.storage_bytes(g.tensor(logits).storage) : 0) : bytes;
  sg.in_grad = first ? 0 : bytes;
  sg.out_sent = !last;
  // The lowering seeds a non-last stage's backward with a new gradient of its output, alive
  // through the backward; torch's seed is the gradient receive buffer, counted in persist.
  if (!last) sg.bwd_peak -= bytes, sg.bwd_peak_later -= bytes;
  // The lowering's gradient of the received input is released after the backward; torch's is
  // pinned by the send (in_grad), so not among the stage's gradients.
  sg.opt_mid = r.live_end_optimizer - end_bwd + sg.in_grad;
  sg.opt_end += sg.in_grad, sg.grads -= sg.in_grad;
  sg.opt_peak = std::max(pk.peak[2], end_bwd - sg.in_grad) - (end_bwd - sg.in_grad);
  if (last && a.step->loss != graph::kNoTensor) sg.loss = t.storage_bytes(g.tensor(a.step->loss).storage);
  return sg;
}

}  // namespace

Analysis analyze_pipeline(const Scenario& s, const graph::RuntimeProfile& runtime) {
  // ppdp (issue 13): checkpoint.policy = "budget:X" plans what a stage holds, not one micro-batch:
  // `plan`'s search on the worst stage, every candidate verified by replaying the whole pipeline
  // (the micro-batches in flight counted), so the worst stage peaks at most at X when any plan
  // fits (else the least-memory plan). Every stage runs the plan (it covers L/(pV) blocks).
  if (s.is_budget()) {
    Scenario planned = s;
    planned.checkpoint = plan_for_budget(s, std::get<graph::CheckpointPolicy>(s.checkpoint).budget_bytes).plan;
    Analysis a = analyze_pipeline(planned, runtime);
    a.scenario = s;
    return a;
  }
  const graph::ParallelConfig& p = s.training.parallel;
  const int64_t P = p.pp, V = p.pp_chunks, m = p.pp_micro(), n = P * V;
  ACTSIM_ASSERT(s.model.n_layers % n == 0, "layers split evenly (checked by the loader)");
  auto pl = std::make_shared<Pipeline>();
  pl->config = p;
  // One lowering per kind of virtual stage: 0 = first (embedding), 1 = middle, 2 = last (head).
  std::map<int, int> kind_index;
  std::vector<Scenario> kind_scenarios;
  auto kind_of = [&](int64_t vs) { return vs == 0 ? 0 : vs == n - 1 ? 2 : 1; };
  for (int64_t vs = 0; vs < n; ++vs) {
    const int k = kind_of(vs);
    if (kind_index.count(k)) continue;
    Scenario sk = s;
    sk.model.n_layers = s.model.n_layers / n;
    sk.training.parallel.pp_embedding = k == 0;
    sk.training.parallel.pp_head = k == 2;
    kind_index[k] = static_cast<int>(pl->kinds.size());
    pl->kinds.push_back(std::make_shared<Analysis>(analyze(sk, runtime)));
    kind_scenarios.push_back(std::move(sk));
  }
  std::vector<PpSegment> kind_seg;
  for (size_t i = 0; i < pl->kinds.size(); ++i) kind_seg.push_back(segment_of(*pl->kinds[i], kind_scenarios[i]));
  // ppdp: DDP inside each stage with more than one micro-batch: the no_sync backwards are the
  // stage's without DDP (Note [DDP inside a stage]), lowered once more per kind.
  if (p.dp > 1 && p.sharding == graph::Sharding::none && m > 1) {
    for (size_t i = 0; i < pl->kinds.size(); ++i) {
      Scenario plain = kind_scenarios[i];
      plain.training.parallel.dp = 1;
      const PpSegment ps = segment_of(analyze(plain, runtime), plain);
      PpSegment& sg = kind_seg[i];
      sg.ddp_nosync = true;
      sg.bwd_peak_nosync = ps.bwd_peak;
      sg.bwd_peak_later_nosync = ps.bwd_peak_later;
      sg.grads_nosync = ps.grads - sg.grads;  // gradient_as_bucket_view: the plain .grad
    }
  }
  pl->stage_kinds.assign(static_cast<size_t>(P), {});
  for (int64_t vs = 0; vs < n; ++vs) {
    const int ki = kind_index[kind_of(vs)];
    pl->segments.push_back(kind_seg[static_cast<size_t>(ki)]);
  }
  for (int64_t st = 0; st < P; ++st) {
    for (int64_t c = 0; c < V; ++c) pl->stage_kinds[static_cast<size_t>(st)].push_back(kind_index[kind_of(c * P + st)]);
  }
  pl->result = run_pipeline(pp_schedule(p.pp_schedule, P, m, V), pl->segments, P, p.pp_schedule);
  for (int64_t st = 1; st < P; ++st) {
    if (pl->result.stages[static_cast<size_t>(st)].peak_bytes > pl->result.stages[static_cast<size_t>(pl->worst)].peak_bytes) {
      pl->worst = static_cast<int>(st);
    }
  }
  // The analysis returned is the worst stage's: its first chunk's lowering with the stage's figures.
  Scenario sw = kind_scenarios[static_cast<size_t>(pl->stage_kinds[static_cast<size_t>(pl->worst)][0])];
  Analysis a = analyze(sw, runtime);
  apply_stage(a, *pl, pl->worst);
  a.scenario = s;
  a.pipeline = pl;
  return a;
}

void apply_stage(Analysis& a, const Pipeline& pl, int stage) {
  const PpStageResult& st = pl.result.stages[static_cast<size_t>(stage)];
  const std::vector<int>& kinds = pl.stage_kinds[static_cast<size_t>(stage)];
  sim::SimResult& r = a.result;
  r.peak_by_category[static_cast<size_t>(graph::Category::activation)] += st.peak_bytes - r.peak_bytes;
  r.peak_bytes = st.peak_bytes;
  r.step_time_ns = pl.result.step_time_ns;
  r.phase_end_ns = {st.forward_end_ns, st.backward_end_ns, st.end_ns};
  r.peak_phase = st.peak_phase;
  r.live_step_start = st.live_step_start;
  r.live_end_forward = st.live_end_forward;
  r.live_end_backward = st.live_end_backward;
  r.live_end_optimizer = st.live_end_optimizer;
  r.live_end_step = st.live_end_step;
  // More chunks than one (interleaved): the stage's static figures are its chunks' sums.
  for (size_t c = 1; c < kinds.size(); ++c) {
    const Analysis& k = *pl.kinds[static_cast<size_t>(kinds[c])];
    a.params_bytes += k.params_bytes;
    a.param_count += k.param_count;
    a.grads_bytes += k.grads_bytes;
    a.optimizer_bytes += k.optimizer_bytes;
    a.optimizer_host_bytes += k.optimizer_host_bytes;
    a.buffers_bytes += k.buffers_bytes;
    a.inputs_bytes += k.inputs_bytes;
  }
}

}  // namespace actsim::study
