// OutputSet: all-or-nothing writes of a command's output files (output.hpp).
#include "actsim/util/output.hpp"

#include <fcntl.h>
#include <fmt/format.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "actsim/util/error.hpp"

namespace actsim::util {

namespace {

std::string label(const std::string& option, const std::string& path) {
  return option.empty() ? path : fmt::format("{} {}", option, path);
}

bool same_file(const struct stat& a, const struct stat& b) { return a.st_dev == b.st_dev && a.st_ino == b.st_ino; }

// Writes `bytes` to a new file `tmp` (O_EXCL: never through an existing name). False on error.
bool write_new(const std::string& tmp, const std::string& bytes) {
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
  if (fd < 0) return false;
  size_t done = 0;
  while (done < bytes.size()) {
    const ssize_t n = ::write(fd, bytes.data() + done, bytes.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      ::close(fd);
      return false;
    }
    done += static_cast<size_t>(n);
  }
  return ::close(fd) == 0;
}

}  // namespace

void check_output_path(const std::string& option, const std::string& path, const std::vector<std::string>& inputs) {
  const std::string who = label(option, path);
  if (path.empty()) throw InputError(fmt::format("{}\"\": an empty output path", option.empty() ? "" : option + " "));
  struct stat out;
  if (::lstat(path.c_str(), &out) != 0) return;  // a new file: nothing to protect
  if (S_ISLNK(out.st_mode)) {
    throw InputError(fmt::format("{}: is a symbolic link; refusing to replace it with a file (name the target)", who));
  }
  if (!S_ISREG(out.st_mode)) {
    throw InputError(fmt::format("{}: is not a regular file (a directory, device or pipe); refusing to write over it", who));
  }
  for (const std::string& in : inputs) {
    struct stat st;
    if (!in.empty() && ::stat(in.c_str(), &st) == 0 && same_file(st, out)) {
      throw InputError(fmt::format("{}: is an input of this command ({}); refusing to write over it", who, in));
    }
  }
}

OutputSet::~OutputSet() {
  for (const File& f : files_) {
    if (!f.tmp.empty()) ::unlink(f.tmp.c_str());
  }
}

void OutputSet::protect(const std::string& input_path) {
  if (!input_path.empty()) inputs_.push_back(input_path);
}

void OutputSet::add(std::string option, std::string path, std::string bytes) {
  files_.push_back({std::move(option), std::move(path), std::move(bytes), {}});
}

void OutputSet::commit() {
  // Every check first: nothing is written unless every path is acceptable.
  std::vector<struct stat> existing;
  for (size_t i = 0; i < files_.size(); ++i) {
    const File& f = files_[i];
    check_output_path(f.option, f.path, inputs_);
    for (size_t j = 0; j < i; ++j) {
      struct stat a, b;
      const bool both_exist = ::stat(f.path.c_str(), &a) == 0 && ::stat(files_[j].path.c_str(), &b) == 0;
      if (f.path == files_[j].path || (both_exist && same_file(a, b))) {
        throw InputError(fmt::format("{} and {}: name the same file {}", files_[j].option, f.option, f.path));
      }
    }
  }
  for (File& f : files_) {
    f.tmp = fmt::format("{}.tmp.{}", f.path, ::getpid());
    if (!write_new(f.tmp, f.bytes)) {
      const std::string why = std::strerror(errno);
      ::unlink(f.tmp.c_str());
      f.tmp.clear();
      throw InputError(fmt::format("{}: cannot write the output file ({})", label(f.option, f.path), why));
    }
  }
  for (File& f : files_) {
    if (::rename(f.tmp.c_str(), f.path.c_str()) != 0) {
      throw InputError(fmt::format("{}: cannot write the output file ({})", label(f.option, f.path), std::strerror(errno)));
    }
    f.tmp.clear();
  }
  files_.clear();
}

}  // namespace actsim::util
