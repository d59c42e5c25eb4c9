// Tests of the IR (graph.hpp, types.hpp), the stride rules of the tracer (PyTorch's computeStride)
// and the runtime profiles' save rules.
#include <catch2/catch.hpp>

#include <algorithm>
#include <optional>
#include <set>
#include <string>
#include <type_traits>
#include <utility>

#include "../graph/src/builder.hpp"  // view_strides, is_contiguous: private to graph/, tested here
#include "actsim/graph/graph.hpp"
#include "actsim/graph/lower.hpp"
#include "actsim/graph/profile.hpp"

using namespace actsim::graph;

namespace {

// Strides of `shape` laid out contiguously, then with dims d0 and d1 swapped (a transpose view).
std::pair<Shape, Strides> transposed(Shape shape, int d0, int d1) {
  Strides st = contiguous_strides(shape);
  std::swap(shape[d0], shape[d1]);
  std::swap(st[d0], st[d1]);
  return {shape, st};
}

// All ops of `g` of kind `k`.
std::vector<const Op*> ops_of(const Graph& g, OpKind k) {
  std::vector<const Op*> out;
  for (const Op& op : g.ops()) {
    if (op.kind == k) out.push_back(&op);
  }
  return out;
}

ModelConfig tiny(Family f) {
  ModelConfig m;
  m.family = f;
  m.vocab_size = 97;
  m.seq_len = 16;
  m.d_model = 32;
  m.n_heads = 4;
  m.n_layers = 2;
  return m;
}

TrainingConfig tiny_training(DType dt = DType::f32) {
  TrainingConfig t;
  t.batch_size = 2;
  t.dtype = dt;
  return t;
}

}  // namespace

// ---- view_strides / is_contiguous ---------------------------------------------------------------

TEST_CASE("graph::view_strides: a contiguous tensor views as any shape with the same numel", "[graph]") {
  const Shape s{2, 4, 16, 8};  // (B, h, T, hd)
  auto st = view_strides(s, contiguous_strides(s), {8, 16, 8});
  REQUIRE(st.has_value());
  CHECK(*st == Strides{128, 8, 1});
  st = view_strides(s, contiguous_strides(s), {1024});
  REQUIRE(st.has_value());
  CHECK(*st == Strides{1});
  st = view_strides(s, contiguous_strides(s), {2, 4, 16, 8});
  REQUIRE(st.has_value());
  CHECK(*st == contiguous_strides(s));
}

TEST_CASE("graph::view_strides: (B,h,T,hd) transposed from (B,T,h,hd) cannot be reshaped to (B*h,T,hd)", "[graph]") {
  // q = x.view(B, T, h, hd).transpose(1, 2): strides (T*h*hd, hd, h*hd, 1).
  const int64_t B = 2, T = 16, h = 4, hd = 8;
  auto [shape, strides] = transposed({B, T, h, hd}, 1, 2);
  REQUIRE(shape == Shape{B, h, T, hd});
  REQUIRE(strides == Strides{T * h * hd, hd, h * hd, 1});
  CHECK_FALSE(is_contiguous(shape, strides));
  CHECK_FALSE(view_strides(shape, strides, {B * h, T, hd}).has_value());
  CHECK_FALSE(view_strides(shape, strides, {B, h, T * hd}).has_value());
  // Splitting a dim, or merging nothing, is still a view.
  auto st = view_strides(shape, strides, {B, h, T, 2, hd / 2});
  REQUIRE(st.has_value());
  CHECK(*st == Strides{T * h * hd, hd, h * hd, hd / 2, 1});
  // After .transpose(1, 2) back, the original layout flattens freely.
  CHECK(view_strides({B, T, h, hd}, contiguous_strides({B, T, h, hd}), {B, T, h * hd}).has_value());
}

TEST_CASE("graph::view_strides: a transposed matrix cannot be flattened without a copy", "[graph]") {
  auto [shape, strides] = transposed({3, 5}, 0, 1);
  CHECK(strides == Strides{1, 5});
  CHECK_FALSE(view_strides(shape, strides, {15}).has_value());
  // Adding or dropping size-1 dims keeps it a view.
  auto st = view_strides(shape, strides, {5, 1, 3});
  REQUIRE(st.has_value());
  CHECK((*st)[0] == 1);
  CHECK((*st)[2] == 5);
}

