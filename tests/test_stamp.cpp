// Block stamping (Note [Block stamping], graph/src/stamp.cpp): the stamped step graph is the full
// lowering's, id for id and field for field, and every figure simulated from it is the same.
#include <catch2/catch.hpp>
#include <fmt/format.h>

#include <optional>
#include <string>
#include <vector>

#include "actsim/graph/lower.hpp"
#include "actsim/study/analyze.hpp"
#include "actsim/study/resolve.hpp"
#include "actsim/study/scenario.hpp"
#include "actsim/sim/engine.hpp"
#include "actsim/util/error.hpp"

using namespace actsim;
using namespace actsim::graph;

namespace {

// The first difference between two step graphs, or "" when they are the same.
std::string difference(const StepGraph& a, const StepGraph& b) {
  const Graph &x = a.graph, &y = b.graph;
  if (x.ops().size() != y.ops().size()) return fmt::format("ops: {} vs {}", x.ops().size(), y.ops().size());
  if (x.tensors().size() != y.tensors().size()) return fmt::format("tensors: {} vs {}", x.tensors().size(), y.tensors().size());
  if (x.storages().size() != y.storages().size()) return fmt::format("storages: {} vs {}", x.storages().size(), y.storages().size());
  for (size_t i = 0; i < x.storages().size(); ++i) {
    const Storage &p = x.storages()[i], &q = y.storages()[i];
    if (p.bytes != q.bytes || p.category != q.category || p.location != q.location || p.producer != q.producer ||
        p.layer != q.layer || p.first != q.first || p.keep != q.keep) {
      return fmt::format("storage {} ({}): bytes {} {} producer {} {} layer {} {} first {} {} keep {} {}", i,
                         x.tensor(p.first).name, p.bytes, q.bytes, index(p.producer), index(q.producer), p.layer, q.layer,
                         index(p.first), index(q.first), p.keep, q.keep);
    }
  }
  for (size_t i = 0; i < x.tensors().size(); ++i) {
    const Tensor &p = x.tensors()[i], &q = y.tensors()[i];
    if (p.name != q.name || p.shape != q.shape || p.strides != q.strides || p.offset != q.offset || p.dtype != q.dtype ||
        p.storage != q.storage || p.producer != q.producer || p.is_view != q.is_view || p.requires_grad != q.requires_grad) {
      return fmt::format("tensor {} ({} vs {})", i, p.name, q.name);
    }
  }
  for (size_t i = 0; i < x.ops().size(); ++i) {
    const Op &p = x.ops()[i], &q = y.ops()[i];
    const bool same = p.kind == q.kind && p.phase == q.phase && p.layer == q.layer && p.name == q.name &&
                      p.inputs == q.inputs && p.outputs == q.outputs && p.saved == q.saved && p.holds == q.holds &&
                      p.releases == q.releases && p.workspace_bytes == q.workspace_bytes && p.flops == q.flops &&
                      p.bytes_moved == q.bytes_moved && p.kernels == q.kernels && p.forward == q.forward &&
                      p.grad_of == q.grad_of && p.grad_outputs == q.grad_outputs && p.n_grad_inputs == q.n_grad_inputs &&
                      p.grad_in_of == q.grad_in_of && p.stream == q.stream && p.after == q.after && p.region == q.region &&
                      p.cached == q.cached && p.offload == q.offload && p.recompute == q.recompute &&
                      p.params.view == q.params.view && p.params.dim0 == q.params.dim0 && p.params.dim1 == q.params.dim1 &&
                      p.params.start == q.params.start && p.params.step == q.params.step &&
                      p.params.optim.step == q.params.optim.step;
    if (!same) return fmt::format("op {} ({} vs {})", i, p.name, q.name);
  }
  if (a.params != b.params) return "params";
  if (a.param_grads != b.param_grads) return "param_grads";
  if (a.loss != b.loss) return "loss";
  if (x.n_layers != y.n_layers || x.micro_batches != y.micro_batches || x.last_micro_batch != y.last_micro_batch ||
      x.after_micro_batches != y.after_micro_batches || x.alloc_granularity != y.alloc_granularity) {
    return "graph fields";
  }
  return "";
}

// A small model of `layers` blocks under `more`, its step stamped and lowered in full.
struct Pair {
  std::optional<StepGraph> stamped;
  StepGraph full;
};
Pair lower_both(std::vector<std::string> more, bool names = true) {
  std::vector<std::string> o{"model.vocab_size=97", "model.seq_len=16", "model.d_model=32", "model.n_heads=4",
                             "training.batch_size=2"};
  o.insert(o.end(), more.begin(), more.end());
  const study::ResolvedStep r = study::resolve(study::load_scenario("", o));
  const LowerOptions opt{.names = names};
  Pair p{lower_stamped(r.model, r.training, *r.runtime, &r.plan, opt), {}};
  LowerOptions full = opt;
  full.stamp = false;
  p.full = lower_training_step(r.model, r.training, *r.runtime, &r.plan, full);
  return p;
}

}  // namespace

