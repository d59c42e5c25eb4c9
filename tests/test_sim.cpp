// Tests of the event engine and memory tracker (sim/engine), the roofline time model and
// study::parse_size, on a hand-built graph whose every event is worked out below.
#include <catch2/catch.hpp>

#include <algorithm>
#include <string>
#include <vector>

#include "actsim/graph/graph.hpp"
#include "actsim/sim/device.hpp"
#include "actsim/sim/engine.hpp"
#include "actsim/study/analyze.hpp"
#include "actsim/study/scenario.hpp"

using namespace actsim;
using namespace actsim::graph;
using sim::DeviceSpec;
using sim::Observer;
using sim::StepTables;
using sim::SimResult;

namespace {

// 1 byte/ns of bandwidth, 1 FLOP/ns... times 1000, and 1 us per launch: durations are easy sums.
DeviceSpec test_device() {
  DeviceSpec d;
  d.name = "test";
  d.memory_bytes = 1 << 20;
  d.flops_fp32 = 1e12;
  d.flops_bf16 = 4e12;
  d.flops_fp16 = 4e12;
  d.mem_bandwidth = 1e9;
  d.launch_overhead_ns = 1000;
  d.matmul_efficiency = 0.5;
  return d;
}

// A five-op step:
//
//   P   parameter, 1000 B, exists before the step          step  optimizer state on the host, 4 B
//   op0 forward  gelu(P) -> A (400 B), 64 B workspace     1000 B moved         -> 2000 ns
//   op1 forward  gelu(A) -> B (400 B), S (host, 8 B)      2000 B moved         -> 3000 ns
//   op2 forward  view(B) -> V (no memory, no kernel)                           ->    0 ns
//   op3 backward of op1: (V, S) -> C (gradient, 800 B)    4e6 FLOPs, 100 B     -> 5000 ns
//   op4 optimizer update(P, C, step), 2 kernels           500 B moved          -> 2500 ns
//
// Device live bytes: 1000 at start; op0 start +400 +64 = 1464; op0 end -64 = 1400; op1 start
// +400 = 1800 (S is host memory); op1 end frees A = 1400; op3 start +800 = 2200 (the peak);
// op3 end frees B (its view's last use) = 1800 and S (host); op4 end frees C = 1000.
struct TinyStep {
  Graph g;
  StorageId P, step, A, B, S, C;
  TensorId p, st, a, b, s, v, c;
  OpId op0, op1, op2, op3, op4;

