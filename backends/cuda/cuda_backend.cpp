// The CUDA replay backend: device memory from a stream-ordered pool, one stream, one cuBLAS
// handle, CUDA events around every op. docs/cuda.md has the design notes referred to below.
#include <cublas_v2.h>
#include <fmt/format.h>
#include <cuda_runtime_api.h>

#include <cstdint>
#include <limits>
#include <string>

#include "actsim/util/error.hpp"
#include "actsim/backends/backend.hpp"
#include "actsim/backends/cuda_info.hpp"
#include "cuda_check.hpp"
#include "cuda_ops.hpp"

namespace actsim::backends {
namespace {

constexpr size_t kCublasWorkspace = size_t{32} << 20;  // 32 MiB: PyTorch's cuBLAS workspace on Hopper

// Note [Two pools] (docs/cuda.md): the schedule's buffers come from the device's default memory
// pool, so its UsedMemHigh attribute is the high-water mark of schedule bytes; kernels' scratch
// comes from a pool of our own and never disturbs that figure.
cudaMemPool_t schedule_pool(int device) {
  cudaMemPool_t pool = nullptr;
  ACTSIM_CUDA_CHECK(cudaDeviceGetDefaultMemPool(&pool, device));
  return pool;
}

class CudaBackend final : public Backend {
 public:
  CudaBackend() {
    ACTSIM_CUDA_CHECK(cudaSetDevice(device_));
    ACTSIM_CUDA_CHECK(cudaStreamCreateWithFlags(&ctx_.stream, cudaStreamNonBlocking));
    // Keep freed memory in the pools (no release to the driver at each synchronization): the
    // replay frees and reallocates every step, and returning memory would cost a driver call.
    uint64_t keep = std::numeric_limits<uint64_t>::max();
    ACTSIM_CUDA_CHECK(cudaMemPoolSetAttribute(schedule_pool(device_), cudaMemPoolAttrReleaseThreshold, &keep));
    cudaMemPoolProps props{};
    props.allocType = cudaMemAllocationTypePinned;
    props.handleTypes = cudaMemHandleTypeNone;
    props.location.type = cudaMemLocationTypeDevice;
    props.location.id = device_;
    ACTSIM_CUDA_CHECK(cudaMemPoolCreate(&ctx_.scratch_pool, &props));
    ACTSIM_CUDA_CHECK(cudaMemPoolSetAttribute(ctx_.scratch_pool, cudaMemPoolAttrReleaseThreshold, &keep));
    ACTSIM_CUBLAS_CHECK(cublasCreate(&ctx_.cublas));
    ACTSIM_CUBLAS_CHECK(cublasSetStream(ctx_.cublas, ctx_.stream));
    // Default math: no TF32 for fp32 (PyTorch's allow_tf32 = False); fp32 compute for bf16.
    ACTSIM_CUBLAS_CHECK(cublasSetMathMode(ctx_.cublas, CUBLAS_DEFAULT_MATH));
    // A fixed workspace of our own: cuBLAS then never allocates behind the pool's back, and with
    // one stream and one workspace its kernel choice (and so its results) is reproducible.
    ACTSIM_CUDA_CHECK(cudaMalloc(&workspace_, kCublasWorkspace));
    ACTSIM_CUBLAS_CHECK(cublasSetWorkspace(ctx_.cublas, workspace_, kCublasWorkspace));
    ACTSIM_CUDA_CHECK(cudaEventCreate(&start_));
    ACTSIM_CUDA_CHECK(cudaEventCreate(&stop_));
  }

  ~CudaBackend() override {
    // Destructors log instead of throwing (a failed kernel may already be unwinding the stack).
    ACTSIM_CUDA_CHECK_LOG(cudaStreamSynchronize(ctx_.stream));
    if (ctx_.cublas) ACTSIM_CUBLAS_CHECK_LOG(cublasDestroy(ctx_.cublas));
    if (workspace_) ACTSIM_CUDA_CHECK_LOG(cudaFree(workspace_));
    if (start_) ACTSIM_CUDA_CHECK_LOG(cudaEventDestroy(start_));
    if (stop_) ACTSIM_CUDA_CHECK_LOG(cudaEventDestroy(stop_));
    if (ctx_.scratch_pool) ACTSIM_CUDA_CHECK_LOG(cudaMemPoolDestroy(ctx_.scratch_pool));
    if (ctx_.stream) ACTSIM_CUDA_CHECK_LOG(cudaStreamDestroy(ctx_.stream));
  }

  std::string name() const override { return "cuda"; }

  // The Hugging Face decoders' op kinds and grouped key/value heads in SDPA have CPU reference
  // kernels only (backends/cpu); their CUDA kernels are not written yet.
  std::string cannot_run(const graph::Graph& g, const graph::Op& op) const override {
    const graph::Op& f = op.kind == graph::OpKind::backward ? g.op(op.forward) : op;
    switch (f.kind) {
      case graph::OpKind::neg: case graph::OpKind::cat: case graph::OpKind::cast: case graph::OpKind::rotary_table:
      case graph::OpKind::causal_mask: case graph::OpKind::pad: case graph::OpKind::tanh:
        return fmt::format("op kind {} (Hugging Face decoders) has no CUDA kernel yet", graph::to_string(f.kind));
      case graph::OpKind::flash_attention:
        if (g.tensor(f.inputs.at(1)).shape.at(1) != g.tensor(f.inputs.at(0)).shape.at(1)) {
          return "flash attention with grouped key/value heads (enable_gqa) has no CUDA kernel yet";
        }
        return {};
      default: return {};
    }
  }

  void* alloc(int64_t bytes) override {
    ACTSIM_ASSERT(bytes >= 0, "negative allocation");
    void* p = nullptr;
    ACTSIM_CUDA_CHECK(cudaMallocAsync(&p, static_cast<size_t>(bytes > 0 ? bytes : 1), ctx_.stream));
    return p;
  }

