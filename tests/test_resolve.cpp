// The resolve stage (a scenario's checkpointing parsed once, made into the step's plan before
// anything is simulated) and the batch search (one doubling-then-bisection search; the
// model-guided max_batch_size that must give its answer).
#include <catch2/catch.hpp>
#include <fmt/format.h>

#include <string>
#include <variant>
#include <vector>

#include "actsim/graph/checkpoint.hpp"
#include "actsim/study/analyze.hpp"
#include "actsim/study/batch_search.hpp"
#include "actsim/study/planner.hpp"
#include "actsim/study/resolve.hpp"
#include "actsim/study/scenario.hpp"
#include "batch_scaling.hpp"  // study/src: ScaledStep

using namespace actsim;

namespace {

const std::vector<std::string> kSmall{"model.family=llama", "model.n_layers=3", "model.d_model=64", "model.n_heads=4",
                                      "model.vocab_size=128", "model.seq_len=128"};

std::vector<std::string> with(std::vector<std::string> sets, const std::vector<std::string>& more) {
  sets.insert(sets.end(), more.begin(), more.end());
  return sets;
}

}  // namespace

TEST_CASE("study::Scenario: checkpoint.policy is parsed once, where it is written", "[resolve]") {
  const study::Scenario s = study::load_scenario("", with(kSmall, {"checkpoint.policy=every:2"}));
  const auto* p = std::get_if<graph::CheckpointPolicy>(&s.checkpoint);
  REQUIRE(p);
  CHECK(p->kind == graph::CheckpointPolicy::Kind::every);
  CHECK(p->every == 2);
  CHECK(s.checkpoint_text() == "every:2");
  CHECK_FALSE(s.is_budget());
  CHECK(study::load_scenario("", with(kSmall, {"checkpoint.policy=budget:1GiB"})).is_budget());
  CHECK(study::load_scenario("", kSmall).checkpoint_text() == "none");
}

TEST_CASE("study::resolve: a fixed policy's plan, an explicit plan as it is, a budget's planner answer", "[resolve]") {
  study::Scenario s = study::load_scenario("", with(kSmall, {"checkpoint.policy=full"}));
  const study::ResolvedStep r = study::resolve(s);
  CHECK(r.plan.describe() == graph::block_plan(std::get<graph::CheckpointPolicy>(s.checkpoint), 3).describe());
  CHECK(r.runtime == &s.runtime());
  CHECK(r.training.batch_size == s.training.batch_size);

  graph::BlockPlan mine = graph::block_plan(graph::CheckpointPolicy{}, 3);
  mine.mode[1] = graph::BlockMode::offload;
  s.checkpoint = mine;
  CHECK(study::resolve(s).plan.mode == mine.mode);
  CHECK(study::analyze(s).block_plan.mode == mine.mode);

  study::Scenario b = study::load_scenario("", kSmall);
  const int64_t none_peak = study::analyze(b).result.peak_bytes;
  const int64_t budget = none_peak * 9 / 10;
  b.checkpoint = graph::parse_policy(fmt::format("budget:{}", budget), "test");
  const study::PlanResult planned = study::plan_for_budget(b, budget);
  const study::ResolvedStep rb = study::resolve(b);
  CHECK(rb.plan.mode == planned.plan.mode);
  CHECK(rb.plan.before_backward.size() == planned.plan.before_backward.size());
  // analyze = resolve + simulate_step: the same figures either way.
  const study::Analysis a = study::analyze(b);
  const study::Analysis d = study::simulate_step(rb);
  CHECK(a.result.peak_bytes == d.result.peak_bytes);
  CHECK(a.result.step_time_ns == d.result.step_time_ns);
  CHECK(a.saved_bytes == d.saved_bytes);
  CHECK(study::simulate_step_result(rb).peak_bytes == a.result.peak_bytes);
}

TEST_CASE("study::largest_fitting: the largest fitting size, by doubling then bisection", "[resolve]") {
  for (int64_t limit : {1, 2, 7, 8, 64, 100}) {
    for (int64_t answer = 0; answer <= 110; ++answer) {
      int64_t calls = 0;
      const int64_t got = study::largest_fitting([&](int64_t n) {
        ++calls;
        REQUIRE(n >= 1);
        REQUIRE(n <= limit);
        return n <= answer;
      }, limit);
      INFO(fmt::format("limit {}, answer {}", limit, answer));
      CHECK(got == std::min(answer, limit));
      CHECK(calls <= 2 * 8);
    }
  }
}