TEST_CASE("graph::view_strides: a slice of the last dim (split of qkv) views heads but not rows", "[graph]") {
  // qkv (B, T, 3C) contiguous; q = qkv.split(C, dim=2)[0] has strides (3C*T, 3C, 1).
  const int64_t B = 2, T = 16, C = 32, h = 4;
  const Shape s{B, T, C};
  const Strides st{T * 3 * C, 3 * C, 1};
  auto v = view_strides(s, st, {B, T, h, C / h});
  REQUIRE(v.has_value());
  CHECK(*v == Strides{T * 3 * C, 3 * C, C / h, 1});
  auto rows = view_strides(s, st, {B * T, C});
  REQUIRE(rows.has_value());
  CHECK(*rows == Strides{3 * C, 1});
  CHECK_FALSE(view_strides(s, st, {B, T * C}).has_value());
}

TEST_CASE("graph::view_strides: expanded (stride 0) dims cannot merge with others", "[graph]") {
  const Shape s{2, 3};
  const Strides st{0, 1};
  CHECK_FALSE(view_strides(s, st, {6}).has_value());
  auto v = view_strides(s, st, {2, 3, 1});
  REQUIRE(v.has_value());
  CHECK((*v)[0] == 0);
  CHECK((*v)[1] == 1);
}

TEST_CASE("graph::view_strides: 0-dim and empty tensors", "[graph]") {
  auto v = view_strides({}, {}, {1, 1});
  REQUIRE(v.has_value());
  CHECK(*v == Strides{1, 1});
  // numel 0: always viewable; the same shape keeps its strides.
  auto same = view_strides({0, 4}, {7, 1}, {0, 4});
  REQUIRE(same.has_value());
  CHECK(*same == Strides{7, 1});
  auto e = view_strides({0, 4}, {4, 1}, {4, 0});
  REQUIRE(e.has_value());
  CHECK(e->size() == 2);
  CHECK(e->back() == 1);
}

TEST_CASE("graph::is_contiguous: size-1 dims may have any stride", "[graph]") {
  CHECK(is_contiguous({2, 3, 4}, contiguous_strides({2, 3, 4})));
  CHECK(is_contiguous({1, 4}, {100, 1}));
  CHECK(is_contiguous({4, 1}, {1, 7}));
  CHECK(is_contiguous({}, {}));
  CHECK_FALSE(is_contiguous({3, 4}, {1, 3}));
  CHECK_FALSE(is_contiguous({3, 4}, {8, 1}));  // a row slice with a gap
  CHECK_FALSE(is_contiguous({2, 3}, {0, 1}));  // expanded
}

// ---- value types --------------------------------------------------------------------------------

TEST_CASE("graph::types: dtype sizes, names and contiguous strides", "[graph]") {
  CHECK(dtype_size(DType::f32) == 4);
  CHECK(dtype_size(DType::bf16) == 2);
  CHECK(dtype_size(DType::f16) == 2);
  CHECK(dtype_size(DType::f64) == 8);
  CHECK(dtype_size(DType::i64) == 8);
  CHECK(dtype_size(DType::i32) == 4);
  CHECK(dtype_size(DType::b8) == 1);
  CHECK(dtype_size(DType::u8) == 1);
  CHECK(to_string(DType::bf16) == "bfloat16");
  CHECK(to_string(DType::b8) == "bool");
  CHECK(is_floating(DType::f16));
  CHECK_FALSE(is_floating(DType::i64));
  CHECK_FALSE(is_floating(DType::b8));
  CHECK(numel({8, 1024, 1600}) * dtype_size(DType::f32) == 52'428'800);
  CHECK(numel({}) == 1);
  CHECK(contiguous_strides({2, 3, 4}) == Strides{12, 4, 1});
  CHECK(shape_string({8, 1024, 1600}) == "[8, 1024, 1600]");
  CHECK(shape_string({}) == "[]");
}

TEST_CASE("graph::types: category and phase names are the memory table's", "[graph]") {
  const char* expected[] = {"parameters", "buffers", "optimizer_state", "inputs", "activations", "gradients",
                            "temporaries"};
  for (int c = 0; c < kNumCategories; ++c) CHECK(to_string(static_cast<Category>(c)) == expected[c]);
  CHECK(to_string(Phase::forward) == "forward");
  CHECK(to_string(Phase::backward) == "backward");
  CHECK(to_string(Phase::optimizer) == "optimizer");
}

