// Tests of pipeline parallelism (issue 13, pp helper): the schedules against the published
// formulas term by term (the 1F1B first stage holds p micro-batches of L/p layers, GPipe holds m,
// the interleaved schedule's factor 1 + (p - 1)/(pV), the bubble (p - 1)/m of the ideal time),
// the stage lowerings (every parameter on exactly one stage), the per-rank JSON, and bad
// combinations of keys.
#include <catch2/catch.hpp>
#include <fmt/format.h>

#include <algorithm>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "actsim/report/export.hpp"    // pprank: the pipeline trace
#include "actsim/report/summary.hpp"
#include "actsim/study/analyze.hpp"
#include "actsim/study/pipeline.hpp"
#include "actsim/study/planner.hpp"    // pprank: plan on a pipeline
#include "actsim/study/scenario.hpp"
#include "actsim/util/error.hpp"

using namespace actsim;
using graph::PpSchedule;

namespace {

// Every virtual stage alike: each forward holds `held` bytes until its backward, f and b
// nanoseconds of compute, no transfer time.
std::vector<study::PpSegment> uniform(int64_t n_virtual, int64_t held, int64_t f, int64_t b) {
  study::PpSegment s;
  s.held = held;
  s.fwd_peak = held;
  s.bwd_peak = held;
  s.fwd_ns = f;
  s.bwd_ns = b;
  return std::vector<study::PpSegment>(static_cast<size_t>(n_virtual), s);
}

study::PpResult replay(PpSchedule k, int64_t p, int64_t m, int64_t V, int64_t held, int64_t f, int64_t b) {
  return study::run_pipeline(study::pp_schedule(k, p, m, V), uniform(p * V, held, f, b), p);
}

}  // namespace

TEST_CASE("schedules: every stage runs each micro-batch's forward and backward once per chunk", "[pp][schedule]") {
  for (PpSchedule k : {PpSchedule::gpipe, PpSchedule::one_f_one_b, PpSchedule::interleaved}) {
    const int64_t p = 4, m = 8, V = k == PpSchedule::interleaved ? 2 : 1;
    const auto sched = study::pp_schedule(k, p, m, V);
    REQUIRE(sched.size() == 4);
    for (const auto& acts : sched) {
      CHECK(static_cast<int64_t>(acts.size()) == 2 * m * V);
      std::vector<int> seen(static_cast<size_t>(2 * m * V), 0);
      for (const auto& a : acts) ++seen[static_cast<size_t>((a.backward ? m * V : 0) + a.chunk * m + a.mb)];
      for (int c : seen) CHECK(c == 1);
    }
  }
}

TEST_CASE("1F1B: stage s holds p - s micro-batches, the first holds p micro-batches of L/p layers", "[pp][formula]") {
  // Narayanan et al. 2021 (PipeDream-Flush), Korthikanti et al. 2022 section 4.2.3: the first
  // stage holds p micro-batches' activations, each of L/p layers, so L layers' worth whatever p is.
  const int64_t L = 48, per_layer = 1000;
  for (int64_t p : {2, 4, 8}) {
    const int64_t m = 4 * p;
    const study::PpResult r = replay(PpSchedule::one_f_one_b, p, m, 1, per_layer * (L / p), 10, 20);
    for (int64_t s = 0; s < p; ++s) CHECK(r.stages[static_cast<size_t>(s)].max_in_flight == p - s);
    CHECK(r.stages[0].max_in_flight * (L / p) == L);
    CHECK(r.stages[0].peak_bytes == p * per_layer * (L / p));
    CHECK(r.stages[0].peak_bytes == L * per_layer);
  }
}

TEST_CASE("GPipe holds every micro-batch", "[pp][formula]") {
  const study::PpResult r = replay(PpSchedule::gpipe, 4, 6, 1, 100, 10, 20);
  for (const auto& st : r.stages) {
    CHECK(st.max_in_flight == 6);
    CHECK(st.peak_bytes == 600);
  }
}

TEST_CASE("interleaved: the first stage holds L (1 + (p - 1)/(pV)) layers", "[pp][formula]") {
  // Narayanan et al. 2021 section 2.2, Korthikanti et al. 2022 section 4.2.3: Megatron's
  // interleaved schedule makes the first stage hold p V + p - 1 chunk micro-batches of L/(pV) layers.
  const int64_t L = 96, per_layer = 10;
  for (int64_t p : {2, 4}) {
    for (int64_t V : {2, 3}) {
      const int64_t layers = L / (p * V), m = 2 * p;
      const study::PpResult r = replay(PpSchedule::interleaved, p, m, V, per_layer * layers, 10, 20);
      CHECK(r.stages[0].max_in_flight == p * V + p - 1);
      // bytes: L (1 + (p - 1)/(pV)) layers = L + L (p - 1)/(pV) = L + (p - 1) layers
      CHECK(r.stages[0].peak_bytes * p * V == per_layer * L * (p * V + p - 1));
      CHECK(r.stages[0].peak_bytes == per_layer * (L + (p - 1) * layers));
    }
  }
}