TEST_CASE("study::max_batch_size: the answer of doubling then bisection over real simulations", "[resolve]") {
  // Sequences long enough that a few samples fill a 24 GB device (answers of 1 to a few hundred).
  for (const char* family : {"llama", "gpt2"}) {
    for (const char* policy : {"none", "full", "selective", "every:2", "offload", "ops:mm,bmm"}) {
      for (const char* seq : {"2048", "8192"}) {
        const study::Scenario s = study::load_scenario(
            "", {fmt::format("model.family={}", family), "model.n_layers=2", "model.d_model=256", "model.n_heads=4",
                 "model.vocab_size=4096", fmt::format("model.seq_len={}", seq), "device.name=RTX-4090-24GB",
                 fmt::format("checkpoint.policy={}", policy)});
        const int64_t want = study::largest_fitting([&](int64_t b) {
          study::Scenario t = s;
          t.training.batch_size = b;
          const study::Analysis a = study::analyze(t);
          return a.result.peak_bytes <= t.device.memory_bytes;
        });
        INFO(fmt::format("{} {} seq {}: {}", family, policy, seq, want));
        CHECK(want > 0);
        CHECK(study::max_batch_size(study::analyze(s)) == want);
        CHECK(study::max_batch_size(s) == want);
        study::Scenario at3 = s;  // from another batch than 1 (the guess comes from it)
        at3.training.batch_size = 3;
        CHECK(study::max_batch_size(study::analyze(at3)) == want);
      }
    }
  }
}

TEST_CASE("study::max_batch_size: 0 when not even one sample fits", "[resolve]") {
  const study::Scenario s = study::load_scenario(
      "", {"model.family=llama", "model.n_layers=2", "model.d_model=256", "model.n_heads=4", "model.vocab_size=4096",
           "model.seq_len=65536", "device.name=RTX-4090-24GB"});
  CHECK(study::max_batch_size(study::analyze(s)) == 0);
  CHECK(study::max_batch_size(s) == 0);
}

TEST_CASE("study::ScaledStep: a batch's sizes from two lowerings, each the lowering's own", "[batch_search][scaled]") {
  // Step 4 of Note [Batch search]: the batch search's later probes are the graph at g with its
  // sizes rewritten; every size the engine reads must be the lowering's at that batch.
  const std::vector<std::vector<std::string>> cases = {
      {"model.family=llama"},
      {"model.family=gpt2", "model.dropout=0.1", "checkpoint.policy=full"},
      {"model.family=gpt2", "checkpoint.policy=offload"},
      {"model.family=llama", "checkpoint.policy=selective", "training.autocast=bf16"},
      {"model.family=gpt2", "training.autocast=fp16", "training.grad_accum_steps=2"},
      {"model.family=llama", "parallel.dp=2"},
      {"model.family=gpt2", "parallel.dp=2", "parallel.sharding=zero2"},
      {"model.family=llama", "parallel.tp=2"},
      {"model.family=llama", "model.n_layers=8", "checkpoint.policy=mlp"},
  };
  for (const auto& c : cases) {
    std::vector<std::string> o{"model.vocab_size=96", "model.seq_len=32", "model.d_model=64", "model.n_heads=4",
                               "model.n_layers=2", "device.name=RTX-4090-24GB"};
    o.insert(o.end(), c.begin(), c.end());
    const study::ResolvedStep r = study::resolve(study::load_scenario("", o));
    auto lower_at = [&](int64_t b) {
      graph::TrainingConfig t = r.training;
      t.batch_size = b;
      return graph::lower_training_step(r.model, t, *r.runtime, &r.plan);
    };
    study::ScaledStep s(lower_at(2), lower_at(3), 2);
    INFO(fmt::format("{}", fmt::join(c, " ")));
    REQUIRE(s.ok());
    for (int64_t b : {2, 3, 5, 9, 17, 4}) {
      INFO("batch " << b);
      const graph::StepGraph want = lower_at(b);
      const graph::Graph* got = s.at(b);
      REQUIRE(got != nullptr);
      REQUIRE(got->storages().size() == want.graph.storages().size());
      bool same = true;
      for (size_t i = 0; i < got->storages().size(); ++i) same = same && got->storages()[i].bytes == want.graph.storages()[i].bytes;
      for (size_t i = 0; i < got->ops().size(); ++i) {
        const graph::Op &p = got->ops()[i], &q = want.graph.ops()[i];
        same = same && p.workspace_bytes == q.workspace_bytes && p.bytes_moved == q.bytes_moved && p.flops == q.flops;
      }
      CHECK(same);
      const sim::SimResult x = sim::simulate(sim::StepTables(*got, r.device)), y = sim::simulate(sim::StepTables(want.graph, r.device));
      CHECK(x.peak_bytes == y.peak_bytes);
      CHECK(x.step_time_ns == y.step_time_ns);
    }
  }
  // A batch of 1 is another structure (size-1 dims make views): no ScaledStep through it.
  const study::ResolvedStep r = study::resolve(study::load_scenario("", {"model.family=gpt2", "model.n_layers=2", "model.d_model=64", "model.n_heads=4"}));
  graph::TrainingConfig t1 = r.training, t2 = r.training;
  t1.batch_size = 1;
  t2.batch_size = 2;
  CHECK_FALSE(study::ScaledStep(graph::lower_training_step(r.model, t1, *r.runtime, &r.plan),
                                graph::lower_training_step(r.model, t2, *r.runtime, &r.plan), 1).ok());
}