  TinyStep() {
    P = g.add_storage({.bytes = 1000, .category = Category::parameter});
    step = g.add_storage({.bytes = 4, .category = Category::optimizer_state, .location = Location::host});
    A = g.add_storage({.bytes = 400});
    B = g.add_storage({.bytes = 400});
    S = g.add_storage({.bytes = 8, .location = Location::host});
    C = g.add_storage({.bytes = 800, .category = Category::gradient});
    p = g.add_tensor({.name = "p", .shape = {250}, .storage = P, .requires_grad = true});
    st = g.add_tensor({.name = "step", .shape = {}, .storage = step});
    a = g.add_tensor({.name = "a", .shape = {100}, .storage = A});
    b = g.add_tensor({.name = "b", .shape = {100}, .storage = B});
    s = g.add_tensor({.name = "s", .shape = {}, .dtype = DType::f64, .storage = S});
    v = g.add_tensor({.name = "v", .shape = {10, 10}, .storage = B, .is_view = true});
    c = g.add_tensor({.name = "c", .shape = {200}, .storage = C});
    op0 = g.add_op({.kind = OpKind::gelu_tanh, .phase = Phase::forward, .name = "op0", .inputs = {p},
                    .outputs = {a}, .workspace_bytes = 64, .bytes_moved = 1000});
    op1 = g.add_op({.kind = OpKind::gelu_tanh, .phase = Phase::forward, .name = "op1", .inputs = {a},
                    .outputs = {b, s}, .bytes_moved = 2000});
    op2 = g.add_op({.kind = OpKind::view, .phase = Phase::forward, .name = "op2", .inputs = {b}, .outputs = {v},
                    .kernels = 0, .params = {.view = ViewKind::reshape}});
    op3 = g.add_op({.kind = OpKind::backward, .phase = Phase::backward, .name = "op3", .inputs = {v, s},
                    .outputs = {c}, .flops = 4e6, .bytes_moved = 100, .forward = op1});
    op4 = g.add_op({.kind = OpKind::optim_update, .phase = Phase::optimizer, .name = "op4", .inputs = {p, c, st},
                    .bytes_moved = 500, .kernels = 2});
    g.freeze();
  }
};

// Records every event in order.
struct Recorder : Observer {
  struct Ev {
    char kind;  // 's' start, 'e' end, 'a' alloc, 'f' free, 'w' workspace
    uint32_t id;
    int64_t time, live, bytes;
  };
  std::vector<Ev> evs;
  void on_op_start(OpId op, int64_t t) override { evs.push_back({'s', index(op), t, -1, 0}); }
  void on_op_end(OpId op, int64_t t) override { evs.push_back({'e', index(op), t, -1, 0}); }
  void on_alloc(StorageId s, OpId, int64_t t, int64_t live) override { evs.push_back({'a', index(s), t, live, 0}); }
  void on_free(StorageId s, OpId, int64_t t, int64_t live) override { evs.push_back({'f', index(s), t, live, 0}); }
  void on_workspace(OpId op, int64_t bytes, int64_t t, int64_t live) override {
    evs.push_back({'w', index(op), t, live, bytes});
  }
  std::string kinds() const {
    std::string k;
    for (const Ev& e : evs) k += e.kind;
    return k;
  }
};

SimResult run(const StepTables& plan, Observer* o = nullptr) {
  if (!o) return sim::simulate(plan);
  Observer* const obs[] = {o};
  return sim::simulate(plan, obs);
}

void check_equal(const SimResult& x, const SimResult& y) {
  CHECK(x.peak_bytes == y.peak_bytes);
  CHECK(x.peak_time_ns == y.peak_time_ns);
  CHECK(x.peak_op == y.peak_op);
  CHECK(x.peak_phase == y.peak_phase);
  CHECK(x.peak_by_category == y.peak_by_category);
  CHECK(x.live_at_peak == y.live_at_peak);
  CHECK(x.step_start_by_category == y.step_start_by_category);
  CHECK(x.live_step_start == y.live_step_start);
  CHECK(x.live_end_forward == y.live_end_forward);
  CHECK(x.live_end_backward == y.live_end_backward);
  CHECK(x.live_end_optimizer == y.live_end_optimizer);
  CHECK(x.live_end_step == y.live_end_step);
  CHECK(x.phase_end_ns == y.phase_end_ns);
  CHECK(x.step_time_ns == y.step_time_ns);
  CHECK(x.events == y.events);
  CHECK(x.host_bytes == y.host_bytes);
}

}  // namespace

// ---- StepTables ---------------------------------------------------------------------------------

TEST_CASE("sim::StepTables: allocations at the producer, uses by every reader, persistent leaves", "[sim]") {
  TinyStep t;
  StepTables plan(t.g, test_device());
  auto ids = [](std::span<const StorageId> s) {
    std::vector<uint32_t> v;
    for (StorageId x : s) v.push_back(index(x));
    std::sort(v.begin(), v.end());
    return v;
  };
  CHECK(ids(plan.allocs(t.op0)) == std::vector<uint32_t>{index(t.A)});
  CHECK(ids(plan.allocs(t.op1)) == std::vector<uint32_t>{index(t.B), index(t.S)});
  CHECK(plan.allocs(t.op2).empty());  // a view allocates nothing
  CHECK(ids(plan.allocs(t.op3)) == std::vector<uint32_t>{index(t.C)});
  CHECK(plan.allocs(t.op4).empty());
  CHECK(plan.use_count(t.A) == 2);  // op0 writes it, op1 reads it
  CHECK(plan.use_count(t.B) == 3);  // op1, the view op (once, though it reads and outputs it), op3
  CHECK(plan.use_count(t.S) == 2);
  CHECK(plan.use_count(t.C) == 2);
  CHECK(plan.is_persistent(t.P));
  CHECK(plan.is_persistent(t.step));
  CHECK_FALSE(plan.is_persistent(t.A));
  CHECK(plan.duration_ns(t.op0) == 2000);
  CHECK(plan.duration_ns(t.op1) == 3000);
  CHECK(plan.duration_ns(t.op2) == 0);
  CHECK(plan.duration_ns(t.op3) == 5000);
  CHECK(plan.duration_ns(t.op4) == 2500);
  for (size_t i = 0; i < t.g.n_ops(); ++i) CHECK(plan.cross_stream_deps(OpId{static_cast<uint32_t>(i)}).empty());
}

