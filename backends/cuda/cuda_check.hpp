// Status checks for every CUDA runtime and cuBLAS call (tiny-cuda-nn's CUDA_CHECK_THROW style).
//
//   ACTSIM_CUDA_CHECK(cudaMallocAsync(&p, bytes, stream));   // throws "file:line: call: error string"
//   ACTSIM_CUBLAS_CHECK(cublasCreate(&handle));
//   ACTSIM_CUDA_CHECK_LOG(cudaStreamDestroy(s));             // destructors: log to stderr, never throw
//
// A failing CUDA call is neither bad input nor our assertion: it is the device saying no (out of
// memory, a kernel fault), reported as std::runtime_error with where and what.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include <cstdio>
#include <stdexcept>
#include <string>

namespace actsim::backends::cuda {

[[noreturn]] inline void check_failed(const char* file, int line, const char* call, const char* what) {
  throw std::runtime_error(std::string(file) + ":" + std::to_string(line) + ": " + call + " failed: " + what);
}

inline void check_log(const char* file, int line, const char* call, const char* what) {
  std::fprintf(stderr, "%s:%d: %s failed: %s\n", file, line, call, what);
}

}  // namespace actsim::backends::cuda

#define ACTSIM_CUDA_CHECK(x)                                                                        \
  do {                                                                                              \
    cudaError_t actsim_err_ = (x);                                                                  \
    if (actsim_err_ != cudaSuccess)                                                                 \
      ::actsim::backends::cuda::check_failed(__FILE__, __LINE__, #x, cudaGetErrorString(actsim_err_)); \
  } while (0)

#define ACTSIM_CUDA_CHECK_LOG(x)                                                                  \
  do {                                                                                            \
    cudaError_t actsim_err_ = (x);                                                                \
    if (actsim_err_ != cudaSuccess)                                                               \
      ::actsim::backends::cuda::check_log(__FILE__, __LINE__, #x, cudaGetErrorString(actsim_err_)); \
  } while (0)

#define ACTSIM_CUBLAS_CHECK(x)                                                                        \
  do {                                                                                                \
    cublasStatus_t actsim_st_ = (x);                                                                  \
    if (actsim_st_ != CUBLAS_STATUS_SUCCESS)                                                          \
      ::actsim::backends::cuda::check_failed(__FILE__, __LINE__, #x, cublasGetStatusString(actsim_st_)); \
  } while (0)

#define ACTSIM_CUBLAS_CHECK_LOG(x)                                                                  \
  do {                                                                                              \
    cublasStatus_t actsim_st_ = (x);                                                                \
    if (actsim_st_ != CUBLAS_STATUS_SUCCESS)                                                        \
      ::actsim::backends::cuda::check_log(__FILE__, __LINE__, #x, cublasGetStatusString(actsim_st_)); \
  } while (0)
