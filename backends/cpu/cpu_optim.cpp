// CPU reference kernels of the optimizer step (docs/kernels.md, "Optimizer ops"; OptimStep in
// graph.hpp). Updates are in place on their inputs; optim_temp writes its one output.
#include <fmt/format.h>

#include <cmath>

#include "cpu_kernels.hpp"
#include "cpu_tensor.hpp"

namespace actsim::backends::cpu {

using graph::OptimStep;

namespace {

// Bias corrections from the step count t (the float32 'step' after this step's increment),
// computed in double as torch.optim does with Python floats.
struct Bias {
  double bc1, bc2;
};
Bias bias(const graph::OptimParams& o, double t) { return {1.0 - std::pow(o.beta1, t), 1.0 - std::pow(o.beta2, t)}; }

double step_value(const TensorArg& t) { return load<double>(t).at(0); }

// adam_moments on loaded vectors; returns the new step value.
template <class A>
double moments(const graph::OptimParams& o, std::vector<A>& p, const std::vector<A>& grad, std::vector<A>& m,
               std::vector<A>& v, const TensorArg& step) {
  std::vector<float> st = load<float>(step);
  st.at(0) += 1.0f;
  store(step, st);
  const A wd = static_cast<A>(o.weight_decay);
  const A b1 = static_cast<A>(o.beta1), b2 = static_cast<A>(o.beta2);
  const A decay = static_cast<A>(1.0 - o.lr * o.weight_decay);
  for (size_t i = 0; i < p.size(); ++i) {
    A g = grad[i];
    if (o.weight_decay != 0) {
      if (o.decoupled) p[i] *= decay;
      else g += wd * p[i];
    }
    m[i] = b1 * m[i] + (A(1) - b1) * g;
    v[i] = b2 * v[i] + (A(1) - b2) * g * g;
  }
  return st[0];
}

}  // namespace

template <class A>
void run_optimizer(const OpCall& c, const graph::Op& op) {
  const graph::OptimParams& o = op.params.optim;
  const auto& in = c.inputs;
  switch (o.step) {
    case OptimStep::adam_moments:
    case OptimStep::adam_fused: {
      std::vector<A> p = load<A>(in.at(0)), m = load<A>(in.at(2)), v = load<A>(in.at(3));
      const std::vector<A> g = load<A>(in.at(1));
      const double t = moments(o, p, g, m, v, in.at(4));
      if (o.step == OptimStep::adam_fused) {
        const Bias bc = bias(o, t);
        const A step_size = static_cast<A>(o.lr / bc.bc1), sq2 = static_cast<A>(std::sqrt(bc.bc2));
        const A eps = static_cast<A>(o.eps);
        for (size_t i = 0; i < p.size(); ++i) p[i] -= step_size * m[i] / (std::sqrt(v[i]) / sq2 + eps);
      }
      store(in[0], p);
      store(in[2], m);
      store(in[3], v);
      return;
    }
    case OptimStep::adam_sqrt:
    case OptimStep::adam_denom: {
      std::vector<A> x = load<A>(in.at(0));
      const Bias bc = bias(o, step_value(in.at(1)));
      const A sq2 = static_cast<A>(std::sqrt(bc.bc2)), eps = static_cast<A>(o.eps);
      const bool sqrt_first = o.step == OptimStep::adam_sqrt;
      const bool denom = o.step == OptimStep::adam_denom || o.full;
      for (A& e : x) {
        if (sqrt_first) e = std::sqrt(e);
        if (denom) e = e / sq2 + eps;
      }
      store(c.outputs.empty() ? in.at(0) : c.outputs.at(0), x);  // no output: in place (2.x foreach)
      return;
    }
    case OptimStep::adam_update: {
      std::vector<A> p = load<A>(in.at(0));
      const std::vector<A> m = load<A>(in.at(1)), d = load<A>(in.at(2));
      const Bias bc = bias(o, step_value(in.at(3)));
      const A step_size = static_cast<A>(o.lr / bc.bc1);
      for (size_t i = 0; i < p.size(); ++i) p[i] -= step_size * m[i] / d[i];
      store(in[0], p);
      return;
    }
    case OptimStep::sgd:
    case OptimStep::sgd_momentum: {
      std::vector<A> p = load<A>(in.at(0));
      std::vector<A> g = load<A>(in.at(1));
      const A lr = static_cast<A>(o.lr), wd = static_cast<A>(o.weight_decay), mom = static_cast<A>(o.momentum);
      if (o.weight_decay != 0) {
        for (size_t i = 0; i < p.size(); ++i) g[i] += wd * p[i];
      }
      if (o.step == OptimStep::sgd_momentum) {
        std::vector<A> buf = load<A>(in.at(2));
        for (size_t i = 0; i < p.size(); ++i) {
          buf[i] = mom * buf[i] + g[i];
          p[i] -= lr * buf[i];
        }
        store(in[2], buf);
      } else {
        for (size_t i = 0; i < p.size(); ++i) p[i] -= lr * g[i];
      }
      store(in[0], p);
      return;
    }
    case OptimStep::none: break;
  }
  throw std::runtime_error(fmt::format("cpu backend: optimizer op {} has no OptimStep", op.name));
}

template void run_optimizer<float>(const OpCall&, const graph::Op&);
template void run_optimizer<double>(const OpCall&, const graph::Op&);

}  // namespace actsim::backends::cpu
