// actsim::backends — what the CUDA backend can tell before (and besides) running anything. Names no
// CUDA type, so the executor and the command line include it whether or not CUDA was built.
//
//   if (backends::cuda_device_count() <= 0) ...             // no toolkit at build time, or no device
//   int64_t free = backends::cuda_free_bytes();             // -1 without CUDA; checked before any alloc
//   if (schedule_peak > free) throw InputError("...");     // refuse rather than over-commit
//   auto mem = backends::cuda_memory();                     // after a replay: pool high-water marks
//
// Built with CUDA (ACTSIM_HAVE_CUDA, set on actsim_kernels by backends/cuda/CMakeLists.txt) these are
// defined in backends/cuda/cuda_backend.cpp; without it they are the inline stubs below.
#pragma once

#include <cstdint>
#include <memory>

namespace actsim::backends {

class Backend;

// Device memory as the CUDA runtime and the replay pool see it, in bytes; -1 where unknown.
struct CudaMemory {
  int64_t free_bytes = -1;           // cudaMemGetInfo: free on the device now
  int64_t total_bytes = -1;          // cudaMemGetInfo: the device's memory
  int64_t pool_used_high = -1;       // schedule pool: high-water of bytes handed out (cudaMemPoolAttrUsedMemHigh)
  int64_t pool_reserved_high = -1;   // schedule pool: high-water of bytes reserved from the driver
};

#ifdef ACTSIM_HAVE_CUDA
// Number of CUDA devices; 0 when the driver reports none or fails (no driver, no device).
int cuda_device_count();
// Free bytes on device 0 (cudaMemGetInfo), -1 when no device. Allocates nothing of the schedule's.
int64_t cuda_free_bytes();
// Memory figures of device 0 and the replay pool; all -1 when no device.
CudaMemory cuda_memory();
// Resets the pool's high-water marks to the bytes in use now (call before a replay).
void cuda_reset_peak();
// The CUDA backend: throws InputError("--backend cuda: no CUDA device is available (...)") when
// there is no device. make_backend("cuda") calls this.
std::unique_ptr<Backend> make_cuda_backend();
#else
inline int cuda_device_count() { return 0; }
inline int64_t cuda_free_bytes() { return -1; }
inline CudaMemory cuda_memory() { return {}; }
inline void cuda_reset_peak() {}
#endif

}  // namespace actsim::backends