TEST_CASE("stamped step graphs equal the full lowering, field by field", "[stamp]") {
  const std::vector<std::vector<std::string>> cases = {
      {"model.family=llama", "model.n_layers=9"},
      {"model.family=gpt2", "model.n_layers=9"},
      {"model.family=gpt2", "model.n_layers=8", "model.dropout=0.1"},
      {"model.family=llama", "model.n_layers=12", "model.n_kv_heads=2"},
      {"model.family=llama", "model.n_layers=8", "model.attention=flash", "runtime.profile=torch2-cpu"},
      {"model.family=gpt2", "model.n_layers=8", "runtime.profile=torch-cpu"},
      {"model.family=gpt2", "model.n_layers=8", "model.attention=flash", "model.dropout=0.1"},
      {"model.family=llama", "model.n_layers=14", "model.d_ff=96", "checkpoint.policy=selective"},
      {"model.family=gpt2", "model.n_layers=14", "checkpoint.policy=selective", "model.dropout=0.1"},
      {"model.family=gpt2", "model.n_layers=8", "runtime.profile=torch2-cpu", "training.optimizer_impl=for_loop"},
      {"model.family=llama", "model.n_layers=8", "training.optimizer_impl=fused"},
      {"model.family=llama", "model.n_layers=8", "training.optimizer=sgd_momentum"},
      {"model.family=gpt2", "model.n_layers=8", "training.optimizer=adam", "training.weight_decay=0.1"},
      {"model.family=llama", "model.n_layers=8", "training.dtype=bf16"},
      {"model.family=llama", "model.n_layers=8", "training.autocast=bf16"},
      {"model.family=gpt2", "model.n_layers=8", "training.grad_accum_steps=3"},
      {"model.family=llama", "model.n_layers=10", "checkpoint.policy=full"},
      {"model.family=llama", "model.n_layers=10", "checkpoint.policy=selective"},
      {"model.family=gpt2", "model.n_layers=10", "checkpoint.policy=mlp"},
      {"model.family=llama", "model.n_layers=10", "checkpoint.policy=ops:mm,softmax"},
      {"model.family=llama", "model.n_layers=10", "checkpoint.policy=full", "training.grad_accum_steps=2"},
      {"model.family=llama", "model.n_layers=9", "parallel.tp=2"},
      {"model.family=gpt2", "model.n_layers=9", "parallel.tp=2", "parallel.sp=true", "model.dropout=0.1"},
      {"model.family=llama", "model.n_layers=9", "parallel.tp=2", "model.vocab_size=96", "parallel.tp_impl=dtensor", "training.optimizer_impl=for_loop"},
      {"model.family=llama", "model.n_layers=9", "parallel.tp=2", "model.vocab_size=96", "parallel.tp_impl=dtensor", "parallel.sp=true"},
      {"model.family=llama", "model.n_layers=9", "parallel.tp=2", "checkpoint.policy=selective"},
  };
  int stamped = 0;
  for (const auto& c : cases) {
    for (bool names : {true, false}) {
      INFO(fmt::format("{} names={}", fmt::join(c, " "), names));
      const Pair p = lower_both(c, names);
      REQUIRE(p.stamped.has_value());
      CHECK(difference(*p.stamped, p.full) == "");
      stamped += p.stamped ? 1 : 0;
    }
  }
  CHECK(stamped == static_cast<int>(2 * cases.size()));
}

