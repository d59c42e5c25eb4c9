// replay/: failures of a backend end in an exception the caller reports, never in std::terminate
// (issue 9, problem 5); the recompute confirmation lives in the replay library (problem 3).
#include <catch2/catch.hpp>

#include <memory>
#include <stdexcept>
#include <string>

#include "actsim/backends/backend.hpp"
#include "actsim/graph/checkpoint.hpp"
#include "actsim/replay/replay.hpp"
#include "actsim/schedule/schedule.hpp"
#include "actsim/study/analyze.hpp"
#include "actsim/study/make_schedule.hpp"
#include "actsim/util/error.hpp"

using namespace actsim;

namespace {

const std::vector<std::string> kSmall{"model.vocab_size=97", "model.seq_len=8",  "model.d_model=16",
                                      "model.n_heads=2",     "model.n_layers=1", "training.batch_size=2",
                                      "runtime.profile=torch-cpu"};

// The CPU backend, but every free fails as a CUDA free does once a kernel has faulted.
class FailingFree : public backends::Backend {
 public:
  FailingFree() : cpu_(backends::make_backend("cpu")) {}
  std::string name() const override { return "failing-free"; }
  void* alloc(int64_t bytes) override { return cpu_->alloc(bytes); }
  void free(void*) override {
    ++frees;
    throw DeviceError("cudaFreeAsync failed: an illegal memory access was encountered");
  }
  void run(const backends::OpCall& call) override { cpu_->run(call); }
  void upload(void* dst, const void* host, int64_t bytes) override { cpu_->upload(dst, host, bytes); }
  void download(void* host, const void* src, int64_t bytes) override { cpu_->download(host, src, bytes); }
  void fill_nan(void* p, int64_t bytes) override { cpu_->fill_nan(p, bytes); }
  int frees = 0;

 private:
  std::unique_ptr<backends::Backend> cpu_;  // its buffers leak in this test: every free "fails"
};

}  // namespace

TEST_CASE("replay::run: a backend whose free throws ends in that exception, not std::terminate", "[replay]") {
  const schedule::Schedule s = study::make_schedule(study::analyze(study::load_scenario("", kSmall)));
  FailingFree be;
  // The first failing free (a `free` entry) propagates; the executor's destructor then frees the
  // buffers still live, and those failures are logged, never thrown (a throwing destructor
  // would call std::terminate and end this test program).
  CHECK_THROWS_AS(replay::run(s, be), DeviceError);
  CHECK(be.frees > 1);
}

TEST_CASE("replay::confirm_recompute: each policy's gradients against the plain schedule's", "[replay]") {
  const study::Scenario plain = study::load_scenario("", kSmall);
  auto be = backends::make_backend("cpu");
  CHECK(replay::recompute_policies({"none", "full", "selective"}, "full") == std::vector<std::string>{"full", "selective"});
  CHECK(replay::recompute_policies({"full"}, "every:2") == std::vector<std::string>{"full", "every:2"});
  int asked = 0;
  const replay::RecomputeCheck c = replay::confirm_recompute(
      {"full", "selective"},
      [&](const std::string& p) {
        ++asked;
        study::Scenario sc = plain;
        sc.checkpoint = graph::parse_policy(p, "--policies");
        return study::make_schedule(study::analyze(sc));
      },
      *be, 3);
  CHECK(asked == 3);  // the reference ("none") and both policies
  CHECK(c.ok);
  REQUIRE(c.items.size() == 2);
  CHECK(c.items[0].policy == "full");
  CHECK(c.items[0].equal);
  CHECK(c.items[1].policy == "selective");
}