// ---- the engine ---------------------------------------------------------------------------------

TEST_CASE("sim::simulate: peak, phase ends and times of a hand-built step", "[sim]") {
  TinyStep t;
  StepTables plan(t.g, test_device());
  SimResult r = run(plan);
  CHECK(r.live_step_start == 1000);  // P; the host 'step' scalar is not device memory
  CHECK(r.step_start_by_category[static_cast<size_t>(Category::parameter)] == 1000);
  CHECK(r.step_start_by_category[static_cast<size_t>(Category::optimizer_state)] == 0);
  CHECK(r.peak_bytes == 2200);
  CHECK(r.peak_op == t.op3);
  CHECK(r.peak_phase == Phase::backward);
  CHECK(r.peak_time_ns == 5000);
  CHECK(r.peak_by_category[static_cast<size_t>(Category::parameter)] == 1000);
  CHECK(r.peak_by_category[static_cast<size_t>(Category::activation)] == 400);
  CHECK(r.peak_by_category[static_cast<size_t>(Category::gradient)] == 800);
  CHECK(r.peak_by_category[static_cast<size_t>(Category::temporary)] == 0);
  std::vector<StorageId> live = r.live_at_peak;
  std::sort(live.begin(), live.end());
  CHECK(live == std::vector<StorageId>{t.P, t.B, t.C});  // host storages are not listed
  CHECK(r.live_end_forward == 1400);
  CHECK(r.live_end_backward == 1800);
  CHECK(r.live_end_optimizer == 1000);
  CHECK(r.live_end_step == 1000);
  CHECK(r.phase_end_ns == std::array<int64_t, 3>{5000, 10000, 12500});
  CHECK(r.step_time_ns == 12500);
  CHECK(r.host_bytes == 4 + 8);
  // 5 starts + 5 ends, 4 allocations + 4 frees, the workspace's alloc and free.
  CHECK(r.events == 10 + 8 + 2);
}

TEST_CASE("sim::simulate: an observer sees allocation at op start, free after last use, in order", "[sim]") {
  TinyStep t;
  StepTables plan(t.g, test_device());
  Recorder rec;
  SimResult r = run(plan, &rec);
  // start0 allocA ws+ | ws- end0 | start1 allocB allocS | freeA end1 | start2 end2 |
  // start3 allocC | freeB freeS end3 | start4 | freeC end4
  CHECK(rec.kinds() == "saw" "we" "saa" "fe" "se" "sa" "ffe" "s" "fe");
  const auto& e = rec.evs;
  REQUIRE(e.size() == 20);
  auto at = [&](size_t i, char k, uint32_t id, int64_t time, int64_t live) {
    INFO("event " << i);
    CHECK(e[i].kind == k);
    CHECK(e[i].id == id);
    CHECK(e[i].time == time);
    if (live >= 0) CHECK(e[i].live == live);
  };
  at(0, 's', index(t.op0), 0, -1);
  at(1, 'a', index(t.A), 0, 1400);
  at(2, 'w', index(t.op0), 0, 1464);
  CHECK(e[2].bytes == 64);
  at(3, 'w', index(t.op0), 2000, 1400);  // workspace freed when its op ends
  CHECK(e[3].bytes == -64);
  at(4, 'e', index(t.op0), 2000, -1);
  at(5, 's', index(t.op1), 2000, -1);
  at(6, 'a', index(t.B), 2000, 1800);
  at(7, 'a', index(t.S), 2000, 1800);  // host: device live unchanged
  at(8, 'f', index(t.A), 5000, 1400);  // after its last use (op1) ends
  at(9, 'e', index(t.op1), 5000, -1);
  at(10, 's', index(t.op2), 5000, -1);
  at(11, 'e', index(t.op2), 5000, -1);
  at(12, 's', index(t.op3), 5000, -1);
  at(13, 'a', index(t.C), 5000, 2200);
  at(14, 'f', index(t.B), 10000, 1800);  // its view's last reader ended
  at(15, 'f', index(t.S), 10000, 1800);
  at(16, 'e', index(t.op3), 10000, -1);
  at(17, 's', index(t.op4), 10000, -1);
  at(18, 'f', index(t.C), 12500, 1000);
  at(19, 'e', index(t.op4), 12500, -1);

  // Time never goes backwards; every op starts before it ends, in graph order on one stream.
  for (size_t i = 1; i < e.size(); ++i) CHECK(e[i].time >= e[i - 1].time);
  // Every storage allocated during the step is freed exactly once; the running total returns to
  // where it started.
  std::vector<int> balance(t.g.storages().size(), 0);
  for (const auto& x : e) {
    if (x.kind == 'a') ++balance[x.id];
    if (x.kind == 'f') {
      CHECK(balance[x.id] == 1);
      --balance[x.id];
    }
  }
  for (int b : balance) CHECK(b == 0);
  CHECK(e.back().kind == 'e');
  CHECK(e[18].live == r.live_step_start);
  CHECK(r.live_end_step == r.live_step_start);
}

