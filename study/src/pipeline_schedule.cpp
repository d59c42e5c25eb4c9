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
      const int64_t warm = m == p ? total : std::min((p - s - 1) * 2 + (V - 1) * p, total);
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

// Note [Pipeline replay]: every stage runs its actions in its schedule's order on its compute
// stream, one at a time, so an action starts when the stage's previous action has ended and its
// input has arrived: a forward of virtual stage v needs virtual stage v - 1's forward of the same
// micro-batch plus the send of its output, a backward needs v + 1's backward plus the send of its
// input gradient. Sends and receives run beside the compute (their own stream), so they cost only
// the latency they add on that path. Memory does not depend on the times: each forward adds its
// micro-batch's held bytes (saved activations, its received input) until that micro-batch's
// backward, and each action's transient peak is its own single-micro-batch peak above everything
// else the stage holds. The first backward of a chunk creates its gradients (they stay); a later
// one peaks at the first's peak less the gradients it created then, since .grad exists and it
// adds into it in place.
PpResult run_pipeline(const std::vector<std::vector<PpAction>>& sched, const std::vector<PpSegment>& seg, int64_t p) {
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
  // Memory (Note [Pipeline replay]) and the optimizer step after the stage's last backward.
  int64_t busiest = 0;
  for (int64_t s = 0; s < p; ++s) {
    PpStageResult& st = r.stages[static_cast<size_t>(s)];
    int64_t live = 0, opt_ns = 0, opt_peak = 0, opt_end = 0;
    for (int64_t c = 0; c < V; ++c) {
      const PpSegment& sg = seg[static_cast<size_t>(c * p + s)];
      live += sg.base;
      opt_ns += sg.opt_ns;
      opt_peak = std::max(opt_peak, sg.opt_peak);
      opt_end += sg.opt_end;
    }
    int64_t peak = live, in_flight = 0, held = 0;
    std::vector<bool> grads(static_cast<size_t>(V), false);
    size_t span = 0;
    for (const PpAction& x : sched[static_cast<size_t>(s)]) {
      const PpSegment& sg = seg[static_cast<size_t>(x.chunk * p + s)];
      PpSpan& sp = st.spans[span++];  // pprank: the same order as the timing pass
      sp.live_before = live;
      int64_t cand;
      if (!x.backward) {
        cand = live + sg.fwd_peak;
        if (cand > peak) peak = cand, st.extra_held = held;
        live += sg.held, held += sg.held;
        st.max_in_flight = std::max(st.max_in_flight, ++in_flight);
      } else {
        const bool first = !grads[static_cast<size_t>(x.chunk)];
        cand = live - sg.held + (first ? sg.bwd_peak : sg.bwd_peak - sg.bwd_peak_grads);
        if (cand > peak) peak = cand, st.extra_held = held - sg.held;
        live -= sg.held, held -= sg.held, --in_flight;
        if (first) live += sg.grads, grads[static_cast<size_t>(x.chunk)] = true;
      }
      sp.peak = std::max({cand, sp.live_before, live});
      sp.live_after = live;
    }
    st.live_end_backward = live;
    if (live + opt_peak > peak) peak = live + opt_peak, st.extra_held = 0;
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