TEST_CASE("bubble: (p - 1) forward-backward times, divided by V when interleaved", "[pp][formula]") {
  const int64_t p = 4, m = 8, f = 100, b = 200;
  for (PpSchedule k : {PpSchedule::gpipe, PpSchedule::one_f_one_b}) {
    const study::PpResult r = replay(k, p, m, 1, 1, f, b);
    CHECK(r.step_time_ns == (m + p - 1) * (f + b));
    CHECK(r.bubble_ns == (p - 1) * (f + b));
  }
  // Interleaved: each chunk's forward and backward take 1/V of the stage's.
  const int64_t V = 2;
  const study::PpResult r = replay(PpSchedule::interleaved, p, m, V, 1, f / V, b / V);
  CHECK(r.bubble_ns == (p - 1) * (f + b) / V);
  CHECK(r.step_time_ns == m * (f + b) + (p - 1) * (f + b) / V);
}

namespace {
std::vector<std::string> small_llama(std::vector<std::string> more) {
  std::vector<std::string> s{"model.family=llama", "model.d_model=128", "model.n_heads=4", "model.n_layers=4",
                             "model.vocab_size=512", "model.seq_len=32", "training.batch_size=2",
                             "runtime.profile=torch-cuda", "device.name=H100-SXM-80GB"};
  s.insert(s.end(), more.begin(), more.end());
  return s;
}
}  // namespace

TEST_CASE("stages: every parameter on one stage, the ranks JSON, one class per stage", "[pp][lowering]") {
  const study::Analysis one = study::analyze(study::load_scenario("", small_llama({})));
  for (const char* sched : {"gpipe", "1f1b", "interleaved:2"}) {
    const study::Analysis a =
        study::analyze(study::load_scenario("", small_llama({"parallel.pp=2", "parallel.microbatches=4",
                                                             fmt::format("parallel.pp_schedule={}", sched)})));
    REQUIRE(a.pipeline);
    const nlohmann::json j = report::to_json(a, -1);
    REQUIRE(j["ranks"].size() == 2);
    int64_t params = 0, count = 0;
    for (const auto& r : j["ranks"]) params += r["figures"]["param_count"].get<int64_t>();
    CHECK(params == one.param_count);
    const int w = j["peak_rank_class"];
    CHECK(j["ranks"][w]["figures"]["peak"]["bytes"] == j["peak"]["bytes"]);
    CHECK(j["ranks"][w]["figures"]["step_time_ns"] == j["step_time_ns"]);
    for (const auto& r : j["ranks"]) {
      CHECK(r["figures"]["peak"]["bytes"].get<int64_t>() <= j["peak"]["bytes"].get<int64_t>());
      count += r["count"].get<int64_t>();
    }
    CHECK(count == 2);
    // The pipeline holds more than one micro-batch's activations on the first stage, less than
    // the whole model's activations of the whole batch.
    CHECK(a.pipeline->result.stages[0].max_in_flight >= 2);
    CHECK(j["pipeline"]["bubble_ns"].get<int64_t>() > 0);
  }
  // GPipe holds all four micro-batches on every stage; 1F1B's last stage only one.
  const study::Analysis g = study::analyze(study::load_scenario("", small_llama({"parallel.pp=2", "parallel.microbatches=4",
                                                                                "parallel.pp_schedule=gpipe"})));
  const study::Analysis f = study::analyze(study::load_scenario("", small_llama({"parallel.pp=2", "parallel.microbatches=4"})));
  CHECK(g.pipeline->result.stages[1].max_in_flight == 4);
  CHECK(f.pipeline->result.stages[1].max_in_flight == 1);
  CHECK(f.pipeline->result.stages[0].max_in_flight == 2);
  CHECK(g.pipeline->result.stages[1].peak_bytes > f.pipeline->result.stages[1].peak_bytes);
  // A stage's figures: the first stage holds the embedding, the last the head (untied llama).
  const auto& st0 = g.pipeline->kinds[static_cast<size_t>(g.pipeline->stage_kinds[0][0])]->step->graph;
  bool emb0 = false;
  for (const auto& t : st0.tensors()) emb0 = emb0 || t.name == "tok_embeddings.weight";
  CHECK(emb0);
  // gpt2 ties lm_head to wte: the last stage holds its own copy of the head (as Megatron-LM's last
  // stage keeps a copy of the embedding), so the stages hold V x d more than the model.
  std::vector<std::string> gpt2{"model.family=gpt2", "model.d_model=64", "model.n_heads=2", "model.n_layers=4",
                                "model.vocab_size=256", "model.seq_len=16", "training.batch_size=1"};
  const study::Analysis g1 = study::analyze(study::load_scenario("", gpt2));
  gpt2.push_back("parallel.pp=4");
  const nlohmann::json jg = report::to_json(study::analyze(study::load_scenario("", gpt2)), -1);
  REQUIRE(jg["ranks"].size() == 4);
  int64_t sum = 0;
  for (const auto& r : jg["ranks"]) sum += r["figures"]["param_count"].get<int64_t>();
  CHECK(sum == g1.param_count + 256 * 64);
}

