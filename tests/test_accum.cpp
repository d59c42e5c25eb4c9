// Gradient accumulation (training.grad_accum_steps, issue 12 recipe 2): the lowered micro-batches,
// AccumulateGrad's in-place add, the engine's repetition of the later micro-batch, the summary.
#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <string>
#include <vector>

#include "actsim/graph/lower.hpp"
#include "actsim/graph/profile.hpp"
#include "actsim/report/summary.hpp"
#include "actsim/sim/event_log.hpp"
#include "actsim/study/analyze.hpp"
#include "actsim/study/make_schedule.hpp"
#include "actsim/study/scenario.hpp"
#include "actsim/util/error.hpp"

using namespace actsim;

namespace {

// The oracle's small configuration (tests/torch/measure.py's defaults) under torch2-cpu.
std::vector<std::string> small(const std::string& family, int64_t n, std::vector<std::string> more = {}) {
  std::vector<std::string> sets{"runtime.profile=torch2-cpu", "model.family=" + family, "model.vocab_size=97",
                                "model.seq_len=16", "model.d_model=32", "model.n_heads=4", "model.n_layers=2",
                                "training.batch_size=2", "training.optimizer_impl=for_loop",
                                "training.grad_accum_steps=" + std::to_string(n)};
  sets.insert(sets.end(), more.begin(), more.end());
  return sets;
}

study::Analysis run(const std::string& family, int64_t n, std::vector<std::string> more = {}) {
  return study::analyze(study::load_scenario("", small(family, n, std::move(more))));
}

}  // namespace

TEST_CASE("lower: accumulation creates .grad once, the later micro-batch adds into it in place", "[accum]") {
  for (const char* family : {"gpt2", "llama"}) {
    const study::Analysis one = run(family, 1), two = run(family, 2);
    const graph::Graph& g = two.step->graph;
    CHECK(g.micro_batches == 2);
    CHECK(one.step->graph.micro_batches == 1);
    REQUIRE(g.last_micro_batch != graph::kNoOp);
    // Gradient storages: one per parameter, as without accumulation.
    int grads = 0, adds = 0;
    for (const graph::Storage& st : g.storages()) grads += st.category == graph::Category::gradient;
    int grads_one = 0;
    for (const graph::Storage& st : one.step->graph.storages()) grads_one += st.category == graph::Category::gradient;
    CHECK(grads == grads_one);
    CHECK(two.grads_bytes == one.grads_bytes);
    for (size_t i = graph::index(g.last_micro_batch); i < graph::index(g.after_micro_batches); ++i) {
      const graph::Op& op = g.ops()[i];
      // AccumulateGrad's `variable_grad += new_grad`: in place, into the first micro-batch's .grad
      if (op.kind == graph::OpKind::accumulate &&
          g.storage(g.tensor(op.inputs[0]).storage).category == graph::Category::gradient) {
        ++adds;
        CHECK(op.outputs.empty());
        CHECK(std::find(two.step->param_grads.begin(), two.step->param_grads.end(), op.inputs[0]) !=
              two.step->param_grads.end());
      }
    }
    CHECK(adds == static_cast<int>(two.step->params.size()));
    // One micro-batch's saved activations: the plain step's plus the division's wrapped number.
    CHECK(two.saved_bytes == one.saved_bytes + 8);
  }
}

