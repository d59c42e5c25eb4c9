// Pipeline schedules and the cross-stage replay (issue 13, pp helper).
#include <algorithm>
#include <vector>

#include "actsim/study/pipeline.hpp"
#include "actsim/util/error.hpp"

namespace actsim::study {

std::vector<std::vector<PpAction>> pp_schedule(graph::PpSchedule kind, int64_t p, int64_t m, int64_t V) {
  std::vector<std::vector<PpAction>> out(static_cast<size_t>(p));
  auto F = [](int64_t mb, int64_t c) { return PpAction{false, static_cast<int32_t>(mb), static_cast<int32_t>(c)}; };
  auto B = [](int64_t mb, int64_t c) { return PpAction{true, static_cast<int32_t>(mb), static_cast<int32_t>(c)}; };
  for (int64_t s = 0; s < p; ++s) {
    std::vector<PpAction>& a = out[static_cast<size_t>(s)];
    if (kind == graph::PpSchedule::gpipe) {  // torch's ScheduleGPipe: every forward, then every backward
      for (int64_t i = 0; i < m; ++i) a.push_back(F(i, 0));
      for (int64_t i = 0; i < m; ++i) a.push_back(B(i, 0));
    } else if (kind == graph::PpSchedule::one_f_one_b) {  // PipeDream-Flush (Megatron's, torch's Schedule1F1B)
      const int64_t warm = std::min(p - s - 1, m);
      for (int64_t i = 0; i < warm; ++i) a.push_back(F(i, 0));
      for (int64_t i = 0; i < m - warm; ++i) a.push_back(F(warm + i, 0)), a.push_back(B(i, 0));
      for (int64_t i = m - warm; i < m; ++i) a.push_back(B(i, 0));
    } else {
      // Megatron-LM's forward_backward_pipelining_with_interleaving: micro-batches go through the
      // chunks in groups of p; step k of a stage is micro-batch (k / pV) p + k % p of chunk
      // (k % pV) / p (backward: the chunks in reverse).
      const int64_t total = m * V;
      // (torch's ScheduleInterleaved1F1B; Megatron-LM runs every forward first when m == p)
      const int64_t warm = std::min((p - s - 1) * 2 + (V - 1) * p, total);
      auto mb_of = [&](int64_t k) { return (k / (p * V)) * p + k % p; };
      auto fchunk = [&](int64_t k) { return (k % (p * V)) / p; };
      auto bchunk = [&](int64_t k) { return V - 1 - (k % (p * V)) / p; };
      for (int64_t k = 0; k < warm; ++k) a.push_back(F(mb_of(k), fchunk(k)));
      for (int64_t i = 0; i < total - warm; ++i) {
        a.push_back(F(mb_of(warm + i), fchunk(warm + i)));
        a.push_back(B(mb_of(i), bchunk(i)));
      }
      for (int64_t k = total - warm; k < total; ++k) a.push_back(B(mb_of(k), bchunk(k)));
    }
  }
  return out;
}

// Note [torch.distributed.pipelining's lifetimes]: what torch's schedules (ScheduleGPipe,
// Schedule1F1B; tests/torch/measure_pp.py measures them) keep alive beyond autograd's saved
// tensors, each found in the CPU profiler's allocation trace of a 2-rank gloo step:
// - the stage's output (the activation sent on, or the last stage's logits) stays in fwd_cache
//   until its micro-batch's backward returns; the schedule's local `output` keeps it until the
//   next forward_one_chunk returns (the last stage frees it before that micro-batch's loss), and
//   the last forward's until step() returns; in 1F1B the warm-up's last fired send (`send_work`,
//   micro-batch w - 2 of w warm-up forwards) keeps its output until the cool-down begins; GPipe's
//   fwd_sends_to_wait keeps every sent output until step() returns;
// - the gradient of a received input (sent back) is kept by the send ops until the next backward
//   returns (1F1B; GPipe's bwd_sends_to_wait keeps them all until step() returns);
// - each micro-batch's loss (last stage) stays in the schedule's list until step() returns;
// - a later backward adds into .grad: each parameter's new gradient is a temporary freed once
//   its AccumulateGrad has run (PpSegment::bwd_peak_later).
// Note [DDP inside a stage] (ppdp): with dp > 1 each stage's module is DDP on its dp group;
// PipelineStage runs every forward, and every backward but the stage's last, under no_sync, and
// prepares the reducer for the last one: .grad accumulates as without DDP, and only the last
// backward's hooks copy it into the persistent buckets, all-reduce them and copy them back (the
// lowering's single backward, hooks armed: its bucket_copy scalars and finalize). The buckets
// are in every step's base. With gradient_as_bucket_view the first backward still makes plain
// .grad tensors, which the last one's hooks replace by the buckets' views
// (PpSegment::grads_nosync). DDP broadcasts no buffers in a steady step (no forward runs outside
// no_sync). tests/torch/measure_pp.py dp=2 measures it.
// The interleaved schedule (torch's ScheduleInterleaved1F1B, Megatron-LM's order) runs on
// _PipelineScheduleRuntime, whose send_ops list keeps every send, so every sent output and input
// gradient, until step() returns; the last stage's logits go with their backward.
namespace {

struct StageMemory {
  int64_t start = 0, end_forward = 0, end = 0, peak = 0, extra_held = 0, max_in_flight = 0;
  graph::Phase peak_phase = graph::Phase::forward;
};

StageMemory stage_memory(const std::vector<PpAction>& acts, const std::vector<PpSegment>& seg, int64_t p, int64_t s,
                         graph::PpSchedule kind, std::vector<PpSpan>* spans = nullptr) {
  const int64_t V = static_cast<int64_t>(seg.size()) / p;
  const int64_t n = static_cast<int64_t>(acts.size());
  const bool torch_rules = kind != graph::PpSchedule::interleaved;  // Schedule1F1B's and ScheduleGPipe's locals
  // Release points: 3k + 1 after action k's module part (before its loss), 3k + 2 after it ends.
  const int64_t kEnd = 3 * n;
  auto after = [](int64_t k) { return 3 * k + 2; };
  auto seg_of = [&](const PpAction& x) -> const PpSegment& { return seg[static_cast<size_t>(x.chunk * p + s)]; };
  int64_t warm = 0;
  while (warm < n && !acts[static_cast<size_t>(warm)].backward) ++warm;
  int64_t cooldown = kEnd;  // after the backward that follows the last forward
  {
    int64_t last_f = -1;
    for (int64_t k = 0; k < n; ++k) if (!acts[static_cast<size_t>(k)].backward) last_f = k;
    for (int64_t k = last_f + 1; k < n; ++k) {
      if (acts[static_cast<size_t>(k)].backward) { cooldown = after(k); break; }
    }
  }
  auto find = [&](int64_t from, bool backward, int32_t mb, int32_t chunk) -> int64_t {
    for (int64_t k = from; k < n; ++k) {
      const PpAction& x = acts[static_cast<size_t>(k)];
      if (x.backward == backward && (mb < 0 || x.mb == mb) && x.chunk == chunk) return k;
    }
    return -1;
  };
  std::vector<std::pair<int64_t, int64_t>> pins;  // (release point, bytes)
  StageMemory out;
  int64_t live = 0, held = 0, in_flight = 0, losses = 0;
  for (int64_t c = 0; c < V; ++c) live += seg[static_cast<size_t>(c * p + s)].base + seg[static_cast<size_t>(c * p + s)].persist;
  out.start = live;
  out.peak = live;
  auto release = [&](int64_t point) {
    for (auto& [at, bytes] : pins) {
      if (at == point) live -= bytes, bytes = 0, at = -1;
    }
  };
  int64_t act_before = 0, act_peak = 0;  // pprank: the current action's live bytes, for its trace span
  auto see = [&](int64_t cand, int64_t others, graph::Phase ph) {
    if (cand > out.peak) out.peak = cand, out.extra_held = others, out.peak_phase = ph;
    act_peak = std::max(act_peak, cand);
  };
  std::vector<bool> grads(static_cast<size_t>(V), false);
  std::vector<int64_t> last_bwd(static_cast<size_t>(V), -1);  // ppdp: each chunk's last backward
  for (int64_t k = 0; k < n; ++k) {
    if (acts[static_cast<size_t>(k)].backward) last_bwd[static_cast<size_t>(acts[static_cast<size_t>(k)].chunk)] = k;
  }
  int32_t fwd_seen = 0;
  for (int64_t k = 0; k < n; ++k) {
    const PpAction& x = acts[static_cast<size_t>(k)];
    const PpSegment& sg = seg_of(x);
    act_before = act_peak = live;
    if (!x.backward) {
      see(live + sg.fwd_peak_body, held, graph::Phase::forward);
      release(3 * k + 1);
      see(live + sg.fwd_peak, held, graph::Phase::forward);
      live += sg.held, held += sg.held;
      out.max_in_flight = std::max(out.max_in_flight, ++in_flight);
      if (sg.out > 0) {
        int64_t at = kEnd;
        const int64_t b = find(k + 1, true, x.mb, x.chunk);
        if (b >= 0) at = after(b);
        if (!torch_rules && sg.out_sent) at = kEnd;  // the runtime's send_ops
        if (torch_rules) {
          const int64_t f = find(k + 1, false, -1, x.chunk);  // the next forward rebinds `output`
          at = std::max(at, f >= 0 ? 3 * f + 1 : kEnd);
          if (kind == graph::PpSchedule::gpipe && sg.out_sent) at = kEnd;  // fwd_sends_to_wait
          if (kind == graph::PpSchedule::one_f_one_b && warm >= 2 && fwd_seen == warm - 2) at = std::max(at, cooldown);
        }
        live += sg.out;
        pins.emplace_back(at, sg.out);
      }
      ++fwd_seen;
      out.end_forward = live;
    } else {
      const bool first = !grads[static_cast<size_t>(x.chunk)];
      // ppdp: under no_sync (every backward of a DDP stage but its last) the stage's own peaks;
      // the last's bwd_peak_later counts .grad whole, grads_nosync included.
      const bool nosync = sg.ddp_nosync && k != last_bwd[static_cast<size_t>(x.chunk)];
      const int64_t inc = first ? (nosync ? sg.bwd_peak_nosync : sg.bwd_peak)
                        : nosync ? sg.bwd_peak_later_nosync - (sg.grads + sg.grads_nosync - sg.loss)
                                 : sg.bwd_peak_later - (sg.grads - sg.loss) - sg.grads_nosync;
      see(live - sg.held + inc, held - sg.held, graph::Phase::backward);
      // The micro-batch's loss stays in the schedule's list until step() returns.
      live -= sg.held - sg.loss, held -= sg.held, --in_flight, losses += sg.loss;
      if (first) live += sg.grads - sg.loss + sg.grads_nosync, grads[static_cast<size_t>(x.chunk)] = true;
      // ppdp: the last backward's DDP hooks make .grad the buckets' views (Note [DDP inside a stage])
      if (k == last_bwd[static_cast<size_t>(x.chunk)]) live -= sg.grads_nosync;
      if (sg.in_grad > 0) {
        int64_t at = kEnd;  // GPipe's bwd_sends_to_wait, the interleaved runtime's send_ops
        if (kind == graph::PpSchedule::one_f_one_b) {
          const int64_t b = find(k + 1, true, -1, x.chunk);
          if (b >= 0) at = after(b);
        }
        live += sg.in_grad;
        pins.emplace_back(at, sg.in_grad);
      }
    }
    release(after(k));
    if (spans) {  // pprank: the same order as the timing pass
      PpSpan& sp = (*spans)[static_cast<size_t>(k)];
      sp.live_before = act_before;
      sp.peak = act_peak;
      sp.live_after = live;
    }
  }
  release(kEnd);
  out.end = live - losses;
  return out;
}

}  // namespace

// Note [Pipeline replay]: every stage runs its actions in its schedule's order on its compute
// stream, one at a time, so an action starts when the stage's previous action has ended and its
// input has arrived: a forward of virtual stage v needs virtual stage v - 1's forward of the same
// micro-batch plus the send of its output, a backward needs v + 1's backward plus the send of its
// input gradient. Sends and receives run beside the compute (their own stream), so they cost only
// the latency they add on that path. Memory does not depend on the times: each forward adds its
// micro-batch's held bytes (saved activations) until that micro-batch's backward, and each
// action's transient peak is its own single-micro-batch peak above everything else the stage
// holds (what the runtime keeps: Note [torch.distributed.pipelining's lifetimes]). The first
// backward of a chunk creates its gradients (they stay); a later one peaks at its own peak, .grad
// existing and its new gradients temporaries (PpSegment::bwd_peak_later).
PpResult run_pipeline(const std::vector<std::vector<PpAction>>& sched, const std::vector<PpSegment>& seg, int64_t p,
                      graph::PpSchedule kind) {
  const int64_t n_virtual = static_cast<int64_t>(seg.size());
  const int64_t V = n_virtual / p;
  int64_t m = 0;
  for (const auto& a : sched) for (const PpAction& x : a) m = std::max<int64_t>(m, x.mb + 1);
  PpResult r;
  r.stages.resize(static_cast<size_t>(p));
  std::vector<int64_t> fend(static_cast<size_t>(n_virtual * m), -1), bend(static_cast<size_t>(n_virtual * m), -1);
  auto at = [&](std::vector<int64_t>& v, int64_t vs, int64_t mb) -> int64_t& { return v[static_cast<size_t>(vs * m + mb)]; };
  std::vector<size_t> next(static_cast<size_t>(p), 0);
  std::vector<int64_t> free_at(static_cast<size_t>(p), 0);
  size_t left = 0;
  for (const auto& a : sched) left += a.size();
  while (left > 0) {
    bool progress = false;
    for (int64_t s = 0; s < p; ++s) {
      const auto& acts = sched[static_cast<size_t>(s)];
      size_t& k = next[static_cast<size_t>(s)];
      while (k < acts.size()) {
        const PpAction& x = acts[k];
        const int64_t vs = x.chunk * p + s;
        const PpSegment& sg = seg[static_cast<size_t>(vs)];
        int64_t ready = 0;
        if (!x.backward && vs > 0) {
          const int64_t e = at(fend, vs - 1, x.mb);
          if (e < 0) break;
          ready = e + seg[static_cast<size_t>(vs - 1)].p2p_ns;
        } else if (x.backward) {
          const int64_t own = at(fend, vs, x.mb);
          if (own < 0) break;
          ready = own;
          if (vs + 1 < n_virtual) {
            const int64_t e = at(bend, vs + 1, x.mb);
            if (e < 0) break;
            ready = std::max(ready, e + seg[static_cast<size_t>(vs + 1)].p2p_ns);
          }
        }
        const int64_t start = std::max(free_at[static_cast<size_t>(s)], ready);
        const int64_t end = start + (x.backward ? sg.bwd_ns : sg.fwd_ns);
        at(x.backward ? bend : fend, vs, x.mb) = end;
        free_at[static_cast<size_t>(s)] = end;
        PpStageResult& st = r.stages[static_cast<size_t>(s)];
        st.spans.push_back({.action = x, .start_ns = start, .end_ns = end});  // pprank: the trace's slices
        st.busy_ns += end - start;
        (x.backward ? st.backward_end_ns : st.forward_end_ns) = end;
        ++k, --left, progress = true;
      }
    }
    ACTSIM_ASSERT(progress, "pipeline schedule deadlocks (an action waits for one that never runs)");
  }
  // Memory (Note [Pipeline replay], Note [torch.distributed.pipelining's lifetimes]) and the
  // optimizer step after the stage's last backward.
  int64_t busiest = 0;
  for (int64_t s = 0; s < p; ++s) {
    PpStageResult& st = r.stages[static_cast<size_t>(s)];
    int64_t opt_ns = 0, opt_peak = 0, opt_mid = 0, opt_end = 0;
    for (int64_t c = 0; c < V; ++c) {
      const PpSegment& sg = seg[static_cast<size_t>(c * p + s)];
      opt_ns += sg.opt_ns;
      opt_peak = std::max(opt_peak, sg.opt_peak);
      opt_mid += sg.opt_mid;
      opt_end += sg.opt_end;
    }
    const StageMemory mem = stage_memory(sched[static_cast<size_t>(s)], seg, p, s, kind, &st.spans);
    st.live_step_start = mem.start;
    st.live_end_forward = mem.end_forward;
    st.max_in_flight = mem.max_in_flight;
    st.extra_held = mem.extra_held;
    st.peak_phase = mem.peak_phase;
    int64_t peak = mem.peak;
    const int64_t live = mem.end;
    st.live_end_backward = live;
    if (live + opt_peak > peak) peak = live + opt_peak, st.extra_held = 0, st.peak_phase = graph::Phase::optimizer;
    st.live_end_optimizer = live + opt_mid;
    st.live_end_step = live + opt_end;
    st.peak_bytes = peak;
    st.end_ns = st.backward_end_ns + opt_ns;
    st.spans.push_back({.action = {.backward = false, .mb = -1, .chunk = 0}, .start_ns = st.backward_end_ns, .end_ns = st.end_ns,
                        .live_before = live, .peak = live + std::max<int64_t>(0, opt_peak), .live_after = st.live_end_step});
    st.busy_ns += opt_ns;
    r.step_time_ns = std::max(r.step_time_ns, st.end_ns);
    busiest = std::max(busiest, st.busy_ns);
  }
  r.bubble_ns = r.step_time_ns - busiest;
  return r;
}

}  // namespace actsim::study