TEST_CASE("stamping keeps runs of different modes apart", "[stamp]") {
  // Plans of runs of modes (the planner's shape: recomputed, then kept blocks), and random ones:
  // lower_training_step's graph is the unstamped one whether it stamps or gives up.
  const study::ResolvedStep r = study::resolve(study::load_scenario(
      "", {"model.family=llama", "model.vocab_size=97", "model.seq_len=16", "model.d_model=32", "model.n_heads=4",
           "model.n_layers=20", "training.batch_size=2"}));
  const BlockMode modes[] = {BlockMode::keep, BlockMode::recompute, BlockMode::selective, BlockMode::mlp,
                             BlockMode::ops};
  auto check = [&](const BlockPlan& plan) {
    const StepGraph st = lower_training_step(r.model, r.training, *r.runtime, &plan, {.names = true});
    const StepGraph full = lower_training_step(r.model, r.training, *r.runtime, &plan, {.stamp = false});
    CHECK(difference(st, full) == "");
    return lower_stamped(r.model, r.training, *r.runtime, &plan).has_value();
  };
  auto plan_of = [](const std::vector<BlockMode>& m) {
    BlockPlan p = block_plan(parse_policy("none", "test"), static_cast<int64_t>(m.size()));
    for (size_t i = 0; i < m.size(); ++i) {
      p.mode[i] = m[i];
      p.segment[i] = m[i] == BlockMode::recompute ? static_cast<int32_t>(i) : -1;
    }
    return p;
  };
  std::vector<BlockMode> three(20, BlockMode::keep);
  for (int i = 0; i < 7; ++i) three[static_cast<size_t>(i)] = BlockMode::recompute;
  for (int i = 14; i < 20; ++i) three[static_cast<size_t>(i)] = BlockMode::selective;
  CHECK(check(plan_of(three)));
  uint64_t seed = 12345;
  auto next = [&](uint64_t n) {  // a linear congruential generator: the same plans every run
    seed = seed * 6364136223846793005ULL + 1442695040888963407ULL;
    return (seed >> 33) % n;
  };
  int stamped = 0;
    for (int trial = 0; trial < 16; ++trial) {
    std::vector<BlockMode> m;
    while (m.size() < 20) {
      const BlockMode b = modes[next(5)];
      for (uint64_t k = 1 + next(12); k > 0 && m.size() < 20; --k) m.push_back(b);
    }
    INFO("trial " << trial);
    stamped += check(plan_of(m)) ? 1 : 0;
  }
  CHECK(stamped >= 8);
}

TEST_CASE("steps stamping cannot reproduce are lowered in full", "[stamp]") {
  auto stamped = [](std::vector<std::string> more) {
    std::vector<std::string> o{"model.vocab_size=97", "model.seq_len=16", "model.d_model=32", "model.n_heads=4",
                               "training.batch_size=2", "model.family=gpt2"};
    o.insert(o.end(), more.begin(), more.end());
    const study::ResolvedStep r = study::resolve(study::load_scenario("", o));
    return lower_stamped(r.model, r.training, *r.runtime, &r.plan).has_value();
  };
  CHECK_FALSE(stamped({"model.n_layers=5"}));                                   // no run of six
  CHECK_FALSE(stamped({"model.n_layers=12", "checkpoint.policy=every:2"}));     // segments span blocks
  CHECK_FALSE(stamped({"model.n_layers=12", "training.autocast=fp16"}));         // GradScaler sums over blocks
  CHECK_FALSE(stamped({"model.n_layers=12", "parallel.dp=2"}));                 // DDP's buckets span blocks
  CHECK_FALSE(stamped({"model.n_layers=12", "parallel.pp=2"}));                 // a stage's last block holds every block's lists
  CHECK_FALSE(stamped({"model.n_layers=12", "checkpoint.policy=full", "checkpoint.impl=reentrant"}));
  CHECK_FALSE(stamped({"model.n_layers=12", "checkpoint.policy=offload"}));      // prefetches reach across blocks
  CHECK(stamped({"model.n_layers=12"}));
}