TEST_CASE("sim: accumulation keeps the step's start and end, raises the peak, repeats the later micro-batch", "[accum]") {
  for (const char* family : {"gpt2", "llama"}) {
    const study::Analysis a1 = run(family, 1), a2 = run(family, 2), a3 = run(family, 3), a4 = run(family, 4);
    CHECK(a2.result.live_step_start == a1.result.live_step_start);
    CHECK(a3.result.live_step_start == a1.result.live_step_start);
    // The last micro-batch's forward ends with every .grad live (and the division's saved number).
    CHECK(a2.result.live_end_forward == a1.result.live_end_forward + a1.grads_bytes + 8);
    CHECK(a2.result.live_end_backward == a1.result.live_end_backward);
    CHECK(a2.result.live_end_optimizer == a1.result.live_end_optimizer);
    CHECK(a2.result.live_end_step == a1.result.live_end_step);
    CHECK(a2.result.peak_bytes > a1.result.peak_bytes);
    // Every later micro-batch is the same: the figures of N = 3 and 4 are those of N = 2 ...
    for (const study::Analysis* a : {&a3, &a4}) {
      CHECK(a->result.peak_bytes == a2.result.peak_bytes);
      CHECK(a->result.live_end_forward == a2.result.live_end_forward);
      CHECK(a->result.live_end_backward == a2.result.live_end_backward);
      CHECK(a->step->graph.n_ops() == a2.step->graph.n_ops());  // two micro-batches lowered, not N
    }
    // ... and each adds one later micro-batch's time and events.
    const int64_t t = a3.result.step_time_ns - a2.result.step_time_ns;
    CHECK(t > 0);
    CHECK(a4.result.step_time_ns - a3.result.step_time_ns == t);
    CHECK(a4.result.events - a3.result.events == a3.result.events - a2.result.events);
    CHECK(a4.result.phase_end_ns[1] - a3.result.phase_end_ns[1] == t);
    CHECK(a3.result.phase_end_ns[2] - a3.result.phase_end_ns[1] == a2.result.phase_end_ns[2] - a2.result.phase_end_ns[1]);
  }
}

TEST_CASE("sim: accumulation composes with checkpointing and the torch-cuda profile", "[accum]") {
  for (const char* policy : {"checkpoint.policy=full", "checkpoint.policy=every:2", "checkpoint.policy=selective"}) {
    const study::Analysis a1 = run("llama", 1, {policy}), a2 = run("llama", 2, {policy});
    CHECK(a2.result.live_step_start == a1.result.live_step_start);
    CHECK(a2.result.peak_bytes > a1.result.peak_bytes);
    CHECK(a2.result.live_end_step == a1.result.live_end_step);
  }
  const study::Analysis c1 = run("gpt2", 1, {"runtime.profile=torch-cuda"});
  const study::Analysis c2 = run("gpt2", 2, {"runtime.profile=torch-cuda"});
  // CUDA keeps the wrapped number on the host: the device sees the .grad, in 512-byte blocks.
  int64_t grads = 0;
  for (const graph::Storage& st : c1.step->graph.storages()) {
    if (st.category == graph::Category::gradient) grads += c1.step->graph.allocated(st.bytes);
  }
  CHECK(c2.result.live_end_forward == c1.result.live_end_forward + grads);
}

TEST_CASE("report: simulate --json has micro_batches, schedules refuse accumulation", "[accum]") {
  CHECK(report::to_json(run("gpt2", 1))["micro_batches"] == 1);
  const study::Analysis a = run("gpt2", 3);
  CHECK(report::to_json(a)["micro_batches"] == 3);
  CHECK(report::to_table(a).find("x 3 micro-batches") != std::string::npos);
  CHECK_THROWS_AS(study::make_schedule(a), InputError);
}

TEST_CASE("study::Scenario: training.grad_accum_steps is a positive integer", "[accum]") {
  CHECK(study::load_scenario("", {"training.grad_accum_steps=8"}).training.grad_accum_steps == 8);
  CHECK(study::load_scenario("", {}).training.grad_accum_steps == 1);
  for (const char* bad : {"training.grad_accum_steps=0", "training.grad_accum_steps=-2", "training.grad_accum_steps=1.5"}) {
    CHECK_THROWS_WITH(study::load_scenario("", {bad}), Catch::Contains("training.grad_accum_steps"));
  }
}

TEST_CASE("sim::EventLog: with accumulation the optimizer starts after the repeated micro-batches", "[accum]") {
  const study::Analysis a = run("gpt2", 4);
  const sim::EventLog log = sim::record_events(*a.tables);
  CHECK(log.result.peak_bytes == a.result.peak_bytes);
  int64_t last = 0, optimizer_start = -1;
  for (const sim::EngineEvent& e : log.events) {
    CHECK(e.time_ns >= last);  // observers see time move forward across the idle stretch
    last = e.time_ns;
    if (e.kind == sim::EngineEvent::Kind::op_start && optimizer_start < 0 &&
        a.step->graph.ops()[e.id].phase == graph::Phase::optimizer) {
      optimizer_start = e.time_ns;
    }
  }
  // The last micro-batch's backward ends (N - 2 later micro-batches after the simulated one) where
  // the optimizer step begins.
  CHECK(optimizer_start == a.result.phase_end_ns[1]);
  CHECK(last == a.result.step_time_ns);
}
