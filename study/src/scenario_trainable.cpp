// The trainable-subset keys of a scenario (issue 12, recipe 3): training.trainable (all, lora,
// frozen:PATTERNS) and lora.*, parsed where they are written and checked against the model's names.
#include <fmt/format.h>

#include <algorithm>

#include "actsim/graph/profile.hpp"
#include "actsim/graph/trainable.hpp"
#include "actsim/util/text.hpp"
#include "scenario_values.hpp"

namespace actsim::study::scenario_detail {

using graph::Family;

// ---- trainable subsets (issue 12, recipe 3: LoRA and frozen weights) -----------------------------
namespace {

// Comma-separated items (util::split_list), spaces around them dropped; an empty item is an error.
std::vector<std::string> comma_items(const std::string& text, const std::string& where, const char* what) {
  std::vector<std::string> out;
  for (std::string item : util::split_list(text)) {
    item.erase(0, item.find_first_not_of(' '));
    item.erase(item.find_last_not_of(' ') + 1);
    if (item.empty()) fail(where, fmt::format("an empty {} in \"{}\"", what, text));
    out.push_back(item);
  }
  return out;
}

}  // namespace

// training.trainable and lora.*: false if `key` is none of them.
bool set_trainable_key(Scenario& sc, const std::string& key, const Value& v, const std::string& where) {
  graph::TrainableConfig& tc = sc.training.trainable;
  if (key == "training.trainable") {
    const std::string s = as_str(v, where);
    if (s == "all" || s == "lora") {
      tc.mode = s == "all" ? graph::Trainable::all : graph::Trainable::lora;
      tc.frozen.clear();
    } else if (s.rfind("frozen:", 0) == 0) {
      tc.mode = graph::Trainable::frozen;
      tc.frozen.clear();
      for (const std::string& p : comma_items(s.substr(7), where, "pattern")) {
        std::optional<std::vector<std::string>> e = graph::expand_braces(p);
        if (!e) fail(where, fmt::format("bad range in pattern \"{}\" (write {{A..B}} with integers A <= B, one per pattern)", p));
        tc.frozen.insert(tc.frozen.end(), e->begin(), e->end());
      }
    } else {
      fail(where, fmt::format("unknown value \"{}\" (one of: all, lora, frozen:PATTERNS)", s));
    }
  } else if (key == "lora.r") {
    tc.lora_r = as_int(v, where);
    if (tc.lora_r <= 0) fail(where, fmt::format("must be a positive integer, got {}", tc.lora_r));
  } else if (key == "lora.alpha") {
    tc.lora_alpha = as_num(v, where);
    if (!(tc.lora_alpha > 0)) fail(where, fmt::format("must be positive, got {}", tc.lora_alpha));
  } else if (key == "lora.dropout") {
    tc.lora_dropout = as_num(v, where);
    if (!(tc.lora_dropout >= 0 && tc.lora_dropout < 1)) fail(where, fmt::format("must be in [0, 1), got {}", tc.lora_dropout));
  } else if (key == "lora.targets") {
    tc.lora_targets = comma_items(as_str(v, where), where, "target");
    if (tc.lora_targets.size() > 1 && std::find(tc.lora_targets.begin(), tc.lora_targets.end(), "all-linear") != tc.lora_targets.end()) {
      fail(where, "\"all-linear\" stands alone (it names every Linear module)");
    }
  } else {
    return false;
  }
  return true;
}

// The trainable subset against the model's own names: every frozen pattern and LoRA target must
// name something, and something must still train.
std::optional<std::string> trainable_problem(const Scenario& sc) {
  const graph::TrainableConfig& tc = sc.training.trainable;
  auto problem = [](const std::string& where, const std::string& msg) { return std::optional<std::string>(where + ": " + msg); };
  if (tc.mode == graph::Trainable::all) return std::nullopt;
  const Family f = sc.model.family;
  if (tc.mode == graph::Trainable::lora && !graph::lora_supported(f)) {
    return problem(sc.where("training.trainable"),
                   fmt::format("LoRA is lowered for the gpt2, llama and hf_llama families, not {} (frozen:PATTERNS works for every family)",
                               graph::to_string(f)));
  }
  const graph::ModelNames names = graph::model_names(sc.model, sc.runtime());
  auto sample = [](const std::vector<std::string>& xs, bool last_part) {
    std::vector<std::string> seen;
    for (const std::string& x : xs) {
      std::string y = last_part ? x.substr(x.rfind('.') + 1) : x;
      if (std::find(seen.begin(), seen.end(), y) == seen.end()) seen.push_back(y);
    }
    std::string out;
    for (size_t i = 0; i < seen.size() && i < 8; ++i) out += (i ? ", " : "") + seen[i];
    return seen.size() > 8 ? out + ", ..." : out;
  };
  if (tc.mode == graph::Trainable::frozen) {
    size_t frozen = 0;
    for (const std::string& p : tc.frozen) {
      bool any = false;
      for (const std::string& n : names.parameters) any = any || graph::pattern_matches(p, n);
      if (!any) {
        return problem(sc.where("training.trainable"),
                       fmt::format("pattern \"{}\" names no parameter (this model's: {})", p, sample(names.parameters, false)));
      }
    }
    for (const std::string& n : names.parameters) {
      for (const std::string& p : tc.frozen) {
        if (graph::pattern_matches(p, n)) {
          ++frozen;
          break;
        }
      }
    }
    if (frozen == names.parameters.size()) return problem(sc.where("training.trainable"), "freezes every parameter: nothing would train");
    return std::nullopt;
  }
  if (tc.lora_targets.size() == 1 && tc.lora_targets[0] == "all-linear") return std::nullopt;
  const bool by_default = tc.lora_targets.empty();
  for (const std::string& x : by_default ? graph::default_lora_targets(f) : tc.lora_targets) {
    bool any = false;
    for (const std::string& n : names.linear_modules) any = any || graph::lora_target_matches(x, n);
    if (any) continue;
    if (by_default) {  // Phi3's fused qkv_proj, for one
      return problem(sc.where("training.trainable"),
                     fmt::format("the default LoRA target \"{}\" names no Linear module of this model (its: {}); set lora.targets",
                                 x, sample(names.linear_modules, true)));
    }
    return problem(sc.where("lora.targets"), fmt::format("\"{}\" names no Linear module (this model's: {}; or all-linear)", x,
                                                        sample(names.linear_modules, true)));
  }
  return std::nullopt;
}
// ---- end trainable subsets ------------------------------------------------------------------------

}  // namespace actsim::study::scenario_detail
