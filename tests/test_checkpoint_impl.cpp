// Tests of the two checkpoint implementations (issue 12, recipe 4): checkpoint.impl =
// nonreentrant | reentrant and checkpoint.preserve_rng_state, as torch/utils/checkpoint.py of the
// profile's PyTorch runs them. The figures pinned here are PyTorch 2.13's (tests/torch, GRID2);
// tests/torch/test_against_torch.py checks more configurations against both oracles.
#include <catch2/catch.hpp>

#include <string>
#include <vector>

#include "actsim/graph/profile.hpp"
#include "actsim/study/analyze.hpp"
#include "actsim/study/scenario.hpp"
#include "actsim/util/error.hpp"

using namespace actsim;

namespace {

// The worked example of the README: gpt2, 3 blocks, dropout 0.1, checkpoint.policy = full.
std::vector<std::string> example(const std::string& profile, const std::string& impl, const std::string& preserve,
                                 const std::string& policy = "full") {
  return {"runtime.profile=" + profile, "model.family=gpt2", "model.vocab_size=97", "model.seq_len=16",
          "model.d_model=32", "model.n_heads=4", "model.n_layers=3", "model.dropout=0.1",
          "training.batch_size=2", "training.optimizer_impl=for_loop", "checkpoint.policy=" + policy,
          "checkpoint.impl=" + impl, "checkpoint.preserve_rng_state=" + preserve};
}

study::Analysis run(const std::vector<std::string>& sets) { return study::analyze(study::load_scenario("", sets)); }

struct Counts {
  int stashes = 0;       // rng_stash ops
  int kept_stashes = 0;  // ... whose storage outlives the step
  int recomputes = 0;    // recompute ops
};

Counts counts(const study::Analysis& a) {
  Counts c;
  const graph::Graph& g = a.step->graph;
  for (const graph::Op& op : g.ops()) {
    if (op.recompute) ++c.recomputes;
    if (op.kind != graph::OpKind::rng_stash) continue;
    ++c.stashes;
    if (g.storage(g.tensor(op.outputs[0]).storage).keep) ++c.kept_stashes;
  }
  return c;
}

}  // namespace

TEST_CASE("checkpoint.impl: PyTorch 2.13's figures for both implementations, with and without the RNG stash",
          "[checkpoint][ckimpl]") {
  // tests/torch: measure.py n_layers=3 dropout=0.1 checkpoint=full checkpoint_impl=... preserve_rng_state=...
  struct Case {
    const char* impl;
    const char* preserve;
    int64_t peak, end_forward, end_step;
  };
  for (const Case& c : {Case{"nonreentrant", "true", 764784, 557824, 505252},
                        Case{"reentrant", "true", 779120, 557800, 520420},
                        Case{"reentrant", "false", 763952, 542632, 505252}}) {
    INFO(c.impl << " preserve_rng_state=" << c.preserve);
    const study::Analysis a = run(example("torch2-cpu", c.impl, c.preserve));
    CHECK(a.result.peak_bytes == c.peak);
    CHECK(a.result.live_end_forward == c.end_forward);
    CHECK(a.result.live_end_step == c.end_step);
  }
}

TEST_CASE("checkpoint.impl: the default is today's non-reentrant checkpoint, RNG state preserved", "[checkpoint][ckimpl]") {
  const study::Scenario s = study::load_scenario("", {});
  CHECK(s.training.checkpoint_impl == graph::CheckpointImpl::nonreentrant);
  CHECK(s.training.preserve_rng_state);
  std::vector<std::string> plain = example("torch2-cpu", "nonreentrant", "true");
  plain.resize(plain.size() - 2);
  const study::Analysis a = run(plain), b = run(example("torch2-cpu", "nonreentrant", "true"));
  CHECK(a.result.peak_bytes == b.result.peak_bytes);
  CHECK(a.result.live_end_forward == b.result.live_end_forward);
  CHECK(a.result.step_time_ns == b.result.step_time_ns);
}

TEST_CASE("checkpoint.impl: what each implementation keeps to restore the RNG", "[checkpoint][ckimpl]") {
  for (const char* profile : {"torch2-cpu", "torch-cpu"}) {
    INFO(profile);
    // Three calls: each stashes once in forward and once more while it recomputes (fork_rng).
    const Counts nt = counts(run(example(profile, "nonreentrant", "true")));
    CHECK(nt.stashes == 6);
    CHECK(nt.kept_stashes == 0);  // the frame dies with the call's last backward node
    const Counts rt = counts(run(example(profile, "reentrant", "true")));
    CHECK(rt.stashes == 6);
    CHECK(rt.kept_stashes == 3);  // ctx.fwd_cpu_state lives with the autograd graph
    CHECK(counts(run(example(profile, "nonreentrant", "false"))).stashes == 0);
    CHECK(counts(run(example(profile, "reentrant", "false"))).stashes == 0);
    // Reentrant's stashes outlive the step: 3 x 5056 B more at its end.
    const study::Analysis a = run(example(profile, "nonreentrant", "true"));
    const study::Analysis b = run(example(profile, "reentrant", "true"));
    CHECK(b.result.live_end_step - a.result.live_end_step == 3 * graph::kCpuRngStateBytes);
  }
}

