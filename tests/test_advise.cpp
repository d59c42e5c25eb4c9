// The advisor (study/advise.hpp): its axes, its ranking and its pruning, with a fake simulator
// (hooks) where the search logic is checked, and with the real one where a candidate's --set
// overrides must reproduce its figures in `simulate`.
#include <catch2/catch.hpp>
#include <fmt/format.h>

#include <algorithm>
#include <atomic>
#include <map>
#include <mutex>
#include <set>

#include "actsim/graph/checkpoint.hpp"
#include "actsim/report/advise_format.hpp"
#include "actsim/study/advise.hpp"
#include "actsim/study/analyze.hpp"
#include "actsim/util/error.hpp"

using namespace actsim;

namespace {

bool has_key(const std::string& k) {
  const auto& keys = study::scenario_keys();
  return std::find(keys.begin(), keys.end(), k) != keys.end();
}

// A llama small enough to simulate in milliseconds; batch 4 (global batch 4).
std::vector<std::string> tiny_keys() {
  return {"model.family=llama", "model.n_layers=4", "model.d_model=128", "model.n_heads=4", "model.seq_len=256",
          "model.vocab_size=512", "training.batch_size=4"};
}
study::Scenario tiny(std::vector<std::string> extra = {}) {
  std::vector<std::string> o = tiny_keys();
  o.insert(o.end(), extra.begin(), extra.end());
  return study::load_scenario("", o);
}

// The fake simulator: overrides are kept in the scenario's name ("k=v;k=v"), so keys this build
// does not have yet (training.grad_accum_steps) can be searched. Micro-batch b with accumulation
// a: peak 10 + 10 b units (8 b with flash), time a (100 + 50 b) (10% less with flash); a plan
// halves the activations (10 + 5 b) and costs 30% more time.
struct Fake {
  std::map<std::string, std::string> values(const study::Scenario& s) const {
    std::map<std::string, std::string> v{{"training.batch_size", "1"}, {"training.grad_accum_steps", "1"},
                                         {"model.attention", "eager"}};
    size_t at = 0;
    while (at < s.name.size()) {
      size_t end = s.name.find(';', at);
      if (end == std::string::npos) end = s.name.size();
      const std::string kv = s.name.substr(at, end - at);
      if (const size_t eq = kv.find('='); eq != std::string::npos) v[kv.substr(0, eq)] = kv.substr(eq + 1);
      at = end + 1;
    }
    return v;
  }
  study::AdviseHooks::Probe probe(const study::Scenario& s, bool planned) const {
    auto v = values(s);
    const int64_t b = std::stoll(v["training.batch_size"]), a = std::stoll(v["training.grad_accum_steps"]);
    const bool flash = v["model.attention"] == "flash";
    study::AdviseHooks::Probe p;
    p.ok = true;
    p.peak_bytes = planned ? 10 + 5 * b : 10 + (flash ? 8 : 10) * b;
    p.step_time_ns = a * (100 + 50 * b) * (flash ? 9 : 10) * (planned ? 13 : 10);
    p.plan = planned ? "planned" : "none";
    return p;
  }
  std::atomic<int> plans{0};
  std::mutex m;
  std::vector<int64_t> planned_batches;

  study::AdviseHooks hooks() {
    study::AdviseHooks h;
    h.keys = {"model.attention", "training.batch_size", "training.grad_accum_steps", "checkpoint.policy"};
    h.apply = [](study::Scenario& s, const std::vector<std::string>& o) {
      s.name.clear();
      for (const std::string& x : o) s.name += x + ";";
    };
    h.simulate = [this](const study::Scenario& s) { return probe(s, false); };
    h.plan = [this](const study::Scenario& s, int64_t budget) {
      ++plans;
      {
        std::lock_guard<std::mutex> lock(m);
        planned_batches.push_back(std::stoll(values(s)["training.batch_size"]));
      }
      study::AdviseHooks::Probe p = probe(s, true);
      p.fits = p.peak_bytes <= budget;
      return p;
    };
    return h;
  }
};

}  // namespace

