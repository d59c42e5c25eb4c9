// actsim errors: the three kinds of failure (STYLE.md).
//
//   throw InputError("gpt2.toml:12: model.n_heads = 7 does not divide model.d_model = 768");
//   ACTSIM_ASSERT(bytes >= 0, "negative storage size");   // our own bug; stays on in release
//
// Bad input is an InputError, caught only in main (exit code 2). An expected "no" is a return value.
#pragma once

#include <stdexcept>
#include <string>

namespace actsim {

// Bad input: the message already names the file, line and key (or option).
class InputError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

[[noreturn]] void assertion_failed(const char* file, int line, const char* expr, const std::string& msg);

}  // namespace actsim

#define ACTSIM_ASSERT(cond, msg)                                          \
  do {                                                                    \
    if (!(cond)) ::actsim::assertion_failed(__FILE__, __LINE__, #cond, (msg)); \
  } while (0)
