// The CUDA backend's mechanics against host references, without the CPU backend: memory
// (alloc, upload, download, poison, the pool's high-water mark, cudaMemGetInfo), per-op timing
// with CUDA events, matrix products in every operand layout (row-major, transposed views,
// column-major outputs) in fp32 and bf16, a softmax, and the deterministic embedding backward.
// Exit status: 0 all pass, 1 a failure, 77 no CUDA device (ctest: skipped).
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "actsim/graph/graph.hpp"
#include "actsim/backends/backend.hpp"
#include "actsim/util/bf16.hpp"
#include "actsim/backends/cuda_info.hpp"

using namespace actsim;
using namespace actsim::graph;

namespace {

int failed = 0, passed = 0;
void check(bool ok, const std::string& what) {
  std::printf("%s %s\n", ok ? "ok  " : "FAIL", what.c_str());
  (ok ? passed : failed)++;
}

// A one-op graph whose tensors the test lays out by hand (kernels read only kind and params).
struct OneOp {
  Graph g;
  OpId op;
  explicit OneOp(OpKind k, OpParams p = {}) {
    op = g.add_op({.kind = k, .params = p});
  }
};

std::vector<float> randn(size_t n, uint64_t seed) {
  std::mt19937_64 r(seed);
  std::normal_distribution<float> d(0.f, 1.f);
  std::vector<float> v(n);
  for (float& x : v) x = d(r);
  return v;
}

// C (m x n) = A (m x k) @ B (k x n) on the GPU with A row-major, B given as the transposed view
// of a row-major (n x k) matrix (a column-major operand), C written with `c_strides`.
bool mm_case(backends::Backend& be, DType dt, int64_t m, int64_t k, int64_t n, Strides c_strides) {
  const int64_t es = dtype_size(dt);
  std::vector<float> a = randn(m * k, 1), bt = randn(n * k, 2);
  auto enc = [&](const std::vector<float>& v) {
    std::vector<uint8_t> out(v.size() * es);
    for (size_t i = 0; i < v.size(); ++i) {
      if (dt == DType::f32) std::memcpy(&out[i * 4], &v[i], 4);
      else { uint16_t h = util::to_bf16(v[i]); std::memcpy(&out[i * 2], &h, 2); }
    }
    return out;
  };
  auto dec = [&](const uint8_t* p, int64_t i) {
    if (dt == DType::f32) { float f; std::memcpy(&f, p + i * 4, 4); return f; }
    uint16_t h; std::memcpy(&h, p + i * 2, 2); return util::from_bf16(h);
  };
  std::vector<uint8_t> ha = enc(a), hb = enc(bt);
  void* da = be.alloc(ha.size());
  void* db = be.alloc(hb.size());
  void* dc = be.alloc(m * n * es);
  be.upload(da, ha.data(), ha.size());
  be.upload(db, hb.data(), hb.size());
  OneOp o(OpKind::mm);
  backends::OpCall call{.graph = &o.g, .op = o.op};
  call.inputs.push_back({.base = da, .dtype = dt, .shape = {m, k}, .strides = {k, 1}});
  call.inputs.push_back({.base = db, .dtype = dt, .shape = {k, n}, .strides = {1, k}});
  call.outputs.push_back({.base = dc, .dtype = dt, .shape = {m, n}, .strides = c_strides});
  be.run(call);
  std::vector<uint8_t> hc(m * n * es);
  be.download(hc.data(), dc, hc.size());
  double worst = 0;
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < n; ++j) {
      double ref = 0;
      for (int64_t p = 0; p < k; ++p) ref += double(dec(ha.data(), i * k + p)) * dec(hb.data(), j * k + p);
      const double got = dec(hc.data(), i * c_strides[0] + j * c_strides[1]);
      const double tol = dt == DType::f32 ? 1e-4 * (1 + std::fabs(ref)) : (1.0 / 64) * std::fabs(ref) + 1e-2;
      worst = std::max(worst, std::fabs(got - ref) / tol);
    }
  }
  be.free(da);
  be.free(db);
  be.free(dc);
  return worst <= 1;
}

}  // namespace