TEST_CASE("sim::simulate: deterministic, and two observers see the same events", "[sim]") {
  TinyStep t;
  StepTables plan(t.g, test_device());
  Recorder r1, r2;
  Observer* const both[] = {&r1, &r2};
  SimResult a = sim::simulate(plan, both);
  SimResult b = run(plan);
  check_equal(a, b);
  REQUIRE(r1.evs.size() == r2.evs.size());
  CHECK(r1.kinds() == r2.kinds());

  // The same on a lowered model: two runs agree, time is monotone and live bytes balance.
  study::Analysis an = study::analyze(study::load_scenario(
      "", {"model.family=llama", "model.vocab_size=97", "model.seq_len=16", "model.d_model=32", "model.n_heads=4",
           "model.n_kv_heads=2", "model.n_layers=2", "training.batch_size=2"}));
  Recorder rec;
  SimResult x = run(*an.tables, &rec);
  SimResult y = run(*an.tables);
  check_equal(x, y);
  check_equal(x, an.result);
  int64_t live = x.live_step_start, peak = live, allocs = 0, frees = 0, starts = 0, ends = 0;
  bool monotone = true, balanced = true;
  for (size_t i = 0; i < rec.evs.size(); ++i) {
    const auto& ev = rec.evs[i];
    if (i > 0) monotone = monotone && ev.time >= rec.evs[i - 1].time;
    if (ev.kind == 'a' || ev.kind == 'f' || ev.kind == 'w') {
      const graph::Storage* st = ev.kind == 'w' ? nullptr : &an.step->graph.storages()[ev.id];
      const bool host = st && st->location == Location::host;
      // device allocations count as the allocator counts them (rounded to the profile's granularity)
      const int64_t dev = st ? an.step->graph.allocated(st->bytes) : 0;
      const int64_t bytes = ev.kind == 'w' ? ev.bytes : host ? 0 : (ev.kind == 'a' ? dev : -dev);
      live += bytes;
      balanced = balanced && live == ev.live;
      peak = std::max(peak, live);
      allocs += ev.kind == 'a';
      frees += ev.kind == 'f';
    }
    starts += ev.kind == 's';
    ends += ev.kind == 'e';
  }
  CHECK(monotone);
  CHECK(balanced);
  CHECK(peak == x.peak_bytes);
  CHECK(live == x.live_end_step);
  CHECK(starts == static_cast<int64_t>(an.step->graph.n_ops()));
  CHECK(ends == starts);
  CHECK(x.peak_bytes >= x.live_step_start);
  CHECK(x.live_end_forward > x.live_step_start);  // activations saved for backward
}

TEST_CASE("sim::simulate: a graph with no ops keeps its persistent storages", "[sim]") {
  Graph g;
  g.add_storage({.bytes = 123, .category = Category::parameter});
  g.add_storage({.bytes = 5, .category = Category::optimizer_state, .location = Location::host});
  g.freeze();
  StepTables plan(g, test_device());
  SimResult r = run(plan);
  CHECK(r.peak_bytes == 123);
  CHECK(r.live_step_start == 123);
  CHECK(r.live_end_step == 123);
  CHECK(r.host_bytes == 5);
  CHECK(r.events == 0);
  CHECK(r.step_time_ns == 0);
}

