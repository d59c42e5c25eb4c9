// Assertions and the one-line report of a failure that reached main (error.hpp).
#include "actsim/util/error.hpp"

#include <cstdio>
#include <cstdlib>
#include <new>

#include "actsim/util/text.hpp"

namespace actsim {

void assertion_failed(const char* file, int line, const char* expr, const std::string& msg) {
  std::fprintf(stderr, "actsim: internal error at %s:%d: %s (%s)\n", file, line, msg.c_str(), expr);
  std::abort();
}

Failure describe_failure(std::exception_ptr e) noexcept {
  try {
    try {
      std::rethrow_exception(e);
    } catch (const InputError& x) {
      return {2, "actsim: error: " + util::one_line(x.what())};
    } catch (const DeviceError& x) {
      return {1, "actsim: device error: " + util::one_line(x.what())};
    } catch (const std::bad_alloc&) {
      // Commands check their sizes before allocating; reaching this is a gap in those checks.
      return {1, "actsim: error: out of memory (a size check missed this input; please report it)"};
    } catch (const std::exception& x) {
      return {1, "actsim: internal error: " + util::one_line(x.what())};
    } catch (...) {
      return {1, "actsim: internal error: an exception of unknown type"};
    }
  } catch (...) {
    // Building the message itself failed (out of memory): a fixed line.
    return {1, std::string()};
  }
}

}  // namespace actsim
