// actsim::util files: reading inputs once (files, pipes, /dev/stdin).
//
//   std::string text = read_input_file("gpt2.toml", "scenario");   // InputError on "" / dir / empty
#pragma once

#include <string>

namespace actsim::util {

// Reads a whole input file (regular file, pipe or /dev/stdin) once. Throws InputError for an
// empty path, a directory, an unreadable file, or one that is empty or only whitespace.
// `what` names the kind of file in messages ("scenario", "schedule").
std::string read_input_file(const std::string& path, const char* what);

}  // namespace actsim::util
