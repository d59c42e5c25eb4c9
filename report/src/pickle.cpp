// PickleWriter: protocol-2 pickles for memory_viz (pickle.hpp).
#include "pickle.hpp"

#include <bit>
#include <cstdint>
#include <cstring>

namespace actsim::report {

namespace {
void put_le(std::string& out, uint64_t v, int n) {
  for (int i = 0; i < n; ++i) out += static_cast<char>((v >> (8 * i)) & 0xff);
}
}  // namespace

PickleWriter::PickleWriter() { out_ = "\x80\x02"; }  // PROTO 2

void PickleWriter::none() { out_ += 'N'; }
void PickleWriter::boolean(bool v) { out_ += v ? '\x88' : '\x89'; }  // NEWTRUE / NEWFALSE

void PickleWriter::integer(int64_t v) {
  if (v >= 0 && v < 256) {
    out_ += 'K';  // BININT1
    put_le(out_, static_cast<uint64_t>(v), 1);
  } else if (v >= 0 && v < 65536) {
    out_ += 'M';  // BININT2
    put_le(out_, static_cast<uint64_t>(v), 2);
  } else if (v >= INT32_MIN && v <= INT32_MAX) {
    out_ += 'J';  // BININT, signed
    put_le(out_, static_cast<uint64_t>(static_cast<uint32_t>(static_cast<int32_t>(v))), 4);
  } else {
    // LONG1: little-endian two's complement, as few bytes as keep the sign.
    std::string b;
    int64_t x = v;
    for (;;) {
      b += static_cast<char>(x & 0xff);
      const bool sign = (x & 0x80) != 0;
      x >>= 8;  // arithmetic shift
      if ((x == 0 && !sign) || (x == -1 && sign)) break;
    }
    out_ += '\x8a';
    out_ += static_cast<char>(b.size());
    out_ += b;
  }
}

void PickleWriter::real(double v) {
  out_ += 'G';  // BINFLOAT, big-endian
  const uint64_t bits = std::bit_cast<uint64_t>(v);
  for (int i = 7; i >= 0; --i) out_ += static_cast<char>((bits >> (8 * i)) & 0xff);
}

void PickleWriter::str(std::string_view s) {
  if (auto it = strings_.find(s); it != strings_.end()) return memo_get(it->second);
  out_ += 'X';  // BINUNICODE (UTF-8, 4-byte length)
  put_le(out_, s.size(), 4);
  out_ += s;
  strings_.emplace(std::string(s), next_memo_);
  memo_put();
}

void PickleWriter::begin_dict() { out_ += "}("; }  // EMPTY_DICT MARK
void PickleWriter::end_dict() { out_ += 'u'; }     // SETITEMS
void PickleWriter::begin_list() { out_ += "]("; }  // EMPTY_LIST MARK
void PickleWriter::end_list() { out_ += 'e'; }     // APPENDS

bool PickleWriter::put(const std::string& key) {
  if (objects_.count(key)) return false;
  objects_.emplace(key, next_memo_);
  memo_put();
  return true;
}

bool PickleWriter::get(const std::string& key) {
  auto it = objects_.find(key);
  if (it == objects_.end()) return false;
  memo_get(it->second);
  return true;
}

void PickleWriter::memo_put() {
  const uint32_t i = next_memo_++;
  if (i < 256) {
    out_ += 'q';  // BINPUT
    put_le(out_, i, 1);
  } else {
    out_ += 'r';  // LONG_BINPUT
    put_le(out_, i, 4);
  }
}

void PickleWriter::memo_get(uint32_t i) {
  if (i < 256) {
    out_ += 'h';  // BINGET
    put_le(out_, i, 1);
  } else {
    out_ += 'j';  // LONG_BINGET
    put_le(out_, i, 4);
  }
}

std::string PickleWriter::finish() {
  out_ += '.';  // STOP
  return std::move(out_);
}

}  // namespace actsim::report