// ---- time model ---------------------------------------------------------------------------------

TEST_CASE("sim::op_time_ns: a pure-bandwidth op takes bytes / bandwidth plus launch overhead", "[sim]") {
  TinyStep t;
  const DeviceSpec d = test_device();
  Op op = t.g.op(t.op1);  // gelu, 2000 bytes, no FLOPs
  CHECK(sim::op_time_ns(t.g, op, d) == 2000 + 1000);
  op.kernels = 3;
  CHECK(sim::op_time_ns(t.g, op, d) == 2000 + 3000);
  op.kernels = 0;  // a view: no kernel, no time
  CHECK(sim::op_time_ns(t.g, op, d) == 0);

  // On a real device: 3.35 MB over H100's 3.35 TB/s is 1 us, plus its 4 us launch.
  const DeviceSpec& h100 = sim::find_device("H100-SXM-80GB");
  Op big = t.g.op(t.op1);
  big.bytes_moved = 3'350'000;
  CHECK(sim::op_time_ns(t.g, big, h100) == 1000 + h100.launch_overhead_ns);
  CHECK(h100.launch_overhead_ns == 4000);
}

TEST_CASE("sim::op_time_ns: compute-bound elementwise ops run at the fp32 rate, matmuls at the dtype's", "[sim]") {
  Graph g;
  StorageId s = g.add_storage({.bytes = 2 * 64});
  StorageId s32 = g.add_storage({.bytes = 4 * 64});
  TensorId x16 = g.add_tensor({.name = "x", .shape = {64}, .dtype = DType::bf16, .storage = s});
  TensorId x32 = g.add_tensor({.name = "y", .shape = {64}, .dtype = DType::f32, .storage = s32});
  const DeviceSpec d = test_device();
  // 1e6 FLOPs elementwise in bf16: fp32 rate 1e12 -> 1000 ns.
  Op ew{.kind = OpKind::gelu_tanh, .outputs = {x16}, .flops = 1e6, .bytes_moved = 10};
  CHECK(sim::op_time_ns(g, ew, d) == 1000 + 1000);
  // A bf16 mm: 4e12 * 0.5 efficiency -> 500 ns.
  Op mm{.kind = OpKind::mm, .outputs = {x16}, .flops = 1e6, .bytes_moved = 10};
  CHECK(sim::op_time_ns(g, mm, d) == 500 + 1000);
  // An fp32 mm: 1e12 * 0.5 -> 2000 ns.
  mm.outputs = {x32};
  CHECK(sim::op_time_ns(g, mm, d) == 2000 + 1000);
  // Roofline: the larger of compute and memory time.
  mm.bytes_moved = 5000;
  CHECK(sim::op_time_ns(g, mm, d) == 5000 + 1000);
}

// ---- parse_size ---------------------------------------------------------------------------------

TEST_CASE("study::parse_size: binary and decimal units, plain bytes", "[sim]") {
  int64_t b = -7;
  REQUIRE(study::parse_size("60GiB", b));
  CHECK(b == 64'424'509'440);
  REQUIRE(study::parse_size("60GB", b));
  CHECK(b == 60'000'000'000);
  REQUIRE(study::parse_size("64424509440", b));
  CHECK(b == 64'424'509'440);
  REQUIRE(study::parse_size("1.5TiB", b));
  CHECK(b == 1'649'267'441'664);
  REQUIRE(study::parse_size("512B", b));
  CHECK(b == 512);
  REQUIRE(study::parse_size("80 GiB", b));
  CHECK(b == 85'899'345'920);
  REQUIRE(study::parse_size("2KiB", b));
  CHECK(b == 2048);
  REQUIRE(study::parse_size("0", b));
  CHECK(b == 0);
}

TEST_CASE("study::parse_size: rejects what is not a size and leaves the output alone", "[sim]") {
  for (const char* bad : {"60 parsecs", "-1", "", "GiB", "1.5", "1e9", "60GiBs", "1.2.3GB", " 60GB",
                          "99999999999TiB", "0x10"}) {
    INFO(bad);
    int64_t b = 42;
    CHECK_FALSE(study::parse_size(bad, b));
    CHECK(b == 42);
  }
}