TEST_CASE("study::divisors: every divisor, ascending", "[advise]") {
  CHECK(study::divisors(1) == std::vector<int64_t>{1});
  CHECK(study::divisors(12) == std::vector<int64_t>{1, 2, 3, 4, 6, 12});
  CHECK(study::divisors(16) == std::vector<int64_t>{1, 2, 4, 8, 16});
  CHECK(study::divisors(7) == std::vector<int64_t>{1, 7});
}

TEST_CASE("study::budget_policy_text: names the budget exactly, as checkpoint.policy parses it", "[advise]") {
  CHECK(study::budget_policy_text(80LL << 30) == "budget:80GiB");
  CHECK(study::budget_policy_text(1536LL << 20) == "budget:1536MiB");
  for (int64_t bytes : {80LL << 30, 1536LL << 20, 3LL << 10, 1000000007LL}) {
    const graph::CheckpointPolicy p = graph::parse_policy(study::budget_policy_text(bytes), "test");
    CHECK(p.kind == graph::CheckpointPolicy::Kind::budget);
    CHECK(p.budget_bytes == bytes);
  }
}

TEST_CASE("study::advise: ranks by tokens/s, plans only what does not fit, stops at the first plan that fails",
          "[advise]") {
  Fake fake;
  study::Scenario s = tiny({"training.batch_size=8"});  // global batch 8: micro-batches 1, 2, 4, 8
  // Budget 45: un-checkpointed, eager fits up to b = 3, flash up to b = 4; planned, b <= 7.
  const study::AdviseResult r = study::advise(s, {.budget_bytes = 45, .threads = 2}, fake.hooks());
  CHECK(r.global_batch == 8);
  CHECK(r.candidates == 8);  // 2 attentions x 4 micro-batches
  // The scenario as given is one of them (eager, micro-batch 8): not simulated twice.
  CHECK(r.simulations == 8);
  CHECK(r.as_given.peak_bytes == 90);
  CHECK(r.as_given.micro_batch == 8);
  // Not fitting without a plan: eager 4 and 8, flash 8. Eager 4 is planned and fits; eager 8 and
  // flash 8 are planned and do not fit.
  CHECK(fake.plans == 3);
  CHECK(r.pruned == 0);
  CHECK(r.fitting == 6);
  REQUIRE(r.ranked.size() == 6);
  for (size_t i = 1; i < r.ranked.size(); ++i) CHECK(r.ranked[i - 1].tokens_per_second >= r.ranked[i].tokens_per_second);
  for (const auto& c : r.ranked) CHECK(c.fits);
  // The fastest: flash at micro-batch 4 (no plan needed): 8 x 256 tokens / (2 x 300 x 9) ns.
  const study::AdviseCandidate& best = r.ranked[0];
  CHECK(best.micro_batch == 4);
  CHECK(best.accum_steps == 2);
  CHECK_FALSE(best.checkpointed);
  CHECK(best.tokens_per_second == Approx(8.0 * 256 * 1e9 / (2 * 300 * 9 * 10)));
  CHECK(best.changes == std::vector<std::string>{"model.attention=flash", "training.batch_size=4",
                                                   "training.grad_accum_steps=2"});
  // The planned eager 4 carries the budget policy.
  const auto planned = std::find_if(r.ranked.begin(), r.ranked.end(), [](const auto& c) { return c.checkpointed; });
  REQUIRE(planned != r.ranked.end());
  CHECK(planned->micro_batch == 4);
  CHECK(planned->overrides.back() == "checkpoint.policy=budget:45");
}

TEST_CASE("study::advise: a plan that cannot beat the top-th candidate is not searched", "[advise]") {
  Fake fake;
  study::Scenario s = tiny({"training.batch_size=8"});
  // With top = 1 the fastest un-checkpointed fitting candidate (flash, b = 4: 2 x 300 x 90 ns)
  // bounds every plan: eager 4 (un-checkpointed 2 x 300 x 100 ns) cannot beat it and is skipped;
  // eager 8 (500 x 100) and flash 8 (500 x 90) could, and are planned (and do not fit).
  const study::AdviseResult r = study::advise(s, {.budget_bytes = 45, .threads = 1, .top = 1}, fake.hooks());
  CHECK(fake.plans == 2);
  CHECK(r.pruned == 1);
  CHECK(fake.planned_batches == std::vector<int64_t>{8, 8});
  REQUIRE(r.ranked.size() == 1);
  CHECK(r.ranked[0].micro_batch == 4);
  // The same ranking as the full search's first entry.
  Fake full;
  const study::AdviseResult all = study::advise(s, {.budget_bytes = 45, .threads = 1, .top = 10}, full.hooks());
  CHECK(all.ranked[0].overrides == r.ranked[0].overrides);
}

