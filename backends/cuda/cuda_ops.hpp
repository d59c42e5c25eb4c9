// The CUDA backend's internal seam: cuda_backend.cpp owns the stream, the cuBLAS handle and the
// memory pools; cuda_ops.cu runs one graph op on them.
//
//   cuda::Context ctx{.stream = s, .cublas = h, .scratch_pool = pool};
//   cuda::run_op(ctx, call);      // enqueues the op's kernels on ctx.stream
//   ctx.release_temps();          // stream-ordered frees of the op's scratch
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include <cstdint>
#include <vector>

#include "actsim/backends/backend.hpp"
#include "cuda_check.hpp"

namespace actsim::backends::cuda {

struct Context {
  cudaStream_t stream = nullptr;
  cublasHandle_t cublas = nullptr;
  // Kernels' own scratch (sort keys, partial sums, contiguous copies for cuBLAS) comes from this
  // pool, not the schedule's: the schedule pool's high-water mark then holds the schedule's
  // buffers only. See Note [Two pools] in docs/cuda.md.
  cudaMemPool_t scratch_pool = nullptr;
  std::vector<void*> temps;  // scratch of the op being run, freed (stream-ordered) after it

  void* temp(int64_t bytes) {
    void* p = nullptr;
    ACTSIM_CUDA_CHECK(cudaMallocFromPoolAsync(&p, static_cast<size_t>(bytes < 16 ? 16 : bytes), scratch_pool, stream));
    temps.push_back(p);
    return p;
  }
  void release_temps() {
    for (void* p : temps) ACTSIM_CUDA_CHECK(cudaFreeAsync(p, stream));
    temps.clear();
  }
};

// Enqueues the kernels of call.op (forward, backward, optimizer, recompute) on ctx.stream.
// Throws std::runtime_error on an op or dtype this backend does not implement.
void run_op(Context& ctx, const OpCall& call);

}  // namespace actsim::backends::cuda