TEST_CASE("graph::parse_op_kind: every kind round-trips through its name", "[graph]") {
  std::set<std::string> names;
  for (int i = 0; i < kNumOpKinds; ++i) {
    const OpKind k = static_cast<OpKind>(i);
    const std::string name(to_string(k));
    CHECK_FALSE(name.empty());
    names.insert(name);
    OpKind back = OpKind::view;
    REQUIRE(parse_op_kind(name, back));
    CHECK(back == k);
  }
  CHECK(names.size() == static_cast<size_t>(kNumOpKinds));  // names are distinct
  CHECK(to_string(OpKind::gelu_tanh) == "gelu_tanh");
  // OpKind::recompute (an unused marker) is gone: recompute ops keep their forward kind with
  // Op::recompute = true, so "recompute" names no op kind (issue 9, problem 6).
  { OpKind none = OpKind::add; CHECK_FALSE(parse_op_kind("recompute", none)); }
  OpKind k = OpKind::add;
  CHECK_FALSE(parse_op_kind("gelu", k));
  CHECK_FALSE(parse_op_kind("", k));
  CHECK_FALSE(parse_op_kind("Softmax", k));
  CHECK(k == OpKind::add);  // untouched on failure
}

// ---- Graph --------------------------------------------------------------------------------------

TEST_CASE("graph::Graph: ids are dense indices and producers are recorded", "[graph]") {
  Graph g;
  StorageId s0 = g.add_storage({.bytes = 4096, .category = Category::parameter});
  StorageId s1 = g.add_storage({.bytes = 4096, .category = Category::activation});
  CHECK(index(s0) == 0);
  CHECK(index(s1) == 1);
  TensorId w = g.add_tensor({.name = "w", .shape = {32, 32}, .dtype = DType::f32, .storage = s0});
  TensorId x = g.add_tensor({.name = "x", .shape = {32, 32}, .dtype = DType::f32, .storage = s1});
  TensorId xt = g.add_tensor({.name = "x.T", .shape = {32, 32}, .strides = {1, 32}, .dtype = DType::f32,
                              .storage = s1, .is_view = true});
  CHECK(index(w) == 0);
  CHECK(index(x) == 1);
  CHECK(index(xt) == 2);
  CHECK(g.tensor(x).strides == Strides{32, 1});    // empty strides become contiguous
  CHECK(g.tensor(xt).strides == Strides{1, 32});   // given strides are kept
  CHECK(g.storage(s1).first == x);                 // the first tensor names the storage
  CHECK(g.view_bytes(x) == 4096);

  g.n_layers = 1;
  OpId o0 = g.add_op({.kind = OpKind::gelu_tanh, .phase = Phase::forward, .layer = 0, .name = "gelu",
                      .inputs = {w}, .outputs = {x}});
  OpId o1 = g.add_op({.kind = OpKind::view, .phase = Phase::forward, .layer = 0, .name = "t", .inputs = {x},
                      .outputs = {xt}, .kernels = 0});
  CHECK(index(o0) == 0);
  CHECK(index(o1) == 1);
  CHECK(g.n_ops() == 2);
  CHECK(g.tensor(x).producer == o0);
  CHECK(g.tensor(xt).producer == o1);
  CHECK(g.tensor(w).producer == kNoOp);
  CHECK(g.storage(s1).producer == o0);  // the view does not take over its base's storage
  CHECK(g.storage(s1).layer == 0);
  CHECK(g.storage(s0).producer == kNoOp);
  CHECK_FALSE(g.is_frozen());
  g.freeze();
  CHECK(g.is_frozen());
}

TEST_CASE("graph::Graph::validate: tensors that fit their storage exactly pass", "[graph]") {
  // The overrun case aborts through ACTSIM_ASSERT (a bug, not bad input), so it is not run here;
  // these are the boundary cases that must not trip it.
  Graph g;
  StorageId s = g.add_storage({.bytes = 12 * 4});
  TensorId base = g.add_tensor({.name = "base", .shape = {3, 4}, .storage = s});
  // Last column: offset 3, shape (3, 1), stride 4 -> last element 3 + 2*4 = 11, the storage's last.
  TensorId col = g.add_tensor({.name = "col", .shape = {3, 1}, .strides = {4, 1}, .offset = 3, .storage = s,
                               .is_view = true});
  // Every other row as int32 of the same bytes.
  TensorId rows = g.add_tensor({.name = "rows", .shape = {2, 4}, .strides = {8, 1}, .dtype = DType::i32,
                                .storage = s, .is_view = true});
  StorageId empty = g.add_storage({.bytes = 0});
  TensorId e = g.add_tensor({.name = "empty", .shape = {0, 7}, .storage = empty});
  StorageId scalar = g.add_storage({.bytes = 8, .location = Location::host});
  TensorId sc = g.add_tensor({.name = "scalar", .shape = {}, .dtype = DType::f64, .storage = scalar});
  g.add_op({.kind = OpKind::ones, .outputs = {base, sc}});
  g.add_op({.kind = OpKind::view, .inputs = {base}, .outputs = {col, rows}, .kernels = 0});
  g.add_op({.kind = OpKind::add, .inputs = {col, rows, sc}, .outputs = {e}, .holds = {base}});
  g.validate();
  g.freeze();
  CHECK(g.is_frozen());
  CHECK(g.view_bytes(col) == 12);
  CHECK(g.view_bytes(e) == 0);
  CHECK(g.view_bytes(sc) == 8);
}

