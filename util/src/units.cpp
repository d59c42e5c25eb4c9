#include "actsim/util/units.hpp"

#include <fmt/format.h>

#include <string>

namespace actsim::util {

std::string human_bytes(int64_t b) {
  const double x = static_cast<double>(b);
  if (b < 1024) return fmt::format("{} B", b);
  if (b < 1024 * 1024) return fmt::format("{:.2f} KiB", x / 1024);
  if (b < 1024LL * 1024 * 1024) return fmt::format("{:.2f} MiB", x / 1048576);
  return fmt::format("{:.2f} GiB", x / 1073741824);
}

std::string with_commas(int64_t v) {
  std::string s = std::to_string(v);
  for (int i = static_cast<int>(s.size()) - 3; i > (v < 0 ? 1 : 0); i -= 3) s.insert(static_cast<size_t>(i), ",");
  return s;
}

}  // namespace actsim::util
