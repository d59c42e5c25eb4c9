// make_backend: the one place that knows which backends exist.
#include <fmt/format.h>

#include <algorithm>

#include "actsim/util/error.hpp"
#include "actsim/backends/backend.hpp"

namespace actsim::backends {

std::unique_ptr<Backend> make_cpu_backend();  // cpu_backend.cpp
#ifdef ACTSIM_HAVE_CUDA
std::unique_ptr<Backend> make_cuda_backend();  // backends/cuda/
#endif

namespace {
size_t edit_distance(const std::string& a, const std::string& b) {
  std::vector<size_t> row(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) row[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    size_t diag = row[0];
    row[0] = i;
    for (size_t j = 1; j <= b.size(); ++j) {
      const size_t up = row[j];
      row[j] = std::min({row[j] + 1, row[j - 1] + 1, diag + (a[i - 1] != b[j - 1])});
      diag = up;
    }
  }
  return row[b.size()];
}
}  // namespace

std::unique_ptr<Backend> make_backend(const std::string& name) {
  if (name == "cpu") return make_cpu_backend();
  if (name == "cuda") {
#ifdef ACTSIM_HAVE_CUDA
    return make_cuda_backend();
#else
    throw InputError("--backend cuda: this build has no CUDA backend (the CUDA toolkit was not found at configure time)");
#endif
  }
  std::string msg = fmt::format("--backend {}: unknown backend (known: cpu, cuda)", name);
  for (const char* known : {"cpu", "cuda"}) {
    if (edit_distance(name, known) <= 2) {
      msg += fmt::format("; did you mean '{}'?", known);
      break;
    }
  }
  throw InputError(msg);
}

}  // namespace actsim::backends
