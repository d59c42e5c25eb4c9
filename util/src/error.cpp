#include "actsim/util/error.hpp"

#include <cstdio>
#include <cstdlib>

namespace actsim {

void assertion_failed(const char* file, int line, const char* expr, const std::string& msg) {
  std::fprintf(stderr, "actsim: internal error at %s:%d: %s (%s)\n", file, line, msg.c_str(), expr);
  std::abort();
}

}  // namespace actsim
