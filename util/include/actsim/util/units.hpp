// actsim::util units: bytes and counts as people read them.
//
//   human_bytes(8'503'000'000);   // "7.92 GiB"
//   with_commas(1234567);         // "1,234,567"
#pragma once

#include <cstdint>
#include <string>

namespace actsim::util {

// "7.92 GiB", "512 B"
std::string human_bytes(int64_t bytes);
// "1,234,567"
std::string with_commas(int64_t v);

}  // namespace actsim::util
