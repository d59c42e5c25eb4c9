// libFuzzer harness: the schedule reader and validator (docs/schedule-format.md), and for small
// schedules that pass, a replay on the CPU backend: validation must make every accepted schedule
// safe to execute. Bad input must be an InputError; the kernels may refuse with a ReplayError
// or runtime_error; a crash or a sanitizer report is a finding.
#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "actsim/util/error.hpp"
#include "actsim/replay/replay.hpp"
#include "actsim/schedule/schedule.hpp"

using namespace actsim;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  schedule::Schedule s;
  try {
    s = schedule::parse_schedule_text(text, "fuzz.jsonl");
  } catch (const InputError&) {
    return 0;
  }
  int64_t total = 0;
  for (const graph::Storage& st : s.graph().storages()) {
    if (__builtin_add_overflow(total, st.bytes, &total)) return 0;
  }
  if (total > (int64_t{1} << 20)) return 0;  // 1 MiB: keep each run fast
  try {
    std::unique_ptr<backends::Backend> be = backends::make_backend("cpu");
    (void)replay::run(s, *be, {.seed = 0});
  } catch (const std::runtime_error&) {
  }
  return 0;
}