  void free(void* p) override {
    if (p) ACTSIM_CUDA_CHECK(cudaFreeAsync(p, ctx_.stream));
  }

  void run(const OpCall& call) override {
    ACTSIM_CUDA_CHECK(cudaEventRecord(start_, ctx_.stream));
    try {
      cuda::run_op(ctx_, call);
    } catch (...) {
      ctx_.release_temps();
      throw;
    }
    ctx_.release_temps();
    ACTSIM_CUDA_CHECK(cudaEventRecord(stop_, ctx_.stream));
    timed_ = true;
  }

  void upload(void* dst, const void* host, int64_t bytes) override {
    ACTSIM_CUDA_CHECK(cudaMemcpyAsync(dst, host, static_cast<size_t>(bytes), cudaMemcpyHostToDevice, ctx_.stream));
    ACTSIM_CUDA_CHECK(cudaStreamSynchronize(ctx_.stream));  // the caller may reuse `host` at once
  }

  void download(void* host, const void* src, int64_t bytes) override {
    ACTSIM_CUDA_CHECK(cudaMemcpyAsync(host, src, static_cast<size_t>(bytes), cudaMemcpyDeviceToHost, ctx_.stream));
    ACTSIM_CUDA_CHECK(cudaStreamSynchronize(ctx_.stream));
  }

  void fill_nan(void* p, int64_t bytes) override {
    ACTSIM_CUDA_CHECK(cudaMemsetAsync(p, 0xFF, static_cast<size_t>(bytes), ctx_.stream));
  }

  void synchronize() override { ACTSIM_CUDA_CHECK(cudaStreamSynchronize(ctx_.stream)); }

  // Waits for the last op to finish (so per-op timing serializes the replay: see docs/cuda.md).
  double last_run_seconds() const override {
    if (!timed_) return 0;
    ACTSIM_CUDA_CHECK(cudaEventSynchronize(stop_));
    float ms = 0;
    ACTSIM_CUDA_CHECK(cudaEventElapsedTime(&ms, start_, stop_));
    return ms * 1e-3;
  }

 private:
  int device_ = 0;
  cuda::Context ctx_;
  void* workspace_ = nullptr;
  cudaEvent_t start_ = nullptr, stop_ = nullptr;
  bool timed_ = false;
};

}  // namespace

int cuda_device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    (void)cudaGetLastError();  // clear the sticky-free error so later calls start clean
    return 0;
  }
  return n;
}

int64_t cuda_free_bytes() {
  if (cuda_device_count() <= 0) return -1;
  size_t free = 0, total = 0;
  ACTSIM_CUDA_CHECK(cudaSetDevice(0));
  ACTSIM_CUDA_CHECK(cudaMemGetInfo(&free, &total));
  return static_cast<int64_t>(free);
}

CudaMemory cuda_memory() {
  CudaMemory m;
  if (cuda_device_count() <= 0) return m;
  size_t free = 0, total = 0;
  ACTSIM_CUDA_CHECK(cudaSetDevice(0));
  ACTSIM_CUDA_CHECK(cudaMemGetInfo(&free, &total));
  m.free_bytes = static_cast<int64_t>(free);
  m.total_bytes = static_cast<int64_t>(total);
  uint64_t used = 0, reserved = 0;
  cudaMemPool_t pool = schedule_pool(0);
  ACTSIM_CUDA_CHECK(cudaMemPoolGetAttribute(pool, cudaMemPoolAttrUsedMemHigh, &used));
  ACTSIM_CUDA_CHECK(cudaMemPoolGetAttribute(pool, cudaMemPoolAttrReservedMemHigh, &reserved));
  m.pool_used_high = static_cast<int64_t>(used);
  m.pool_reserved_high = static_cast<int64_t>(reserved);
  return m;
}

void cuda_reset_peak() {
  if (cuda_device_count() <= 0) return;
  cudaMemPool_t pool = schedule_pool(0);
  uint64_t zero = 0;  // resetting a high-water mark sets it to the current value
  ACTSIM_CUDA_CHECK(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrUsedMemHigh, &zero));
  ACTSIM_CUDA_CHECK(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReservedMemHigh, &zero));
}

std::unique_ptr<Backend> make_cuda_backend() {
  int n = 0;
  const cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess || n <= 0) {
    const std::string why = e != cudaSuccess ? cudaGetErrorString(e) : "no device found";
    (void)cudaGetLastError();
    throw InputError("--backend cuda: no CUDA device is available (cudaGetDeviceCount: " + why + ")");
  }
  return std::make_unique<CudaBackend>();
}

}  // namespace actsim::backends

// The module's C entry points (backends/src/cuda_loader.cpp loads them with dlopen): the only
// symbols this shared module exports, so the actsim program links no CUDA library and starts
// small; `replay --backend cuda` loads the module when it needs it.
extern "C" {
__attribute__((visibility("default"))) int actsim_cuda_module_abi() { return 1; }
__attribute__((visibility("default"))) int actsim_cuda_device_count() { return actsim::backends::cuda_device_count(); }
__attribute__((visibility("default"))) int64_t actsim_cuda_free_bytes() { return actsim::backends::cuda_free_bytes(); }
__attribute__((visibility("default"))) void actsim_cuda_memory(actsim::backends::CudaMemory* out) {
  *out = actsim::backends::cuda_memory();
}
__attribute__((visibility("default"))) void actsim_cuda_reset_peak() { actsim::backends::cuda_reset_peak(); }
__attribute__((visibility("default"))) actsim::backends::Backend* actsim_cuda_make_backend() {
  return actsim::backends::make_cuda_backend().release();
}
}
