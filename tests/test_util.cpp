// util/: the one copy of each small idea (issue 9, problem 4) and the one-line failure report
// (problem 5).
#include <catch2/catch.hpp>

#include <atomic>
#include <new>
#include <stdexcept>
#include <string>
#include <vector>

#include "actsim/util/error.hpp"
#include "actsim/util/fp16.hpp"
#include "actsim/util/hash.hpp"
#include "actsim/util/parallel.hpp"
#include "actsim/util/rng.hpp"
#include "actsim/util/text.hpp"

using namespace actsim;

TEST_CASE("util::split_list: commas outside quotes; quotes and empty items kept", "[util]") {
  using V = std::vector<std::string>;
  CHECK(util::split_list("none,full") == V{"none", "full"});
  CHECK(util::split_list("none,\"ops:mm,bmm\",full") == V{"none", "\"ops:mm,bmm\"", "full"});
  CHECK(util::split_list("a,,b") == V{"a", "", "b"});
  CHECK(util::split_list("a,") == V{"a", ""});
  CHECK(util::split_list("") == V{""});
  CHECK(util::strip_quotes("\"ops:mm,bmm\"") == "ops:mm,bmm");
}

TEST_CASE("util::csv_field: RFC 4180 quoting only where needed", "[util]") {
  CHECK(util::csv_field("plain") == "plain");
  CHECK(util::csv_field("a,b") == "\"a,b\"");
  CHECK(util::csv_field("say \"hi\"") == "\"say \"\"hi\"\"\"");
  CHECK(util::csv_field("two\nlines") == "\"two\nlines\"");
}

TEST_CASE("util::one_line: control characters are escaped", "[util]") {
  CHECK(util::one_line("a\nb\tc\r\x01") == "a\\nb\\tc\\r\\x01");
}

TEST_CASE("util::Fnv1a and splitmix64: the reference values", "[util]") {
  CHECK(util::fnv1a("") == 0xcbf29ce484222325ull);
  CHECK(util::fnv1a("a") == 0xaf63dc4c8601ec8cull);
  util::Fnv1a h;
  h.add_bytes("a", 1);
  CHECK(h.value() == util::fnv1a("a"));
  CHECK(util::splitmix64(0) == 0xe220a8397b1dcdafull);  // the first output of splitmix64 seeded with 0
}

TEST_CASE("util::to_f16: round to nearest even, overflow to infinity, NaN kept", "[util]") {
  CHECK(util::to_f16(1.0f) == 0x3c00);
  CHECK(util::to_f16(65504.0f) == 0x7bff);
  CHECK(util::to_f16(65520.0f) == 0x7c00);
  CHECK(util::to_f16(1.0f + 0x1.0p-11f) == 0x3c00);                    // a tie rounds to even
  CHECK(util::to_f16(0x1.0p-24f) == 0x0001);                           // the smallest subnormal
  CHECK((util::to_f16(std::numeric_limits<float>::quiet_NaN()) & 0x7e00) == 0x7e00);
  for (uint32_t h = 0; h < 0x7c00; ++h) CHECK(util::to_f16(util::from_f16(static_cast<uint16_t>(h))) == h);
}

TEST_CASE("util::parallel_for: every job runs; the lowest failed job's exception is rethrown", "[util]") {
  std::vector<std::atomic<int>> ran(100);
  util::parallel_for(100, 4, [&](int64_t i) { ++ran[static_cast<size_t>(i)]; });
  for (const auto& r : ran) CHECK(r == 1);
  try {
    util::parallel_for(50, 3, [](int64_t i) {
      if (i >= 7) throw std::runtime_error("job " + std::to_string(i));
    });
    FAIL("no exception");
  } catch (const std::runtime_error& e) {
    CHECK(std::string(e.what()) == "job 7");
  }
  util::parallel_for(0, 4, [](int64_t) { FAIL("a job of none"); });
}

TEST_CASE("util::describe_failure: one line and a defined exit code for every exception", "[util]") {
  auto of = [](auto&& thrower) {
    try {
      thrower();
    } catch (...) {
      return describe_failure(std::current_exception());
    }
    return Failure{-1, "nothing thrown"};
  };
  Failure f = of([] { throw InputError("gpt2.toml:12: model.n_heads = 7\nsecond line"); });
  CHECK(f.exit_code == 2);
  CHECK(f.line == "actsim: error: gpt2.toml:12: model.n_heads = 7\\nsecond line");
  f = of([] { throw DeviceError("cuda_ops.cu:10: cudaMalloc failed: out of memory"); });
  CHECK(f.exit_code == 1);
  CHECK(f.line == "actsim: device error: cuda_ops.cu:10: cudaMalloc failed: out of memory");
  f = of([] { throw std::runtime_error("boom"); });
  CHECK(f.exit_code == 1);
  CHECK(f.line == "actsim: internal error: boom");
  f = of([] { throw std::bad_alloc(); });
  CHECK(f.exit_code == 1);
  CHECK(f.line.rfind("actsim: error: out of memory", 0) == 0);
  f = of([] { throw 42; });
  CHECK(f.exit_code == 1);
  CHECK(f.line == "actsim: internal error: an exception of unknown type");
}
