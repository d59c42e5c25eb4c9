#include "actsim/graph/checkpoint.hpp"

#include <fmt/format.h>

#include <cctype>
#include <cmath>

#include "actsim/util/error.hpp"

namespace actsim::graph {

std::string_view to_string(BlockMode m) {
  switch (m) {
    case BlockMode::keep: return "kept";
    case BlockMode::recompute: return "recomputed";
    case BlockMode::selective: return "selective";
    case BlockMode::ops: return "ops";
    case BlockMode::offload: return "offloaded";
    case BlockMode::mlp: return "mlp-recomputed";
  }
  return "?";
}

bool parse_size(const std::string& text, int64_t& bytes) {
  size_t i = 0;
  while (i < text.size() && (std::isdigit(static_cast<unsigned char>(text[i])) || text[i] == '.')) ++i;
  if (i == 0) return false;
  double v;
  try {
    size_t used = 0;
    v = std::stod(text.substr(0, i), &used);
    if (used != i) return false;
  } catch (...) {
    return false;
  }
  std::string unit = text.substr(i);
  while (!unit.empty() && unit.front() == ' ') unit.erase(0, 1);
  static const std::pair<const char*, double> units[] = {
      {"", 1},          {"B", 1},          {"KB", 1e3},         {"MB", 1e6},         {"GB", 1e9},
      {"TB", 1e12},     {"KiB", 1024.0},   {"MiB", 1048576.0},  {"GiB", 1073741824.0},
      {"TiB", 1099511627776.0}};
  for (auto& [u, f] : units) {
    if (unit == u) {
      double b = v * f;
      if (!std::isfinite(b) || b < 0 || b > 9.2e18) return false;
      if (unit.empty() && text.find('.') != std::string::npos) return false;
      bytes = static_cast<int64_t>(std::llround(b));
      return true;
    }
  }
  return false;
}

namespace {

// Forward op kinds that produce tensors (what ops:LIST can name).
constexpr OpKind kCheckpointable[] = {
    OpKind::embedding, OpKind::index_rows, OpKind::copy, OpKind::stack, OpKind::add, OpKind::sub, OpKind::mul,
    OpKind::mul_scalar, OpKind::div_scalar, OpKind::add_scalar, OpKind::pow_scalar, OpKind::rsqrt,
    OpKind::mean_last, OpKind::mm, OpKind::addmm, OpKind::bmm, OpKind::layer_norm, OpKind::gelu_tanh,
    OpKind::silu, OpKind::softmax, OpKind::masked_fill, OpKind::dropout_noise, OpKind::native_dropout,
    OpKind::flash_attention, OpKind::eq_scalar, OpKind::triu, OpKind::ones};

int64_t parse_count(const std::string& s, const std::string& where, const std::string& text) {
  if (s.empty() || s.size() > 9) throw InputError(fmt::format("{}: \"{}\": expected a positive integer after ':'", where, text));
  for (char c : s) {
    if (!std::isdigit(static_cast<unsigned char>(c))) {
      throw InputError(fmt::format("{}: \"{}\": expected a positive integer after ':'", where, text));
    }
  }
  return std::stoll(s);
}

}  // namespace

std::vector<std::string> checkpointable_op_kinds() {
  std::vector<std::string> out;
  for (OpKind k : kCheckpointable) out.emplace_back(to_string(k));
  return out;
}

CheckpointPolicy parse_policy(const std::string& text, const std::string& where) {
  CheckpointPolicy p;
  p.text = text;
  const auto colon = text.find(':');
  const std::string head = text.substr(0, colon);
  const std::string arg = colon == std::string::npos ? "" : text.substr(colon + 1);
  auto no_arg = [&] {
    if (colon != std::string::npos) throw InputError(fmt::format("{}: \"{}\": {} takes no argument", where, text, head));
  };
  if (head == "none") no_arg(), p.kind = CheckpointPolicy::Kind::none;
  else if (head == "full") no_arg(), p.kind = CheckpointPolicy::Kind::full;
  else if (head == "sqrt") no_arg(), p.kind = CheckpointPolicy::Kind::sqrt;
  else if (head == "selective") no_arg(), p.kind = CheckpointPolicy::Kind::selective;
  else if (head == "offload") no_arg(), p.kind = CheckpointPolicy::Kind::offload;
  else if (head == "mlp") no_arg(), p.kind = CheckpointPolicy::Kind::mlp;
  else if (head == "every") {
    p.kind = CheckpointPolicy::Kind::every;
    p.every = parse_count(arg, where, text);
    if (p.every < 1) throw InputError(fmt::format("{}: \"{}\": every:K needs K >= 1", where, text));
  } else if (head == "ops") {
    p.kind = CheckpointPolicy::Kind::ops;
    if (arg.empty()) throw InputError(fmt::format("{}: \"{}\": ops:LIST needs op kinds, e.g. ops:mm,addmm", where, text));
    size_t pos = 0;
    while (pos <= arg.size()) {
      size_t comma = arg.find(',', pos);
      std::string name = arg.substr(pos, comma == std::string::npos ? std::string::npos : comma - pos);
      OpKind k;
      bool ok = parse_op_kind(name, k);
      bool allowed = false;
      for (OpKind c : kCheckpointable) allowed = allowed || (ok && c == k);
      if (!allowed) {
        std::string best;
        int best_d = 1 << 30;
        for (OpKind c : kCheckpointable) {
          std::string n(to_string(c));
          int d = 0;  // cheap similarity: common prefix length (the CLI has a full did-you-mean)
          while (d < static_cast<int>(std::min(n.size(), name.size())) && n[d] == name[d]) ++d;
          if (-d < best_d) best_d = -d, best = n;
        }
        throw InputError(fmt::format("{}: \"{}\": unknown op kind \"{}\"{} (one of: {})", where, text, name,
                                     best_d < -1 ? fmt::format("; did you mean \"{}\"?", best) : "",
                                     fmt::join(checkpointable_op_kinds(), ", ")));
      }
      p.keep_kinds.push_back(k);
      if (comma == std::string::npos) break;
      pos = comma + 1;
    }
  } else if (head == "budget") {
    p.kind = CheckpointPolicy::Kind::budget;
    if (!parse_size(arg, p.budget_bytes) || p.budget_bytes <= 0) {
      throw InputError(fmt::format("{}: \"{}\": budget:BYTES needs a size such as 60GiB, 60GB or 64424509440", where,
                                   text));
    }
  } else {
    throw InputError(fmt::format(
        "{}: unknown checkpoint policy \"{}\" (one of: none, full, every:K, sqrt, selective, ops:LIST, offload, "
        "mlp, budget:BYTES)",
        where, text));
  }
  return p;
}

BlockPlan block_plan(const CheckpointPolicy& p, int64_t n) {
  BlockPlan b;
  b.mode.assign(static_cast<size_t>(n), BlockMode::keep);
  b.segment.assign(static_cast<size_t>(n), -1);
  auto segments_of = [&](int64_t k) {
    for (int64_t i = 0; i < n; ++i) {
      b.mode[i] = BlockMode::recompute;
      b.segment[i] = static_cast<int32_t>(i / k);
    }
  };
  switch (p.kind) {
    case CheckpointPolicy::Kind::none: break;
    case CheckpointPolicy::Kind::full: segments_of(1); break;
    case CheckpointPolicy::Kind::every: segments_of(p.every); break;
    case CheckpointPolicy::Kind::sqrt:
      // Chen et al. 2016: segments of about sqrt(L) blocks.
      segments_of(std::max<int64_t>(1, std::llround(std::sqrt(static_cast<double>(n)))));
      break;
    case CheckpointPolicy::Kind::selective:
      for (auto& m : b.mode) m = BlockMode::selective;
      break;
    case CheckpointPolicy::Kind::ops:
      for (int64_t i = 0; i < n; ++i) b.mode[i] = BlockMode::ops, b.segment[i] = static_cast<int32_t>(i);
      b.keep_kinds = p.keep_kinds;
      break;
    case CheckpointPolicy::Kind::offload:
      for (auto& m : b.mode) m = BlockMode::offload;
      break;
    case CheckpointPolicy::Kind::mlp:
      for (auto& m : b.mode) m = BlockMode::mlp;
      break;
    case CheckpointPolicy::Kind::budget:
      ACTSIM_ASSERT(false, "a budget needs the planner, not block_plan");
  }
  return b;
}

bool BlockPlan::is_trivial() const {
  for (BlockMode m : mode) {
    if (m != BlockMode::keep) return false;
  }
  return true;
}

std::string BlockPlan::describe() const {
  constexpr int kModes = static_cast<int>(BlockMode::mlp) + 1;
  int counts[kModes] = {};
  for (BlockMode m : mode) ++counts[static_cast<int>(m)];
  std::string out;
  for (int i = 0; i < kModes; ++i) {
    if (!counts[i]) continue;
    if (!out.empty()) out += ", ";
    out += fmt::format("{} {}", counts[i], to_string(static_cast<BlockMode>(i)));
  }
  return out.empty() ? "no blocks" : out;
}

}  // namespace actsim::graph