TEST_CASE("bad pipeline combinations are one-line errors naming the key", "[pp][scenario]") {
  auto message = [](const std::vector<std::string>& sets) {
    try {
      (void)study::load_scenario("", small_llama(sets));
    } catch (const InputError& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  CHECK_THAT(message({"parallel.pp=0"}), Catch::Contains("parallel.pp"));
  CHECK_THAT(message({"parallel.pp=8"}), Catch::Contains("parallel.pp") && Catch::Contains("4 layers"));
  CHECK_THAT(message({"parallel.pp=3"}), Catch::Contains("parallel.pp") && Catch::Contains("evenly"));
  CHECK_THAT(message({"parallel.pp=4", "parallel.microbatches=2"}),
             Catch::Contains("parallel.microbatches") && Catch::Contains("at least one per stage"));
  CHECK(message({"parallel.pp=4", "parallel.microbatches=2", "parallel.pp_schedule=gpipe"}) == "no error");
  CHECK_THAT(message({"parallel.pp=2", "parallel.pp_schedule=interleaved:2", "parallel.microbatches=3"}),
             Catch::Contains("parallel.microbatches") && Catch::Contains("multiple"));
  CHECK_THAT(message({"parallel.pp=2", "parallel.pp_schedule=interleaved:4"}),
             Catch::Contains("parallel.pp_schedule") && Catch::Contains("chunks"));
  CHECK_THAT(message({"parallel.pp=2", "parallel.pp_schedule=interleaved"}), Catch::Contains("parallel.pp_schedule"));
  CHECK_THAT(message({"parallel.pp=2", "parallel.pp_schedule=zigzag"}), Catch::Contains("parallel.pp_schedule"));
  CHECK_THAT(message({"parallel.microbatches=4"}), Catch::Contains("parallel.microbatches") && Catch::Contains("pp > 1"));
  CHECK_THAT(message({"parallel.pp=2", "training.grad_accum_steps=2"}), Catch::Contains("training.grad_accum_steps"));
  for (const auto& m : {message({"parallel.pp=8"}), message({"parallel.pp=4", "parallel.microbatches=2"})}) {
    CHECK(m.find('\n') == std::string::npos);
  }
}

// torch.distributed.pipelining's runtime (issue 13, pporacle; Note [torch.distributed.pipelining's
// lifetimes] in study/src/pipeline_schedule.cpp): what its schedules keep alive beyond autograd's
// saved tensors, on hand-made segments.
namespace {
study::PpSegment torch_segment(int64_t held, int64_t out, int64_t in_grad) {
  study::PpSegment s;
  s.held = held;
  s.fwd_peak = held;
  s.fwd_peak_body = held;
  s.bwd_peak = held;
  s.bwd_peak_later = held;
  s.out = out;
  s.in_grad = in_grad;
  return s;
}
}  // namespace

TEST_CASE("torch's 1F1B keeps the warm-up's last sent output until the cool-down", "[pp][torch]") {
  // Stage 0 of 2, 4 micro-batches: F0 F1 B0 F2 B1 F3 B2 B3. Schedule1F1B's send_work keeps
  // micro-batch 0's output (its last fired warm-up send) until the cool-down's first send, so
  // B1 and B2 run with three outputs live: micro-batch 0's, and those of the two in flight.
  const int64_t H = 1000, O = 10;
  const std::vector<study::PpSegment> seg{torch_segment(H, O, 0), torch_segment(H, 0, 0)};
  const study::PpResult f = study::run_pipeline(study::pp_schedule(PpSchedule::one_f_one_b, 2, 4, 1), seg, 2,
                                                PpSchedule::one_f_one_b);
  CHECK(f.stages[0].peak_bytes == 2 * H + 3 * O);
  CHECK(f.stages[0].peak_phase == graph::Phase::backward);
  // GPipe keeps each output until its backward (fwd_cache): all four at B0.
  const study::PpResult g = study::run_pipeline(study::pp_schedule(PpSchedule::gpipe, 2, 4, 1), seg, 2, PpSchedule::gpipe);
  CHECK(g.stages[0].peak_bytes == 4 * H + 4 * O);
  // Nothing is left after the last backward.
  CHECK(f.stages[0].live_end_backward == 0);
  CHECK(g.stages[0].live_end_backward == 0);
}

TEST_CASE("torch's 1F1B last stage holds the previous logits through the next forward's body", "[pp][torch]") {
  // The schedule's local `output` keeps micro-batch i's logits until forward_one_chunk of i + 1
  // returns: its body (before the loss) runs with them, its loss without.
  study::PpSegment last = torch_segment(1000, 500, 0);
  last.fwd_peak = last.fwd_peak_body = 1200;
  const std::vector<study::PpSegment> seg{torch_segment(1000, 0, 0), last};
  const study::PpResult r = study::run_pipeline(study::pp_schedule(PpSchedule::one_f_one_b, 2, 3, 1), seg, 2,
                                                PpSchedule::one_f_one_b);
  CHECK(r.stages[1].peak_bytes == 500 + 1200);
  CHECK(r.stages[1].peak_phase == graph::Phase::forward);
  // Past its body the previous logits are gone: a loss peak above the body's does not see them.
  last.fwd_peak_body = 1000;
  last.fwd_peak = 1600;
  const std::vector<study::PpSegment> seg2{torch_segment(1000, 0, 0), last};
  const study::PpResult r2 = study::run_pipeline(study::pp_schedule(PpSchedule::one_f_one_b, 2, 3, 1), seg2, 2,
                                                 PpSchedule::one_f_one_b);
  CHECK(r2.stages[1].peak_bytes == 1600);
}

TEST_CASE("torch's input gradients: 1F1B sends keep one until the next backward, GPipe keeps all", "[pp][torch]") {
  const int64_t H = 100, G = 5000;
  study::PpSegment last = torch_segment(H, 0, G);
  last.bwd_peak_later = H + 10000;  // a large transient in the later backwards
  const std::vector<study::PpSegment> seg{torch_segment(H, 0, 0), last};
  const study::PpResult f = study::run_pipeline(study::pp_schedule(PpSchedule::one_f_one_b, 2, 4, 1), seg, 2,
                                                PpSchedule::one_f_one_b);
  const study::PpResult g = study::run_pipeline(study::pp_schedule(PpSchedule::gpipe, 2, 4, 1), seg, 2, PpSchedule::gpipe);
  CHECK(f.stages[1].peak_bytes == G + H + 10000);      // the previous micro-batch's
  CHECK(g.stages[1].peak_bytes == 3 * G + H + 10000);  // the last backward: the three before it
  CHECK(f.stages[1].live_end_backward == 0);
  CHECK(g.stages[1].live_end_backward == 0);
}

TEST_CASE("torch's interleaved runtime keeps every send until step() returns", "[pp][torch]") {
  // ScheduleInterleaved1F1B runs on _PipelineScheduleRuntime, whose send_ops list keeps every
  // send's work: stage 0 of 2 with 2 chunks (virtual stages 0 and 2) over 2 micro-batches sends
  // 4 outputs and (virtual stage 2) 2 input gradients, all live at its last two backwards (the
  // first of them with both micro-batches' held bytes of chunk 0).
  const int64_t H = 1, O = 1000, G = 100;
  auto sent = [&](int64_t in_grad) {
    study::PpSegment x = torch_segment(H, O, in_grad);
    x.out_sent = true;
    return x;
  };
  const std::vector<study::PpSegment> seg{sent(0), sent(G), sent(G), torch_segment(H, 0, G)};
  const study::PpResult r = study::run_pipeline(study::pp_schedule(PpSchedule::interleaved, 2, 2, 2), seg, 2,
                                                PpSchedule::interleaved);
  CHECK(r.stages[0].peak_bytes == 4 * O + 2 * G + 2 * H);
  CHECK(r.stages[0].live_end_backward == 0);
}

TEST_CASE("a later backward adds into .grad: its own peak, the losses kept until step() returns", "[pp][torch]") {
  study::PpSegment last = torch_segment(1000, 0, 0);
  last.grads = 500 + 4;  // the parameters' gradients and the micro-batch's loss (kept by the lowering)
  last.loss = 4;
  last.bwd_peak = 2000;
  last.bwd_peak_later = 4000;  // .grad exists: 500 of it, plus the new gradients as temporaries
  const std::vector<study::PpSegment> seg{torch_segment(1000, 0, 0), last};
  const study::PpResult r = study::run_pipeline(study::pp_schedule(PpSchedule::gpipe, 2, 2, 1), seg, 2, PpSchedule::gpipe);
  // B0 peaks at 1000 (B1's held) + 2000; B1 at the later peak (its held and .grad included),
  // plus B0's loss, still in the schedule's list.
  CHECK(r.stages[1].peak_bytes == 4 + 4000);
  CHECK(r.stages[1].live_end_backward == 500);  // the losses are gone once step() returns
}

TEST_CASE("torch2-cpu stages: PipelineStage's buffers, the whole batch, a steady step, figures measured by torch", "[pp][torch]") {
  // test_against_torch's BASE (gpt2, d 32, 2 layers, batch 2, seq 16, fp32, AdamW) on 2 stages,
  // 1F1B over 4 micro-batches. The figures below are tests/torch/measure_pp.py's (torch 2.13,
  // gloo, 2 ranks; torch2.pp checks them live where torch is installed).
  const std::vector<std::string> sets{"model.family=gpt2", "model.vocab_size=97", "model.seq_len=16", "model.d_model=32",
                                      "model.n_heads=4", "model.n_layers=2", "training.batch_size=2",
                                      "runtime.profile=torch2-cpu", "parallel.pp=2", "parallel.microbatches=4"};
  const nlohmann::json j = report::to_json(study::analyze(study::load_scenario("", sets)), -1);
  REQUIRE(j["ranks"].size() == 2);
  const int64_t m = 4, idx = 2 * 16 * 8, act = 2 * 16 * 32 * 4;
  for (int st = 0; st < 2; ++st) {
    const auto& f = j["ranks"][st]["figures"];
    const auto& live = f["live_bytes"];
    CHECK(live["end_step"] == live["step_start"]);  // the step leaves what it found
    // parameters, AdamW's state, the masks; m micro-batches of idx (or targets); m receive
    // buffers (activations on stage 1, output gradients on stage 0)
    CHECK(live["step_start"].get<int64_t>() == f["params_bytes"].get<int64_t>() + f["optimizer_bytes"].get<int64_t>() +
                                                   f["buffers_bytes"].get<int64_t>() + m * idx + m * act);
  }
  const auto& s0 = j["ranks"][0]["figures"];
  const auto& s1 = j["ranks"][1]["figures"];
  CHECK(s0["peak"]["bytes"] == 474056);
  CHECK(s0["live_bytes"]["end_forward"] == 441160);
  CHECK(s0["live_bytes"]["end_backward"] == 279608);
  CHECK(s1["peak"]["bytes"] == 405080);
  CHECK(s1["live_bytes"]["end_forward"] == 380248);
  CHECK(s1["live_bytes"]["end_backward"] == 272444);
  // The same model under GPipe over 3 micro-batches with dropout 0.1, and with 4 layers
  // interleaved over 2 chunks per stage and 4 micro-batches: each stage's peak as torch measured it.
  auto peaks = [&](std::vector<std::string> more) {
    std::vector<std::string> all = sets;
    all.insert(all.end(), more.begin(), more.end());
    const nlohmann::json k = report::to_json(study::analyze(study::load_scenario("", all)), -1);
    return std::vector<int64_t>{k["ranks"][0]["figures"]["peak"]["bytes"], k["ranks"][1]["figures"]["peak"]["bytes"]};
  };
  CHECK(peaks({"model.dropout=0.1", "parallel.pp_schedule=gpipe", "parallel.microbatches=3"}) ==
        std::vector<int64_t>{565072, 618220});
  CHECK(peaks({"model.n_layers=4", "parallel.pp_schedule=interleaved:2"}) == std::vector<int64_t>{955280, 815768});
}

// ---- pprank (issue 13): tensor parallelism inside pipeline stages, the rank classes, the trace
// per rank class, and `plan` on a pipeline ----
namespace {
// Megatron-LM's setting (as tests/test_tp.cpp's): gpt2, fp16, dropout > 0 with 1-byte masks
// (torch-cuda), eager attention, 4 layers.
std::vector<std::string> megatron_gpt2(int64_t s, int64_t h, int64_t a, int64_t b, int64_t t, bool sp,
                                       std::vector<std::string> more) {
  std::vector<std::string> v{"model.family=gpt2", "runtime.profile=torch-cuda", "training.dtype=fp16",
                             "model.dropout=0.1", "model.attention=eager", "model.vocab_size=512",
                             "model.n_layers=4", fmt::format("model.seq_len={}", s), fmt::format("model.d_model={}", h),
                             fmt::format("model.n_heads={}", a), fmt::format("training.batch_size={}", b),
                             "device.name=H100-SXM-80GB", fmt::format("parallel.tp={}", t)};
  if (sp) v.push_back("parallel.sp=true");
  v.insert(v.end(), more.begin(), more.end());
  return v;
}
}  // namespace

TEST_CASE("tp inside pipeline stages: Korthikanti per layer on every stage, times the micro-batches in flight",
          "[pp][tp][formula]") {
  // Sizes whose every saved tensor is a multiple of the allocator's 512-byte blocks (the LayerNorm
  // statistics on s/t tokens too), so the stage's live bytes are the formula's.
  const int64_t s = 128, h = 256, a = 8, b = 4, L = 4, p = 2;
  for (int64_t t : {2, 4}) {
    for (bool sp : {false, true}) {
      INFO("t=" << t << " sp=" << sp);
      // Korthikanti et al.: sbh(10 + 24/t + 5as/(ht)) without sp, (sbh/t)(34 + 5as/h) with it,
      // plus the reference's extras (the LayerNorm statistics, 16sb, /t with sp; the s^2 bool mask).
      const int64_t per_layer = sp ? s * b * h * 34 / t + 5 * a * s * s * b / t + 16 * s * b / t + s * s
                                   : 10 * s * b * h + 24 * s * b * h / t + 5 * a * s * s * b / t + 16 * s * b + s * s;
      const study::Analysis tp_only = study::analyze(study::load_scenario("", megatron_gpt2(s, h, a, b, t, sp, {})));
      for (int64_t kept : tp_only.per_layer_saved) CHECK(kept == per_layer);
      const study::Analysis pp = study::analyze(
          study::load_scenario("", megatron_gpt2(s, h, a, b, t, sp, {"parallel.pp=2", "parallel.microbatches=4"})));
      REQUIRE(pp.pipeline);
      const study::Pipeline& pl = *pp.pipeline;
      // Each stage lowers L/p of the tp-only lowering's layers, saving the same bytes per layer.
      for (const auto& k : pl.kinds) {
        REQUIRE(k->per_layer_saved.size() == static_cast<size_t>(L / p));
        for (int64_t kept : k->per_layer_saved) CHECK(kept == per_layer);
      }
      // The last stage's received input is the tp rank's share of the activation: [b, s/t, h]
      // with sequence parallelism, [b, s, h] without.
      const graph::Graph& last = pl.kinds.back()->step->graph;
      for (const graph::Tensor& x : last.tensors()) {
        if (x.name == "pp.recv_activation") CHECK(x.shape == graph::Shape{b, sp ? s / t : s, h});
      }
      // 1F1B: stage 0 holds p micro-batches of L/p layers at once; each micro-batch's held bytes
      // are its layers' Korthikanti terms plus what the stage saves outside its blocks.
      const study::PpSegment& s0 = pl.segments[0];
      const study::PpStageResult& r0 = pl.result.stages[0];
      CHECK(r0.max_in_flight == p);
      CHECK(s0.held == (L / p) * per_layer + pl.kinds[0]->outside_saved);
      // Its peak holds the stage's parameters and state (base, and the runtime's buffers), the
      // p - 1 other micro-batches in flight (exactly, at the peak), and one micro-batch's forward
      // or backward peak (the runtime's sent outputs and gradients on top: Note
      // [torch.distributed.pipelining's lifetimes]).
      const int64_t others = (p - 1) * s0.held;
      CHECK(r0.peak_bytes >= s0.base + s0.persist + others + std::max(s0.fwd_peak, s0.bwd_peak));
      CHECK(r0.extra_held == others);
    }
  }
}

TEST_CASE("rank classes of dp 2 x tp 2 x pp 2: one class per stage, 4 ranks each", "[pp][tp][lowering]") {
  const study::Analysis a = study::analyze(study::load_scenario(
      "", small_llama({"parallel.dp=2", "parallel.tp=2", "parallel.pp=2", "parallel.microbatches=4"})));
  REQUIRE(a.pipeline);
  const nlohmann::json j = report::to_json(a, -1);
  REQUIRE(j["ranks"].size() == 2);
  int64_t count = 0;
  for (int64_t st = 0; st < 2; ++st) {
    const auto& r = j["ranks"][static_cast<size_t>(st)];
    CHECK(r["coordinates"]["dp"] == nlohmann::json({0, 1}));
    CHECK(r["coordinates"]["tp"] == nlohmann::json({0, 1}));
    CHECK(r["coordinates"]["pp"] == st);
    CHECK(r["count"] == 4);
    count += r["count"].get<int64_t>();
  }
  CHECK(count == 2 * 2 * 2);
  CHECK(j["parallel"]["tp"] == 2);
  CHECK(j["parallel"]["sp"] == false);
  // Each tp rank holds half of the tp-sharded weights: the stages' parameters add up to the
  // tp-only lowering's (one tp rank of the whole model).
  const study::Analysis tp_only = study::analyze(study::load_scenario("", small_llama({"parallel.tp=2"})));
  CHECK(j["ranks"][0]["figures"]["param_count"].get<int64_t>() + j["ranks"][1]["figures"]["param_count"].get<int64_t>() ==
        tp_only.param_count);
  // The table names the tensor parallelism and the class's rank count.
  const std::string table = report::to_table(a, -1);
  CHECK_THAT(table, Catch::Contains("tensor parallel over 2 ranks"));
  CHECK_THAT(table, Catch::Contains("4 ranks alike"));
  // tp alone: the parallel object and one class of t ranks.
  const nlohmann::json jt = report::to_json(tp_only, -1);
  CHECK(jt["parallel"]["tp"] == 2);
  CHECK(jt["ranks"].size() == 1);
  CHECK(jt["ranks"][0]["count"] == 2);
  CHECK_THAT(report::to_table(tp_only, -1), Catch::Contains("tensor parallel over 2 ranks"));
}

TEST_CASE("the trace of a pipeline: one process per rank class, its peak the class's", "[pp][trace]") {
  for (const char* sched : {"1f1b", "gpipe", "interleaved:2"}) {
    INFO(sched);
    const study::Analysis a = study::analyze(study::load_scenario(
        "", small_llama({"parallel.pp=2", "parallel.microbatches=4", fmt::format("parallel.pp_schedule={}", sched)})));
    const nlohmann::json j = report::to_json(a, -1);
    const nlohmann::json tr = nlohmann::json::parse(report::pipeline_trace_json(a));
    std::map<int64_t, std::string> names;
    std::map<int64_t, int64_t> peak, slices;
    for (const auto& e : tr["traceEvents"]) {
      const int64_t pid = e["pid"];
      if (e["ph"] == "M" && e["name"] == "process_name") names[pid] = e["args"]["name"];
      if (e["ph"] == "C") peak[pid] = std::max(peak[pid], e["args"]["bytes"].get<int64_t>());
      if (e["ph"] == "X") ++slices[pid];
    }
    REQUIRE(names.size() == 2);
    for (int64_t st = 0; st < 2; ++st) {
      CHECK_THAT(names[st + 1], Catch::Contains(fmt::format("pp stage {}", st)));
      CHECK(peak[st + 1] == j["ranks"][static_cast<size_t>(st)]["figures"]["peak"]["bytes"].get<int64_t>());
      // every forward and backward of every micro-batch (per chunk), and the optimizer step
      CHECK(slices[st + 1] == 2 * 4 * a.scenario.training.parallel.pp_chunks + 1);
    }
  }
  // The one-device exports are refused with one line naming parallel.pp.
  const study::Analysis a = study::analyze(study::load_scenario("", small_llama({"parallel.pp=2"})));
  for (const report::ExportRequest& r : {report::ExportRequest{.memviz = "x.pickle"}, report::ExportRequest{.csv = "x.csv"},
                                         report::ExportRequest{.report = "x.html"}, report::ExportRequest{.svg = "x.svg"}}) {
    try {
      report::check_pipeline_exports(a, r);
      FAIL("not refused");
    } catch (const InputError& e) {
      CHECK_THAT(std::string(e.what()), Catch::Contains("parallel.pp") && Catch::Contains("--trace"));
      CHECK(std::string(e.what()).find('\n') == std::string::npos);
    }
  }
}

TEST_CASE("plan on a pipeline: the worst stage planned, verified on the pipeline, never above the budget, monotone",
          "[pp][planner]") {
  const study::Scenario s = study::load_scenario(
      "", small_llama({"parallel.pp=2", "parallel.microbatches=4", "model.n_layers=8", "model.seq_len=128"}));
  const study::Analysis base = study::analyze(s);
  graph::CheckpointPolicy full;
  full.kind = graph::CheckpointPolicy::Kind::full;
  study::Scenario sf = s;
  sf.checkpoint = full;
  const int64_t lo = study::analyze(sf).result.peak_bytes, hi = base.result.peak_bytes;
  REQUIRE(lo < hi);
  int64_t last_time = -1;
  for (int i = 0; i <= 4; ++i) {
    const int64_t budget = lo + (hi - lo) * i / 4;
    INFO("budget " << budget);
    const study::PlanResult r = study::plan_for_budget(s, budget);
    REQUIRE(r.fits);
    CHECK(r.peak_bytes <= budget);
    CHECK(r.plan.mode.size() == 4);  // each stage's L/p blocks
    // Verified: the pipeline simulated with the plan has that peak (its worst stage, micro-batches in flight).
    study::Scenario chosen = s;
    chosen.checkpoint = r.plan;
    const study::Analysis v = study::analyze(chosen);
    REQUIRE(v.pipeline);
    CHECK(v.result.peak_bytes == r.peak_bytes);
    CHECK(v.result.step_time_ns == r.step_time_ns);
    if (last_time >= 0) CHECK(r.step_time_ns <= last_time);
    last_time = r.step_time_ns;
  }
}
// ---- end pprank ----

// ---- ppdp (issue 13): checkpoint.policy = "budget:X" under pp; pp x dp against torch ----
TEST_CASE("budget policy under pp plans the micro-batches in flight: every stage within the budget, `plan`'s answer",
          "[pp][planner]") {
  const std::vector<std::string> sets =
      small_llama({"parallel.pp=2", "parallel.microbatches=4", "model.n_layers=8", "model.seq_len=128"});
  const study::Scenario s = study::load_scenario("", sets);
  std::vector<std::string> full_sets = sets;
  full_sets.push_back("checkpoint.policy=full");
  const int64_t hi = study::analyze(s).result.peak_bytes;
  const int64_t lo = study::analyze(study::load_scenario("", full_sets)).result.peak_bytes;
  REQUIRE(lo < hi);
  for (int i = 1; i <= 3; ++i) {
    const int64_t budget = lo + (hi - lo) * i / 4;
    INFO("budget " << budget);
    std::vector<std::string> b = sets;
    b.push_back(fmt::format("checkpoint.policy=budget:{}", budget));
    const study::Analysis a = study::analyze(study::load_scenario("", b));
    REQUIRE(a.pipeline);
    // One micro-batch of a stage fits every one of these budgets without checkpointing (the old
    // behaviour planned that, and the pipeline peaked at hi).
    CHECK(a.result.peak_bytes <= budget);
    for (const study::PpStageResult& st : a.pipeline->result.stages) CHECK(st.peak_bytes <= budget);
    // The plan is `plan`'s for the pipeline (its worst stage, verified on the replay).
    const study::PlanResult r = study::plan_for_budget(s, budget);
    CHECK(a.result.peak_bytes == r.peak_bytes);
    CHECK(a.block_plan.mode == r.plan.mode);
  }
}

TEST_CASE("pp 2 x dp 2 (DDP per stage, torch2-cpu): every rank's figures as torch measured them", "[pp][ppdp][torch]") {
  // test_against_torch's BASE on 2 stages x 2 data-parallel ranks, 1F1B over 2 micro-batches;
  // tests/torch/measure_pp.py dp=2 (torch 2.13, gloo, 4 ranks): DDP on each stage's dp group, the
  // schedule's backwards under no_sync but the last, whose hooks fill the persistent buckets.
  const std::vector<std::string> sets{"model.family=gpt2", "model.vocab_size=97", "model.seq_len=16", "model.d_model=32",
                                      "model.n_heads=4", "model.n_layers=2", "training.batch_size=2",
                                      "runtime.profile=torch2-cpu", "parallel.pp=2", "parallel.microbatches=2",
                                      "parallel.dp=2"};
  const nlohmann::json j = report::to_json(study::analyze(study::load_scenario("", sets)), -1);
  REQUIRE(j["ranks"].size() == 2);
  const auto& s0 = j["ranks"][0]["figures"];
  const auto& s1 = j["ranks"][1]["figures"];
  CHECK(s0["peak"]["bytes"] == 461256);
  CHECK(s0["live_bytes"]["end_forward"] == 428360);
  CHECK(s0["live_bytes"]["end_backward"] == 336184);
  CHECK(s1["peak"]["bytes"] == 459856);
  // The last stage's received-input gradient is still held when step() returns: DDP's finalize
  // ends the lowering's backward after pp.send_input_grad (study/src/pipeline.cpp, segment_of).
  CHECK(s1["live_bytes"]["step_start"] == 263740);
  CHECK(s1["live_bytes"]["end_forward"] == 435024);
  CHECK(s1["live_bytes"]["end_backward"] == 327228);
  CHECK(s1["live_bytes"]["end_optimizer"] == 327228);
}
// ---- end ppdp ----
