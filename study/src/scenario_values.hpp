// Internal to study/: the typed values of scenario keys and their one-line errors, shared by the
// scenario loader (scenario.cpp) and the trainable-subset keys (scenario_trainable.cpp).
#pragma once

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <variant>
#include <vector>

#include "actsim/sim/device.hpp"
#include "actsim/study/scenario.hpp"
#include "actsim/util/error.hpp"

namespace actsim::study::scenario_detail {

using sim::closest;

using Value = std::variant<int64_t, double, bool, std::string>;

inline std::string type_name(const Value& v) {
  switch (v.index()) {
    case 0: return "an integer";
    case 1: return "a number";
    case 2: return "a boolean";
    default: return "a string";
  }
}

inline std::string show(const Value& v) {
  switch (v.index()) {
    case 0: return std::to_string(std::get<0>(v));
    case 1: return fmt::format("{}", std::get<1>(v));
    case 2: return std::get<2>(v) ? "true" : "false";
    default: return "\"" + std::get<3>(v) + "\"";
  }
}

[[noreturn]] inline void fail(const std::string& where, const std::string& msg) { throw InputError(where + ": " + msg); }

inline int64_t as_int(const Value& v, const std::string& where) {
  if (auto* i = std::get_if<int64_t>(&v)) return *i;
  fail(where, fmt::format("expected an integer, got {} {}", type_name(v), show(v)));
}
inline double as_num(const Value& v, const std::string& where) {
  if (auto* i = std::get_if<int64_t>(&v)) return static_cast<double>(*i);
  if (auto* d = std::get_if<double>(&v)) {
    // nan and inf are TOML floats, but no scenario key means anything by them.
    if (!std::isfinite(*d)) fail(where, fmt::format("expected a finite number, got {}", show(v)));
    return *d;
  }
  fail(where, fmt::format("expected a number, got {} {}", type_name(v), show(v)));
}
inline bool as_bool(const Value& v, const std::string& where) {
  if (auto* b = std::get_if<bool>(&v)) return *b;
  fail(where, fmt::format("expected true or false, got {} {}", type_name(v), show(v)));
}
inline std::string as_str(const Value& v, const std::string& where) {
  if (auto* s = std::get_if<std::string>(&v)) return *s;
  fail(where, fmt::format("expected a string, got {} {}", type_name(v), show(v)));
}

template <typename E>
E pick(const std::string& s, const std::vector<std::pair<std::string, E>>& opts, const std::string& where,
       const char* what) {
  std::vector<std::string> names;
  for (auto& [n, e] : opts) {
    if (n == s) return e;
    names.push_back(n);
  }
  std::string hint = closest(s, names);
  fail(where, fmt::format("unknown {} \"{}\"{} (one of: {})", what, s,
                          hint.empty() ? "" : fmt::format("; did you mean \"{}\"?", hint), fmt::join(names, ", ")));
}

// training.trainable and lora.* (scenario_trainable.cpp): false if `key` is none of them.
bool set_trainable_key(Scenario& sc, const std::string& key, const Value& v, const std::string& where);
// The trainable subset against the model's own names: every frozen pattern and LoRA target must
// name something, and something must still train.
std::optional<std::string> trainable_problem(const Scenario& sc);
// issue 13, tensor and sequence parallelism (scenario_tp.cpp): parallel.tp, parallel.sp and
// parallel.tp_impl (false if `key` is none of them), and the combinations that are refused.
bool set_tp_key(Scenario& sc, const std::string& key, const Value& v, const std::string& where);
std::optional<std::string> tp_problem(const Scenario& sc);
// Where to report a constraint between keys: the first of `keys` that the user set (file:line or
// --set), so the message points at their input; the first key when all are defaults.
inline std::string blame(const Scenario& sc, std::initializer_list<const char*> keys) {
  for (const char* k : keys) {
    if (sc.origin.count(k)) return sc.where(k);
  }
  return sc.where(*keys.begin());
}

// issue 13 (scenario_sharding.cpp): the combinations ZeRO-3 and FSDP2 are not lowered for.
std::optional<std::string> sharding_problem(const Scenario& sc);

// zero_redundancy (issue 13, scenario_zero_redundancy.cpp): parallel.zero_impl (false if `key` is
// not it), and the combinations torch's ZeroRedundancyOptimizer is not lowered for.
bool set_zero_redundancy_key(Scenario& sc, const std::string& key, const Value& v, const std::string& where);
std::optional<std::string> zero_redundancy_problem(const Scenario& sc);

}  // namespace actsim::study::scenario_detail
