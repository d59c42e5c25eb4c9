// Without a CUDA device, asking for the CUDA backend is a clear input error, and the memory
// queries say "unknown" (-1) instead of failing. Exit 77 where a device is present (ctest: skipped;
// test_cuda_backend covers that machine).
#include <cstdio>
#include <string>

#include "actsim/util/error.hpp"
#include "actsim/backends/backend.hpp"
#include "actsim/backends/cuda_info.hpp"

int main() {
  using namespace actsim;
  if (backends::cuda_device_count() > 0) {
    std::printf("test_cuda_no_device: a CUDA device is present; skipped\n");
    return 77;
  }
  int failed = 0;
  auto check = [&](bool ok, const char* what) {
    std::printf("%s %s\n", ok ? "ok  " : "FAIL", what);
    failed += !ok;
  };
  check(backends::cuda_free_bytes() == -1, "cuda_free_bytes() is -1 without a device");
  check(backends::cuda_memory().total_bytes == -1, "cuda_memory() is unknown without a device");
  const std::string want = "--backend cuda: no CUDA device is available (cudaGetDeviceCount: ";
  try {
    backends::make_cuda_backend();
    check(false, "make_cuda_backend() throws InputError");
  } catch (const InputError& e) {
    std::printf("     message: %s\n", e.what());
    check(std::string(e.what()).rfind(want, 0) == 0, "make_cuda_backend() throws InputError naming cudaGetDeviceCount");
  }
  try {
    backends::make_backend("cuda");
    check(false, "make_backend(\"cuda\") throws InputError");
  } catch (const InputError& e) {
    check(std::string(e.what()).rfind(want, 0) == 0, "make_backend(\"cuda\") throws the same InputError");
  }
  std::printf("%d passed, %d failed\n", 4 - failed, failed);
  return failed ? 1 : 0;
}