TEST_CASE("study::advise: nothing fits: no ranking, the least peak seen", "[advise]") {
  Fake fake;
  study::Scenario s = tiny({"training.batch_size=2"});
  const study::AdviseResult r = study::advise(s, {.budget_bytes = 5, .threads = 2}, fake.hooks());
  CHECK(r.ranked.empty());
  CHECK(r.fitting == 0);
  CHECK(r.least_peak.simulated);
  CHECK(r.least_peak.peak_bytes == 15);  // planned, micro-batch 1
  // Per attention: micro-batch 1 is planned and fails, so micro-batch 2 is not planned.
  CHECK(fake.plans == 2);
  CHECK(r.pruned == 2);
  const nlohmann::json j = report::advise_json(s, r);
  CHECK(j["fits"] == false);
  CHECK(j["ranked"].empty());
  CHECK(j["least_peak"]["peak_bytes"] == 15);
}

TEST_CASE("study::advise: a combination the lowering refuses is ruled out, the scenario's own error stops it",
          "[advise]") {
  Fake fake;
  study::AdviseHooks h = fake.hooks();
  auto simulate = h.simulate;
  h.simulate = [&](const study::Scenario& s) {
    if (s.name.find("model.attention=flash") != std::string::npos) throw InputError("flash: refused");
    return simulate(s);
  };
  study::Scenario s = tiny({"training.batch_size=2"});
  const study::AdviseResult r = study::advise(s, {.budget_bytes = 1000, .threads = 2}, h);
  CHECK(r.candidates == 2);  // eager at micro-batches 1 and 2
  CHECK(r.ranked.size() == 2);
  for (const auto& c : r.ranked) CHECK(c.overrides.front() == "model.attention=eager");
  // When the scenario as given is what the lowering refuses, its error is the answer.
  h.simulate = [&](const study::Scenario&) -> study::AdviseHooks::Probe { throw InputError("refused"); };
  CHECK_THROWS_AS(study::advise(s, {.budget_bytes = 1000, .threads = 2}, h), InputError);
}

TEST_CASE("study::advise: axes follow scenario_keys()", "[advise]") {
  Fake fake;
  study::AdviseHooks h = fake.hooks();
  h.keys = {"model.attention", "training.batch_size", "checkpoint.policy"};  // no grad_accum_steps
  study::Scenario s = tiny({"training.batch_size=8"});
  const study::AdviseResult r = study::advise(s, {.budget_bytes = 1000, .threads = 2}, h);
  CHECK(r.candidates == 2);  // the scenario's own batch size only
  for (const auto& c : r.ranked) CHECK(c.micro_batch == 8);
  std::vector<std::string> names;
  for (const auto& a : r.axes) names.push_back(a.name);
  CHECK(names == std::vector<std::string>{"model.attention", "micro-batch", "checkpoint.policy"});
  // LoRA without the key is an error, not a silent no.
  CHECK_THROWS_AS(study::advise(s, {.allow_lora = true}, h), InputError);
}

TEST_CASE("study::advise: each candidate's --set overrides reproduce its peak and step time", "[advise]") {
  // A budget between the least peak and the un-checkpointed peak, so some candidates are planned.
  const study::Scenario s = tiny();
  const study::Analysis plain = study::analyze(s);
  const int64_t budget = plain.result.peak_bytes - 1;
  const study::AdviseResult r = study::advise(s, {.budget_bytes = budget, .threads = 2});
  CHECK(r.as_given.peak_bytes == plain.result.peak_bytes);
  CHECK(r.as_given.step_time_ns == plain.result.step_time_ns);
  CHECK_FALSE(r.as_given.fits);
  REQUIRE_FALSE(r.ranked.empty());
  CHECK(r.plans > 0);
  bool some_planned = false;
  for (const study::AdviseCandidate& c : r.ranked) {
    INFO(fmt::format("{}", fmt::join(c.changes, " ")));
    std::vector<std::string> o = tiny_keys();
    o.insert(o.end(), c.changes.begin(), c.changes.end());
    const study::Analysis a = study::analyze(study::load_scenario("", o));
    CHECK(a.result.peak_bytes == c.peak_bytes);
    CHECK(a.result.step_time_ns == c.step_time_ns);
    CHECK(c.peak_bytes <= budget);
    some_planned = some_planned || c.checkpointed;
  }
  CHECK(some_planned);
}