TEST_CASE("a stamped step simulates to the same figures", "[stamp]") {
  // The seed's shape at 8 blocks: analyze() stamps; the figures are the unstamped lowering's.
  const study::Scenario s = study::load_scenario(ACTSIM_SOURCE_DIR "/scenarios/seed-gpt2-xl.toml", {"model.n_layers=8"});
  const study::ResolvedStep r = study::resolve(s);
  const StepGraph full = lower_training_step(r.model, r.training, *r.runtime, &r.plan, {.stamp = false});
  const study::Analysis a = study::analyze(s);
  const sim::SimResult f = sim::simulate(*sim::StepTables::try_build(full.graph, r.device));
  CHECK(a.result.peak_bytes == f.peak_bytes);
  CHECK(a.result.step_time_ns == f.step_time_ns);
  CHECK(a.step->graph.ops().size() == full.graph.ops().size());
}

TEST_CASE("stamping equals the full lowering across profiles, optimizers and dtypes", "[stamp]") {
  // Every combination of the options a stamped lowering meets, 8 or 11 blocks, names off (the
  // probes') and on: lower_training_step stamps, and its graph is the unstamped one.
  int stamped = 0, n = 0;
  for (const char* family : {"gpt2", "llama"}) {
    for (const char* profile : {"torch-cuda", "torch-cpu", "torch2-cpu"}) {
      for (const char* opt : {"adamw:foreach", "adamw:for_loop", "adam:fused", "sgd:foreach", "sgd_momentum:for_loop"}) {
        for (const char* dtype : {"fp32", "bf16", "autocast"}) {
          const std::string o(opt);
          std::vector<std::string> c{std::string("model.family=") + family, std::string("runtime.profile=") + profile,
                                     "training.optimizer=" + o.substr(0, o.find(':')),
                                     "training.optimizer_impl=" + o.substr(o.find(':') + 1),
                                     (n % 2) ? "model.n_layers=8" : "model.n_layers=11"};
          if (std::string(dtype) == "bf16") c.push_back("training.dtype=bf16");
          if (std::string(dtype) == "autocast") c.push_back("training.autocast=bf16");
          if (n % 3 == 0) c.push_back("checkpoint.policy=full");
          if (n % 5 == 1) c.push_back("checkpoint.preserve_rng_state=false");
          if (n % 7 == 2 && std::string(family) == "llama") c.push_back("model.tie_embeddings=true");
          if (n % 4 == 3) c.push_back("training.grad_accum_steps=2");
          if (n % 6 == 5) c.push_back("parallel.tp=2");
          ++n;
          std::vector<std::string> all{"model.vocab_size=97", "model.seq_len=16", "model.d_model=32", "model.n_heads=4",
                                       "training.batch_size=2"};
          all.insert(all.end(), c.begin(), c.end());
          study::Scenario s;
          try {
            s = study::load_scenario("", all);
          } catch (const InputError&) {
            continue;  // a combination the loader refuses (fused SGD on a CPU profile, ...)
          }
          const study::ResolvedStep r = study::resolve(s);
          const bool names = n % 2 == 0;
          INFO(fmt::format("{} names={}", fmt::join(c, " "), names));
          const StepGraph st = lower_training_step(r.model, r.training, *r.runtime, &r.plan, {.names = names});
          const StepGraph full = lower_training_step(r.model, r.training, *r.runtime, &r.plan, {.names = names, .stamp = false});
          CHECK(difference(st, full) == "");
          stamped += lower_stamped(r.model, r.training, *r.runtime, &r.plan).has_value() ? 1 : 0;
        }
      }
    }
  }
  CHECK(stamped >= 60);
}
