#include "actsim/util/files.hpp"

#include <fmt/format.h>

#include <filesystem>
#include <fstream>
#include <system_error>

#include "actsim/util/error.hpp"

namespace actsim::util {

std::string read_input_file(const std::string& path, const char* what) {
  if (path.empty()) throw InputError(fmt::format("\"\": an empty path is not a {} file", what));
  // A directory opens as a stream that reads nothing: it would read as an empty file.
  std::error_code ec;
  if (std::filesystem::is_directory(path, ec)) throw InputError(fmt::format("{}: is a directory, not a {} file", path, what));
  // Read once, whole: a pipe (/dev/stdin, <(...)) cannot be read twice, so callers sniff the
  // format from this text rather than by reopening the file.
  std::ifstream in(path, std::ios::binary);
  if (!in) throw InputError(fmt::format("{}: cannot read the {} file", path, what));
  std::string text;
  char buf[1 << 16];
  while (in.read(buf, sizeof buf) || in.gcount() > 0) text.append(buf, static_cast<size_t>(in.gcount()));
  if (in.bad()) throw InputError(fmt::format("{}: cannot read the {} file", path, what));
  if (text.find_first_not_of(" \t\r\n") == std::string::npos) {
    throw InputError(fmt::format("{}: empty {} file", path, what));
  }
  return text;
}

}  // namespace actsim::util