TEST_CASE("study::advise: a budget that fits un-checkpointed needs no planner, the profile rules out flash",
          "[advise]") {
  const study::AdviseResult r = study::advise(tiny(), {.threads = 2});
  CHECK(r.plans == 0);
  CHECK(r.fitting == r.candidates);
  CHECK(r.ranked[0].tokens_per_second >= r.as_given.tokens_per_second);
  // PyTorch 1.13 has no scaled_dot_product_attention: no flash candidate under torch-cpu.
  const study::AdviseResult cpu = study::advise(tiny({"runtime.profile=torch-cpu"}), {.threads = 2});
  REQUIRE_FALSE(cpu.ranked.empty());
  for (const auto& c : cpu.ranked) {
    CHECK(std::find(c.overrides.begin(), c.overrides.end(), "model.attention=flash") == c.overrides.end());
  }
}

// The axes whose keys other parts of actsim add (Note [Advisor axes]): checked once the key exists.
TEST_CASE("study::advise: the micro-batch axis keeps the global batch (training.grad_accum_steps)", "[advise]") {
  if (!has_key("training.grad_accum_steps")) {
    WARN("skipped: this build has no training.grad_accum_steps");
    return;
  }
  const study::Scenario s = tiny({"training.batch_size=2", "training.grad_accum_steps=3"});
  CHECK(study::global_batch(s) == 6);
  const study::AdviseResult r = study::advise(s, {.threads = 2});
  CHECK(r.global_batch == 6);
  std::set<int64_t> micro;
  for (const auto& c : r.ranked) {
    CHECK(c.micro_batch * c.accum_steps == 6);
    micro.insert(c.micro_batch);
    std::vector<std::string> o = tiny_keys();
    o.push_back("training.batch_size=2");
    o.push_back("training.grad_accum_steps=3");
    o.insert(o.end(), c.changes.begin(), c.changes.end());
    const study::Analysis a = study::analyze(study::load_scenario("", o));
    CHECK(a.result.step_time_ns == c.step_time_ns);
    CHECK(a.result.peak_bytes == c.peak_bytes);
  }
  CHECK(micro.size() > 1);
}

TEST_CASE("study::advise: autocast is searched (training.autocast)", "[advise]") {
  if (!has_key("training.autocast")) {
    WARN("skipped: this build has no training.autocast");
    return;
  }
  const study::AdviseResult r = study::advise(tiny(), {.threads = 2});
  bool bf16 = false;
  for (const auto& c : r.ranked) {
    bf16 = bf16 || std::find(c.changes.begin(), c.changes.end(), "training.autocast=bf16") != c.changes.end();
  }
  CHECK(bf16);
  CHECK(std::any_of(r.axes.begin(), r.axes.end(), [](const auto& a) { return a.name == "training.autocast"; }));
}

TEST_CASE("study::advise: LoRA only with allow_lora (training.trainable)", "[advise]") {
  if (!has_key("training.trainable")) {
    WARN("skipped: this build has no training.trainable");
    return;
  }
  auto uses_lora = [](const study::AdviseResult& r) {
    return std::any_of(r.ranked.begin(), r.ranked.end(), [](const auto& c) {
      return std::find(c.changes.begin(), c.changes.end(), "training.trainable=lora") != c.changes.end();
    });
  };
  CHECK_FALSE(uses_lora(study::advise(tiny(), {.threads = 2})));
  const study::AdviseResult r = study::advise(tiny(), {.allow_lora = true, .threads = 2});
  CHECK(uses_lora(r));
  for (const auto& c : r.ranked) {
    std::vector<std::string> o = tiny_keys();
    o.insert(o.end(), c.changes.begin(), c.changes.end());
    CHECK(study::analyze(study::load_scenario("", o)).result.peak_bytes == c.peak_bytes);
  }
}