int main() {
  if (backends::cuda_device_count() <= 0) {
    std::printf("test_cuda_backend: no CUDA device; skipped\n");
    return 77;
  }
  const int64_t free0 = backends::cuda_free_bytes();
  check(free0 > 0, "cuda_free_bytes() > 0 before any allocation (" + std::to_string(free0) + ")");
  auto be = backends::make_backend("cuda");
  check(be->name() == "cuda", "make_backend(\"cuda\") names itself cuda");

  // Memory: round trip, poison, pool high-water.
  backends::cuda_reset_peak();
  const int64_t bytes = int64_t{64} << 20;
  std::vector<uint8_t> h(bytes), back(bytes);
  for (int64_t i = 0; i < bytes; ++i) h[i] = static_cast<uint8_t>(i * 131 + 7);
  void* p = be->alloc(bytes);
  be->upload(p, h.data(), bytes);
  be->download(back.data(), p, bytes);
  check(back == h, "upload then download returns the same 64 MiB");
  be->fill_nan(p, bytes);
  be->download(back.data(), p, bytes);
  bool all_ff = true;
  for (uint8_t x : back) all_ff = all_ff && x == 0xFF;
  check(all_ff, "fill_nan writes 0xFF into every byte");
  be->synchronize();
  const backends::CudaMemory mem = backends::cuda_memory();
  check(mem.pool_used_high >= bytes, "pool high-water mark covers the live 64 MiB (" + std::to_string(mem.pool_used_high) + ")");
  check(mem.total_bytes > 0 && mem.free_bytes > 0, "cudaMemGetInfo reports free and total");
  be->free(p);

  // Matrix products in every layout cuBLAS is handed.
  check(mm_case(*be, DType::f32, 33, 70, 17, {17, 1}), "mm f32: row-major A, column-major B, row-major C");
  check(mm_case(*be, DType::f32, 33, 70, 17, {1, 33}), "mm f32: column-major C (mm backward's gradient layout)");
  check(mm_case(*be, DType::f32, 8, 5, 9, {20, 2}), "mm f32: C with no unit stride (packed through scratch)");
  check(mm_case(*be, DType::bf16, 64, 256, 48, {48, 1}), "mm bf16 with fp32 accumulation");

  // Softmax over rows, and per-op timing with events.
  {
    const int64_t rows = 300, cols = 1000;
    std::vector<float> x = randn(rows * cols, 3);
    void* dx = be->alloc(rows * cols * 4);
    void* dy = be->alloc(rows * cols * 4);
    be->upload(dx, x.data(), rows * cols * 4);
    OneOp o(OpKind::softmax);
    backends::OpCall call{.graph = &o.g, .op = o.op};
    call.inputs.push_back({.base = dx, .dtype = DType::f32, .shape = {rows, cols}, .strides = {cols, 1}});
    call.outputs.push_back({.base = dy, .dtype = DType::f32, .shape = {rows, cols}, .strides = {cols, 1}});
    be->run(call);
    const double sec = be->last_run_seconds();
    std::vector<float> y(rows * cols), y2(rows * cols);
    be->download(y.data(), dy, rows * cols * 4);
    be->run(call);
    be->download(y2.data(), dy, rows * cols * 4);
    double worst = 0;
    for (int64_t r = 0; r < rows; ++r) {
      double mx = -INFINITY, s = 0;
      for (int64_t c = 0; c < cols; ++c) mx = std::max<double>(mx, x[r * cols + c]);
      for (int64_t c = 0; c < cols; ++c) s += std::exp(x[r * cols + c] - mx);
      for (int64_t c = 0; c < cols; ++c) {
        worst = std::max(worst, std::fabs(y[r * cols + c] - std::exp(x[r * cols + c] - mx) / s));
      }
    }
    check(worst < 1e-6, "softmax matches the host in fp32");
    check(std::memcmp(y.data(), y2.data(), y.size() * 4) == 0, "softmax is bitwise reproducible");
    check(sec > 0 && sec < 1, "last_run_seconds() times the op with CUDA events (" + std::to_string(sec) + " s)");
    be->free(dx);
    be->free(dy);
  }

  // Embedding backward: repeated indices summed in position order, no atomics.
  {
    const int64_t V = 50, d = 40, N = 1000;
    std::vector<int64_t> idx(N);
    std::mt19937_64 r(5);
    for (int64_t& i : idx) i = static_cast<int64_t>(r() % 7) * 7;  // few rows, many repeats
    std::vector<float> gy = randn(N * d, 6);
    Graph g;
    StorageId sw = g.add_storage({.bytes = V * d * 4});
    StorageId si = g.add_storage({.bytes = N * 8});
    TensorId w = g.add_tensor({.name = "w", .shape = {V, d}, .storage = sw, .requires_grad = true});
    TensorId ix = g.add_tensor({.name = "idx", .shape = {N}, .dtype = DType::i64, .storage = si});
    OpId fwd = g.add_op({.kind = OpKind::embedding, .inputs = {w, ix}, .saved = {ix}});
    TensorId gin = g.add_tensor({.name = "g", .shape = {N, d}, .storage = g.add_storage({.bytes = N * d * 4})});
    TensorId gw = g.add_tensor({.name = "gw", .shape = {V, d}, .storage = g.add_storage({.bytes = V * d * 4})});
    OpId bwd = g.add_op({.kind = OpKind::backward, .inputs = {gin, ix}, .forward = fwd, .grad_of = {0},
                         .grad_outputs = {gw}, .n_grad_inputs = 1, .grad_in_of = {0}});
    void* dix = be->alloc(N * 8);
    void* dg = be->alloc(N * d * 4);
    void* dw = be->alloc(V * d * 4);
    be->upload(dix, idx.data(), N * 8);
    be->upload(dg, gy.data(), N * d * 4);
    backends::OpCall call{.graph = &g, .op = bwd};
    call.inputs.push_back({.base = dg, .dtype = DType::f32, .shape = {N, d}, .strides = {d, 1}});
    call.inputs.push_back({.base = dix, .dtype = DType::i64, .shape = {N}, .strides = {1}});
    call.grad_outputs.push_back({.base = dw, .dtype = DType::f32, .shape = {V, d}, .strides = {d, 1}});
    be->run(call);
    std::vector<float> got(V * d), ref(V * d, 0.f);
    be->download(got.data(), dw, V * d * 4);
    for (int64_t n = 0; n < N; ++n) {
      for (int64_t c = 0; c < d; ++c) ref[idx[n] * d + c] += gy[n * d + c];
    }
    check(std::memcmp(got.data(), ref.data(), ref.size() * 4) == 0,
          "embedding backward equals the host's in-order sum bit for bit");
    be->free(dix);
    be->free(dg);
    be->free(dw);
  }

  // fp64 data is the CPU backend's checking mode: a clear error here.
  {
    OneOp o(OpKind::gelu_tanh);
    void* d = be->alloc(64 * 8);
    backends::OpCall call{.graph = &o.g, .op = o.op};
    call.inputs.push_back({.base = d, .dtype = DType::f64, .shape = {64}, .strides = {1}});
    call.outputs.push_back({.base = d, .dtype = DType::f64, .shape = {64}, .strides = {1}});
    bool threw = false;
    try {
      be->run(call);
    } catch (const std::runtime_error& e) {
      threw = std::string(e.what()).find("fp64") != std::string::npos;
    }
    check(threw, "fp64 tensors are refused with a runtime_error");
    be->free(d);
  }
  be->synchronize();
  std::printf("%d passed, %d failed\n", passed, failed);
  return failed ? 1 : 0;
}