TEST_CASE("checkpoint.impl: 2.x non-reentrant stops recomputing early, 1.13 and reentrant rerun the whole call",
          "[checkpoint][ckimpl]") {
  const int early = counts(run(example("torch2-cpu", "nonreentrant", "true"))).recomputes;
  const int whole_113 = counts(run(example("torch-cpu", "nonreentrant", "true"))).recomputes;
  const int whole_re = counts(run(example("torch2-cpu", "reentrant", "true"))).recomputes;
  CHECK(early < whole_113);
  CHECK(whole_re == whole_113);
  // Every forward op of each block runs again.
  const study::Analysis a = run(example("torch2-cpu", "reentrant", "true"));
  int in_blocks = 0;
  for (const graph::Op& op : a.step->graph.ops()) {
    in_blocks += op.phase == graph::Phase::forward && op.region >= 0;
  }
  CHECK(whole_re == in_blocks);
}

TEST_CASE("checkpoint.impl: reentrant applies to every:K, mlp, selective and the planner's plans", "[checkpoint][ckimpl]") {
  for (const char* policy : {"every:2", "mlp", "selective", "sqrt", "budget:800000"}) {
    INFO(policy);
    const study::Analysis nt = run(example("torch2-cpu", "nonreentrant", "true", policy));
    const study::Analysis rt = run(example("torch2-cpu", "reentrant", "true", policy));
    nt.step->graph.validate();
    rt.step->graph.validate();
    // The reentrant call's RNG stashes outlive the step, one per checkpoint call.
    CHECK(rt.result.live_end_step > nt.result.live_end_step);
    CHECK(counts(rt).kept_stashes > 0);
  }
}

TEST_CASE("checkpoint.impl: bad values are one-line InputErrors naming the key", "[checkpoint][ckimpl]") {
  auto error_of = [](const std::vector<std::string>& sets) -> std::string {
    try {
      (void)study::load_scenario("", sets);
    } catch (const InputError& e) {
      return e.what();
    }
    return "accepted";
  };
  std::string e = error_of({"checkpoint.impl=reentrent"});
  CHECK(e.find("--set: checkpoint.impl") != std::string::npos);
  CHECK(e.find("did you mean \"reentrant\"") != std::string::npos);
  e = error_of({"checkpoint.preserve_rng_state=yes"});
  CHECK(e.find("--set: checkpoint.preserve_rng_state") != std::string::npos);
  CHECK(e.find("expected true or false") != std::string::npos);
  // Selective activation checkpointing needs the non-reentrant implementation, in either order.
  for (const auto& sets : {std::vector<std::string>{"checkpoint.policy=ops:mm", "checkpoint.impl=reentrant"},
                           std::vector<std::string>{"checkpoint.impl=reentrant", "checkpoint.policy=ops:mm"}}) {
    e = error_of(sets);
    CHECK(e.find("--set: checkpoint.impl") != std::string::npos);
    CHECK(e.find("use_reentrant=False") != std::string::npos);
    CHECK(e.find('\n') == std::string::npos);
  }
  CHECK(error_of({"checkpoint.policy=ops:mm", "checkpoint.impl=nonreentrant"}) == "accepted");
}

TEST_CASE("checkpoint.impl: transformers' checkpointed layers keep their keyword arguments as long as the call",
          "[checkpoint][ckimpl]") {
  // GradientCheckpointingLayer checkpoints partial(layer.__call__, **kwargs): GPT-2's blocks get
  // position_ids (a (1, T) int64 tensor) that way. Reentrant keeps it on ctx.run_function, with the
  // autograd graph: past the step while the loop's `loss` is referenced (PyTorch 2.13 with
  // transformers 5.18, tests/torch/test_against_hf.py "gpt2 gradient checkpointing reentrant").
  const std::string hf = std::string(ACTSIM_SOURCE_DIR) + "/scenarios/hf/gpt2.json";
  auto with = [&](std::vector<std::string> more) {
    std::vector<std::string> o{"model.hf_config=" + hf, "model.n_layers=2", "model.seq_len=16",
                               "training.batch_size=1", "runtime.profile=torch2-cpu", "model.attention=eager",
                               "checkpoint.preserve_rng_state=false"};
    o.insert(o.end(), more.begin(), more.end());
    return run(o);
  };
  const study::Analysis none = with({});
  const study::Analysis re = with({"checkpoint.policy=full", "checkpoint.impl=reentrant"});
  const study::Analysis nonre = with({"checkpoint.policy=full"});
  CHECK(re.result.live_end_step == none.result.live_end_step + 16 * 8);
  CHECK(nonre.result.live_end_step == none.result.live_end_step);  // the frame is gone after backward
}
