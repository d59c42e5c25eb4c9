// CUDA kernels of the optimizer ops (in-place updates per graph::OptimStep, and temporaries).
#include "cuda_common.cuh"

namespace actsim::backends::cuda {

namespace {

// step += 1, in its own launch so that the update kernel after it reads the new value everywhere.
void bump_step(Context& c, const DView& step) {
  each(c, 1, [=] __device__(int64_t) { st(step, 0, ld(step, 0) + 1.f); });
}

}  // namespace

// Optimizer ops: in-place updates (inputs per graph::OptimStep) and temporaries.
void run_optim(Context& c, const Args& a) {
  const graph::OptimParams hp = a.op.params.optim;
  const double b1 = hp.beta1, b2 = hp.beta2, lr = hp.lr, wd = hp.weight_decay, eps = hp.eps;
  const bool decoupled = hp.decoupled;
  switch (hp.step) {
    case OptimStep::adam_moments: case OptimStep::adam_fused: {
      const DView p = a.in(0), g = a.in(1), m = a.in(2), v = a.in(3), step = a.in(4);
      bump_step(c, step);
      const bool fused = hp.step == OptimStep::adam_fused;
      each(c, p.n, [=] __device__(int64_t i) {
        float pv = ld(p, p.off(i)), gv = ld(g, g.off(i));
        if (wd != 0) {
          if (decoupled) pv = pv * static_cast<float>(1.0 - lr * wd);
          else gv = gv + static_cast<float>(wd) * pv;
        }
        const float mv = static_cast<float>(b1) * ld(m, m.off(i)) + static_cast<float>(1.0 - b1) * gv;
        const float vv = ld(v, v.off(i)) * static_cast<float>(b2) + static_cast<float>(1.0 - b2) * gv * gv;
        st(m, m.off(i), mv);
        st(v, v.off(i), vv);
        if (fused) {
          const double t = ld(step, 0);
          const float bc2s = static_cast<float>(sqrt(1.0 - pow(b2, t)));
          const float step_size = static_cast<float>(lr / (1.0 - pow(b1, t)));
          pv = pv - step_size * mv / (sqrtf(vv) / bc2s + static_cast<float>(eps));
        }
        st(p, p.off(i), pv);
      });
      return;
    }
    case OptimStep::adam_sqrt: {
      const DView v = a.in(0), step = a.in(1), o = a.out(0);
      const bool full = a.op.params.optim.full;
      each(c, o.n, [=] __device__(int64_t i) {
        float s = sqrtf(ld(v, v.off(i)));
        if (full) s = s / static_cast<float>(sqrt(1.0 - pow(b2, static_cast<double>(ld(step, 0))))) + static_cast<float>(eps);
        st(o, o.off(i), s);
      });
      return;
    }
    case OptimStep::adam_denom: {  // no output: in place on the input (2.x foreach's _foreach_div_/add_)
      const DView s = a.in(0), step = a.in(1), o = a.call.outputs.empty() ? a.in(0) : a.out(0);
      each(c, o.n, [=] __device__(int64_t i) {
        const float bc2s = static_cast<float>(sqrt(1.0 - pow(b2, static_cast<double>(ld(step, 0)))));
        st(o, o.off(i), ld(s, s.off(i)) / bc2s + static_cast<float>(eps));
      });
      return;
    }
    case OptimStep::adam_update: {
      const DView p = a.in(0), m = a.in(1), d = a.in(2), step = a.in(3);
      each(c, p.n, [=] __device__(int64_t i) {
        const float step_size = static_cast<float>(lr / (1.0 - pow(b1, static_cast<double>(ld(step, 0)))));
        st(p, p.off(i), ld(p, p.off(i)) + (-step_size) * ld(m, m.off(i)) / ld(d, d.off(i)));
      });
      return;
    }
    case OptimStep::sgd: {
      const DView p = a.in(0), g = a.in(1);
      each(c, p.n, [=] __device__(int64_t i) {
        const float pv = ld(p, p.off(i)), gv = ld(g, g.off(i)) + static_cast<float>(wd) * pv;
        st(p, p.off(i), pv + static_cast<float>(-lr) * gv);
      });
      return;
    }
    case OptimStep::sgd_momentum: {
      const DView p = a.in(0), g = a.in(1), buf = a.in(2);
      const float mom = static_cast<float>(hp.momentum);
      each(c, p.n, [=] __device__(int64_t i) {
        const float pv = ld(p, p.off(i)), gv = ld(g, g.off(i)) + static_cast<float>(wd) * pv;
        const float bv = ld(buf, buf.off(i)) * mom + gv;
        st(buf, buf.off(i), bv);
        st(p, p.off(i), pv + static_cast<float>(-lr) * bv);
      });
      return;
    }
    case OptimStep::none: unsupported("optimizer op without a step kind");
  }
}

}  // namespace actsim::backends::cuda
