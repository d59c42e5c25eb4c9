// actsim::graph trainable subsets (training.trainable): which parameters train, and where peft's
// LoRA adapters go.
//
//   pattern_matches("blocks.0", "blocks.0.attn.c_attn.weight");        // true (a module prefix)
//   expand_braces("blocks.{0..2}");                                    // blocks.0, blocks.1, blocks.2
//   lora_target_matches("c_proj", "blocks.0.mlp.c_proj");              // true (peft's suffix rule)
//   ModelNames n = model_names(model, profile(ProfileId::torch2_cpu)); // named_parameters(), Linears
//
// Frozen patterns: a pattern matches a parameter name when it matches the whole name, or the name
// begins with what the pattern matches followed by "." (a module: "wte" freezes wte.weight); `*`
// matches any run of characters (dots included), `?` one character; `{a..b}` stands for the
// integers a to b (each becomes one pattern). LoRA targets follow peft's LoraConfig.target_modules
// list rule: a module is targeted when its name equals a target or ends with "." + target;
// "all-linear" targets every Linear, but the output layer of a transformers model (peft's rule).
#pragma once

#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "actsim/graph/config.hpp"
#include "actsim/graph/profile.hpp"

namespace actsim::graph {

// A frozen pattern against a parameter name (the rules above).
bool pattern_matches(std::string_view pattern, std::string_view name);
// "{a..b}" ranges expanded (at most one per pattern, a <= b); nullopt if a brace is malformed.
std::optional<std::vector<std::string>> expand_braces(std::string_view pattern);
// peft's target rule for a list entry: module == target or module ends with "." + target.
bool lora_target_matches(std::string_view target, std::string_view module);
// peft's TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING for the family (gpt2: c_attn;
// llama-style: q_proj, v_proj), used when lora.targets is not set.
std::vector<std::string> default_lora_targets(Family f);
// Whether the families' LoRA lowering exists (gpt2, llama, hf_llama).
bool lora_supported(Family f);
// Whether `module` (an nn.Linear's name) gets a LoRA adapter under `t` (mode lora).
bool is_lora_target(const TrainableConfig& t, Family f, std::string_view module);

// The names a model has, as PyTorch names them: named_parameters() (tied weights once) and its
// nn.Linear modules, in model order.
struct ModelNames {
  std::vector<std::string> parameters;
  std::vector<std::string> linear_modules;
};
ModelNames model_names(const ModelConfig& model, const RuntimeProfile& prof);

}  // namespace actsim::graph
