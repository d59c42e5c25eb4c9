// The CUDA backend, loaded on first use: backends/cuda/ builds it as a shared module
// (libactsim_cuda_module.so) that links cudart and cuBLAS, and this file dlopens it when a
// cuda_info.hpp function or make_cuda_backend() is first called. Programs that never ask for CUDA
// (actsim simulate, plan, ...) load no CUDA library at all. Built only with ACTSIM_HAVE_CUDA.
#include <dlfcn.h>
#include <fmt/format.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <mutex>
#include <string>
#include <type_traits>
#include <vector>

#include "actsim/util/error.hpp"
#include "actsim/backends/backend.hpp"
#include "actsim/backends/cuda_info.hpp"

namespace actsim::backends {

namespace {

struct Module {
  void* handle = nullptr;
  std::string path, error;
  int (*device_count)() = nullptr;
  int64_t (*free_bytes)() = nullptr;
  void (*memory)(CudaMemory*) = nullptr;
  void (*reset_peak)() = nullptr;
  Backend* (*make_backend)() = nullptr;
};

// Where the module is: $ACTSIM_CUDA_MODULE, else beside the program, else where CMake built it.
std::vector<std::string> candidates() {
  std::vector<std::string> out;
  if (const char* env = std::getenv("ACTSIM_CUDA_MODULE")) out.emplace_back(env);
  std::error_code ec;
  const std::filesystem::path exe = std::filesystem::read_symlink("/proc/self/exe", ec);
  if (!ec) {
    out.push_back((exe.parent_path() / "libactsim_cuda_module.so").string());
    for (const char* up : {"../tools", "../../tools"}) out.push_back((exe.parent_path() / up / "libactsim_cuda_module.so").string());
  }
  out.emplace_back(ACTSIM_CUDA_MODULE_PATH);
  return out;
}

const Module& module() {
  static Module m;
  static std::once_flag once;
  std::call_once(once, [] {
    for (const std::string& p : candidates()) {
      if (!std::filesystem::exists(p)) continue;
      m.path = p;
      m.handle = ::dlopen(p.c_str(), RTLD_NOW | RTLD_LOCAL);
      if (!m.handle) {
        const char* e = ::dlerror();
        m.error = e ? e : "dlopen failed";
        return;
      }
      break;
    }
    if (!m.handle) {
      m.error = "the module libactsim_cuda_module.so was not found (set ACTSIM_CUDA_MODULE)";
      return;
    }
    auto sym = [&](auto& fn, const char* name) {
      fn = reinterpret_cast<std::remove_reference_t<decltype(fn)>>(::dlsym(m.handle, name));
      if (!fn && m.error.empty()) m.error = fmt::format("{} has no symbol {}", m.path, name);
    };
    int (*abi)() = nullptr;
    sym(abi, "actsim_cuda_module_abi");
    sym(m.device_count, "actsim_cuda_device_count");
    sym(m.free_bytes, "actsim_cuda_free_bytes");
    sym(m.memory, "actsim_cuda_memory");
    sym(m.reset_peak, "actsim_cuda_reset_peak");
    sym(m.make_backend, "actsim_cuda_make_backend");
    if (m.error.empty() && abi() != 1) m.error = fmt::format("{} is from another actsim version", m.path);
    if (!m.error.empty()) {
      ::dlclose(m.handle);
      m.handle = nullptr;
    }
  });
  return m;
}

}  // namespace

int cuda_device_count() {
  const Module& m = module();
  return m.handle ? m.device_count() : 0;
}

int64_t cuda_free_bytes() {
  const Module& m = module();
  return m.handle ? m.free_bytes() : -1;
}

CudaMemory cuda_memory() {
  const Module& m = module();
  CudaMemory out;
  if (m.handle) m.memory(&out);
  return out;
}

void cuda_reset_peak() {
  const Module& m = module();
  if (m.handle) m.reset_peak();
}

std::unique_ptr<Backend> make_cuda_backend() {
  const Module& m = module();
  if (!m.handle) throw InputError(fmt::format("--backend cuda: cannot load the CUDA backend: {}", m.error));
  return std::unique_ptr<Backend>(m.make_backend());
}

}  // namespace actsim::backends
