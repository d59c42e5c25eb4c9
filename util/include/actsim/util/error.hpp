// actsim errors: the three kinds of failure (STYLE.md).
//
//   throw InputError("gpt2.toml:12: model.n_heads = 7 does not divide model.d_model = 768");
//   ACTSIM_ASSERT(bytes >= 0, "negative storage size");   // our own bug; stays on in release
//
// Bad input is an InputError, caught only in main (exit code 2). An expected "no" is a return value.
// A device that says no (CUDA out of memory, a kernel fault) is a DeviceError (exit code 1).
// main turns whatever reaches it into one line and an exit code with describe_failure.
#pragma once

#include <exception>
#include <stdexcept>
#include <string>

namespace actsim {

// Bad input: the message already names the file, line and key (or option).
class InputError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// A device or its runtime failed (not the user's input, not our bug): CUDA errors.
class DeviceError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// What main prints (one line, no trailing newline) and returns for an exception that reached it:
// InputError 2 ("actsim: error: ..."); DeviceError 1 ("actsim: device error: ..."); bad_alloc 1;
// any other std::exception 1 ("actsim: internal error: ..."); anything else 1. Never throws.
struct Failure {
  int exit_code = 1;
  std::string line;
};
Failure describe_failure(std::exception_ptr e) noexcept;

[[noreturn]] void assertion_failed(const char* file, int line, const char* expr, const std::string& msg);

}  // namespace actsim

#define ACTSIM_ASSERT(cond, msg)                                          \
  do {                                                                    \
    if (!(cond)) ::actsim::assertion_failed(__FILE__, __LINE__, #cond, (msg)); \
  } while (0)
