// actsim::report::PickleWriter — an internal detail of the memory_viz exporter (export_memviz.cpp),
// not public API: a minimal pickle writer (protocol 2) using only opcodes that PyTorch's
// memory_viz JavaScript unpickler accepts. Strings are memoized (BINPUT/BINGET), so repeated keys
// cost 2-5 bytes.
//
//   PickleWriter p;  p.begin_dict();  p.str("k");  p.integer(1);  p.end_dict();  p.finish();
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <string_view>
#include <unordered_map>

namespace actsim::report {

class PickleWriter {
 public:
  PickleWriter();
  void none();
  void boolean(bool v);
  void integer(int64_t v);
  void real(double v);
  void str(std::string_view s);          // memoized
  void begin_dict();                     // then key, value, key, value, ...
  void end_dict();
  void begin_list();
  void end_list();
  // Memoizes the object just completed (a list or dict) under `key`; later `get(key)` pushes the
  // same object again (a BINGET). Returns false if the key was already stored.
  bool put(const std::string& key);
  bool get(const std::string& key);
  std::string finish();                  // STOP; returns the bytes

 private:
  void memo_put();
  void memo_get(uint32_t idx);
  std::string out_;
  uint32_t next_memo_ = 0;
  std::unordered_map<std::string, uint32_t> objects_;     // put(key) -> memo index
  struct StrHash {
    using is_transparent = void;
    size_t operator()(std::string_view s) const { return std::hash<std::string_view>{}(s); }
  };
  std::unordered_map<std::string, uint32_t, StrHash, std::equal_to<>> strings_;  // -> memo index
};


}  // namespace actsim::report
