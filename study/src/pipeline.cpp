// Pipeline parallelism (issue 13, pp helper): the stage lowerings, their single-micro-batch
// segments and the replay of the schedule over the stages (pipeline_schedule.cpp).
#include "actsim/study/pipeline.hpp"

#include <algorithm>
#include <map>

#include "actsim/study/analyze.hpp"
#include "actsim/util/error.hpp"

namespace actsim::study {

namespace {

// Live bytes per phase from one micro-batch's simulation: the peak of each phase and the
// gradients live at the backward's peak.
class PhasePeaks : public sim::Observer {
 public:
  explicit PhasePeaks(const sim::StepTables& t) : t_(t) {}
  void on_alloc(graph::StorageId s, graph::OpId by, int64_t, int64_t live) override {
    if (!t_.storage_on_host(s) && t_.storage_category(s) == static_cast<uint8_t>(graph::Category::gradient)) {
      grads_ += t_.storage_bytes(s);
    }
    see(by, live);
  }
  void on_free(graph::StorageId s, graph::OpId, int64_t, int64_t) override {
    if (!t_.storage_on_host(s) && t_.storage_category(s) == static_cast<uint8_t>(graph::Category::gradient)) {
      grads_ -= t_.storage_bytes(s);
    }
  }
  void on_workspace(graph::OpId op, int64_t bytes, int64_t, int64_t live) override {
    if (bytes > 0) see(op, live);
  }
  std::array<int64_t, 3> peak{};
  int64_t grads_at_bwd_peak = 0;

 private:
  void see(graph::OpId op, int64_t live) {
    const size_t ph = static_cast<size_t>(t_.phase(op));
    if (live > peak[ph]) {
      peak[ph] = live;
      if (ph == static_cast<size_t>(graph::Phase::backward)) grads_at_bwd_peak = grads_;
    }
  }
  const sim::StepTables& t_;
  int64_t grads_ = 0;
};

PpSegment segment_of(const Analysis& a, const Scenario& s) {
  const sim::StepTables& t = *a.tables;
  const graph::Graph& g = a.step->graph;
  PhasePeaks pk(t);
  sim::Observer* obs[] = {&pk};
  const sim::SimResult r = sim::simulate(t, obs);
  int64_t recv = 0;
  for (const graph::Tensor& x : g.tensors()) {
    if (x.producer == graph::kNoOp && x.name == "pp.recv_activation") recv = t.storage_bytes(x.storage);
  }
  PpSegment sg;
  sg.base = r.live_step_start - recv;
  sg.held = r.live_end_forward - sg.base;
  sg.fwd_peak = std::max(pk.peak[0], r.live_step_start) - sg.base;
  sg.bwd_peak = std::max(pk.peak[1], r.live_end_forward) - sg.base;
  sg.bwd_peak_grads = pk.grads_at_bwd_peak;
  sg.grads = r.live_end_backward - r.live_step_start;
  sg.opt_peak = std::max(pk.peak[2], r.live_end_backward) - r.live_end_backward;
  sg.opt_end = r.live_end_step - r.live_end_backward;
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
  return sg;
}

}  // namespace

Analysis analyze_pipeline(const Scenario& s, const graph::RuntimeProfile& runtime) {
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
  pl->stage_kinds.assign(static_cast<size_t>(P), {});
  for (int64_t vs = 0; vs < n; ++vs) {
    const int ki = kind_index[kind_of(vs)];
    pl->segments.push_back(kind_seg[static_cast<size_t>(ki)]);
  }
  for (int64_t st = 0; st < P; ++st) {
    for (int64_t c = 0; c < V; ++c) pl->stage_kinds[static_cast<size_t>(st)].push_back(kind_index[kind_of(c * P + st)]);
  }
  pl->result = run_pipeline(pp_schedule(p.pp_schedule, P, m, V), pl->segments, P);
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
  r.live_end_backward = st.live_end_backward;
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
