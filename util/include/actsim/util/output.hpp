// actsim::util::OutputSet — every file one command writes, written all or nothing.
//
//   OutputSet out;
//   out.protect("gpt2.toml");                      // an input: never written over
//   out.add("--out", "run.json", j.dump(2));
//   out.add("--trace", "step.json", trace_text);
//   out.commit();   // checks every path, writes each to FILE.tmp.<pid>, then renames them all
//
// A path is refused (InputError naming the option and the path, nothing written) when it is an
// input of the command, is not a regular file (a device, pipe, directory or symbolic link: never
// replaced by a file), or is named by two options. If writing any temporary fails, every
// temporary is removed and no output is touched. Renames within a directory do not fail in
// practice; the set renames only once every temporary is complete.
#pragma once

#include <string>
#include <vector>

namespace actsim::util {

class OutputSet {
 public:
  OutputSet() = default;
  OutputSet(const OutputSet&) = delete;
  OutputSet& operator=(const OutputSet&) = delete;
  ~OutputSet();  // removes temporaries left by a failed commit (never throws)

  // Never write over this file (a scenario, schedule or calibration the command reads).
  void protect(const std::string& input_path);
  // One file to write; `option` names it in messages ("--out", "--trace").
  void add(std::string option, std::string path, std::string bytes);
  // Checks every path (see above), then writes them all or none. Throws InputError.
  void commit();
  bool empty() const { return files_.empty(); }

 private:
  struct File {
    std::string option, path, bytes, tmp;
  };
  std::vector<std::string> inputs_;
  std::vector<File> files_;
};

// The checks of OutputSet::commit for one path (no input list). Throws InputError.
void check_output_path(const std::string& option, const std::string& path,
                       const std::vector<std::string>& inputs = {});

}  // namespace actsim::util