// ---- runtime profiles ---------------------------------------------------------------------------

TEST_CASE("graph::profile: the two runtimes' documented differences", "[graph]") {
  const RuntimeProfile& cpu = profile(ProfileId::torch_cpu);
  const RuntimeProfile& cuda = profile(ProfileId::torch_cuda);
  CHECK(cpu.name == "torch-cpu");
  CHECK(cuda.name == "torch-cuda");
  CHECK(cpu.dropout == DropoutImpl::noise_in_model_dtype);
  CHECK(cuda.dropout == DropoutImpl::bool_mask);
  CHECK(cuda.layer_norm_stats_fp32);
  CHECK_FALSE(cpu.layer_norm_stats_fp32);
  CHECK(cpu.mean_saves_input);
  CHECK_FALSE(cuda.mean_saves_input);
  CHECK(cuda.scalar_location == Location::host);
  CHECK(cpu.scalar_location == Location::device);
  CHECK(cuda.has_sdpa);
  CHECK_FALSE(cpu.has_sdpa);

  // The rule tables agree with the flags.
  REQUIRE(cpu.rule(OpKind::mean_last) != nullptr);
  CHECK(cpu.rule(OpKind::mean_last)->n_saves == 1);
  CHECK(cpu.rule(OpKind::mean_last)->saves[0].slot == 0);
  REQUIRE(cuda.rule(OpKind::mean_last) != nullptr);
  CHECK(cuda.rule(OpKind::mean_last)->n_saves == 0);
  CHECK(cpu.rule(OpKind::native_dropout) == nullptr);
  REQUIRE(cuda.rule(OpKind::native_dropout) != nullptr);
  CHECK(cuda.rule(OpKind::native_dropout)->saves[0].slot == kOut + 1);  // the mask
  // torch-cuda shares torch2-cpu's rules: the noise rule is there, saves nothing, and never fires
  // (the bool-mask delta makes dropout native_dropout).
  REQUIRE(cuda.rule(OpKind::dropout_noise) != nullptr);
  CHECK(cuda.rule(OpKind::dropout_noise)->n_saves == 0);
  for (const RuntimeProfile* p : {&cpu, &cuda}) {
    for (const SaveRule& r : p->rules) {
      CHECK(r.n_saves >= 0);
      CHECK(r.n_saves <= 6);
      CHECK_FALSE(r.source.empty());
    }
    // One rule per kind.
    std::set<int> kinds;
    for (const SaveRule& r : p->rules) kinds.insert(static_cast<int>(r.op));
    CHECK(kinds.size() == p->rules.size());
  }

  ProfileId id = ProfileId::torch_cuda;
  REQUIRE(parse_profile("torch-cpu", id));
  CHECK(id == ProfileId::torch_cpu);
  REQUIRE(parse_profile("torch-cuda", id));
  CHECK(id == ProfileId::torch_cuda);
  CHECK_FALSE(parse_profile("torch_cpu", id));
  CHECK(id == ProfileId::torch_cuda);
}

TEST_CASE("graph::profile: torch-cpu dropout is a noise tensor in the model dtype, saved by the mul", "[graph]") {
  ModelConfig m = tiny(Family::gpt2);
  m.dropout = 0.1;
  StepGraph s = lower_forward(m, tiny_training(DType::bf16), profile(ProfileId::torch_cpu));
  const Graph& g = s.graph;
  CHECK(ops_of(g, OpKind::native_dropout).empty());
  auto noise_ops = ops_of(g, OpKind::dropout_noise);
  REQUIRE(noise_ops.size() == 7);  // drop + 3 per block
  for (size_t i = 0; i < g.n_ops(); ++i) {
    const Op& op = g.ops()[i];
    if (op.kind != OpKind::dropout_noise) continue;
    REQUIRE(op.outputs.size() == 1);
    const TensorId noise = op.outputs[0];
    CHECK(g.tensor(noise).dtype == DType::bf16);
    CHECK(op.saved.empty());
    // The next op is `input * noise`, which keeps the noise (the input needs grad).
    REQUIRE(i + 1 < g.n_ops());
    const Op& mul = g.ops()[i + 1];
    CHECK(mul.kind == OpKind::mul);
    CHECK(std::find(mul.inputs.begin(), mul.inputs.end(), noise) != mul.inputs.end());
    CHECK(std::find(mul.saved.begin(), mul.saved.end(), noise) != mul.saved.end());
  }
}

