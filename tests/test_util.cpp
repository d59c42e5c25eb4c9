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
#include "actsim/util/small_vector.hpp"
#include "actsim/util/text.hpp"

using namespace actsim;

TEST_CASE("util::split_list: commas outside quotes, quotes and empty items kept", "[util]") {
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

TEST_CASE("util::parallel_for: every job runs, the lowest failed job's exception is rethrown", "[util]") {
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

// issue 9 (speed4): the graph's small lists (shapes, strides, op and tensor id lists).
TEST_CASE("util::SmallVector: inline up to N, spills to the heap past it, behaves as std::vector", "[util]") {
  using SV = util::SmallVector<int64_t, 4>;
  SV a{8, 1024, 1600};
  CHECK(a.size() == 3);
  CHECK(a.capacity() == 4);
  CHECK(a == std::vector<int64_t>{8, 1024, 1600});
  const int64_t* inline_data = a.data();
  a.push_back(2);
  CHECK(a.data() == inline_data);  // the 4th element still inline
  a.push_back(3);                  // the 5th spills
  CHECK(a.capacity() > 4);
  CHECK(a == SV{8, 1024, 1600, 2, 3});
  for (int i = 0; i < 100; ++i) a.push_back(a[static_cast<size_t>(i)]);  // an element of itself, while it grows
  CHECK(a.size() == 105);
  CHECK(a[5] == 8);
  CHECK(a[104] == a[99]);
  SV b = a;  // copies the heap block
  CHECK(b == a);
  b[0] = 7;
  CHECK(a[0] == 8);
  SV c = std::move(b);  // takes the heap block
  CHECK(c[0] == 7);
  CHECK(b.empty());
  b.push_back(1);
  CHECK(b == SV{1});
  SV d{1, 2, 3};
  SV e = std::move(d);  // inline: copied
  CHECK(e == SV{1, 2, 3});
  e.insert(e.begin() + 1, 9);
  CHECK(e == SV{1, 9, 2, 3});
  e.insert(e.end(), {4, 5});
  CHECK(e == SV{1, 9, 2, 3, 4, 5});
  e.erase(e.begin());
  e.erase(e.begin() + 1, e.begin() + 3);
  CHECK(e == SV{9, 4, 5});
  e.insert(e.begin(), e.begin(), e.end());  // a range of itself
  CHECK(e == SV{9, 4, 5, 9, 4, 5});
  e.resize(2);
  CHECK(e == SV{9, 4});
  e.resize(6, -1);
  CHECK(e == SV{9, 4, -1, -1, -1, -1});
  e.pop_back();
  CHECK(e.back() == -1);
  CHECK(e.front() == 9);
  e.assign(3, 0);
  CHECK(e == SV{0, 0, 0});
  CHECK_THROWS_AS(e.at(3), std::out_of_range);
  std::vector<int64_t> v = e;  // to std::vector and back
  CHECK(v == std::vector<int64_t>{0, 0, 0});
  SV f = std::vector<int64_t>{5, 6};
  CHECK(f == SV{5, 6});
  CHECK(SV{1, 2} < SV{1, 3});
  CHECK(SV{1, 2} < SV{1, 2, 0});
  CHECK(SV(2, 7) == SV{7, 7});
  CHECK(SV(3).size() == 3);
  CHECK(std::vector<int64_t>(f.rbegin(), f.rend()) == std::vector<int64_t>{6, 5});
  e = {1, 2, 3, 4, 5, 6};  // heap
  e = f;                   // back to two elements in the heap block
  CHECK(e == f);
  e.clear();
  CHECK(e.empty());
}