TEST_CASE("graph::profile: torch-cuda dropout is native_dropout keeping a bool mask", "[graph]") {
  ModelConfig m = tiny(Family::gpt2);
  m.dropout = 0.1;
  StepGraph s = lower_forward(m, tiny_training(DType::bf16), profile(ProfileId::torch_cuda));
  const Graph& g = s.graph;
  CHECK(ops_of(g, OpKind::dropout_noise).empty());
  auto drops = ops_of(g, OpKind::native_dropout);
  REQUIRE(drops.size() == 7);
  for (const Op* op : drops) {
    REQUIRE(op->outputs.size() == 2);
    CHECK(g.tensor(op->outputs[0]).dtype == DType::bf16);
    CHECK(g.tensor(op->outputs[1]).dtype == DType::b8);
    REQUIRE(op->saved.size() == 1);
    CHECK(op->saved[0] == op->outputs[1]);
  }
}

TEST_CASE("graph::profile: layer_norm statistics are fp32 on torch-cuda, the input dtype on torch-cpu", "[graph]") {
  for (ProfileId id : {ProfileId::torch_cuda, ProfileId::torch_cpu}) {
    StepGraph s = lower_forward(tiny(Family::gpt2), tiny_training(DType::bf16), profile(id));
    const Graph& g = s.graph;
    auto lns = ops_of(g, OpKind::layer_norm);
    REQUIRE(lns.size() == 5);  // ln_1, ln_2 per block, ln_f
    const DType want = id == ProfileId::torch_cuda ? DType::f32 : DType::bf16;
    for (const Op* op : lns) {
      REQUIRE(op->outputs.size() == 3);
      CHECK(g.tensor(op->outputs[0]).dtype == DType::bf16);
      CHECK(g.tensor(op->outputs[1]).dtype == want);
      CHECK(g.tensor(op->outputs[2]).dtype == want);
      // Saves input, weight, bias, mean and rstd.
      CHECK(op->saved.size() == 5);
    }
  }
}

TEST_CASE("graph::profile: mean(-1) saves its input on torch-cpu only", "[graph]") {
  for (ProfileId id : {ProfileId::torch_cuda, ProfileId::torch_cpu}) {
    StepGraph s = lower_forward(tiny(Family::llama), tiny_training(), profile(id));
    auto means = ops_of(s.graph, OpKind::mean_last);
    REQUIRE(means.size() == 5);  // attn_norm, ffn_norm per block, the final norm
    for (const Op* op : means) {
      if (id == ProfileId::torch_cpu) {
        REQUIRE(op->saved.size() == 1);
        CHECK(op->saved[0] == op->inputs[0]);
      } else {
        CHECK(op->saved.empty());
      }
    }
  }
}

TEST_CASE("graph::Graph: reads are const, writes are explicit and refused once frozen, but for rewrite()", "[graph]") {
  // tensor(), storage() and op() give const references on a mutable graph too.
  static_assert(std::is_const_v<std::remove_reference_t<decltype(std::declval<Graph&>().tensor(TensorId{0}))>>);
  static_assert(std::is_const_v<std::remove_reference_t<decltype(std::declval<Graph&>().storage(StorageId{0}))>>);
  static_assert(std::is_const_v<std::remove_reference_t<decltype(std::declval<Graph&>().op(OpId{0}))>>);
  Graph g;
  StorageId s = g.add_storage({.bytes = 16});
  TensorId x = g.add_tensor({.name = "x", .shape = {4}, .storage = s});
  g.add_op({.kind = OpKind::ones, .outputs = {x}});
  g.mutable_tensor(x).name = "y";  // while building
  g.freeze();
  g.rewrite([&](Graph& w) { w.mutable_storage(s).bytes = 32; });  // validated and frozen again
  CHECK(g.is_frozen());
  CHECK(g.tensor(x).name == "y");
  CHECK(g.storage(s).bytes == 32);
}
