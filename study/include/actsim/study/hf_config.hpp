// actsim::sim::read_hf_config — a Hugging Face config.json as a model to lower.
//
//   HfConfig h = read_hf_config("scenarios/hf/llama-3.2-1b.json");
//   h.model.family;        // Family::hf_llama
//   h.architecture;        // "LlamaForCausalLM"
//
// It reads the fields transformers 5.18.0 reads for the architecture's loss and memory in training,
// with transformers' defaults. Every malformed input throws InputError naming the file and the
// field ("llama.json: num_attention_heads: expected an integer, got string \"32\"").
#pragma once

#include <string>
#include <vector>

#include "actsim/graph/config.hpp"

namespace actsim::study {

struct HfConfig {
  graph::ModelConfig model;             // family hf_llama, the shapes and flags of the config
  std::string architecture;             // the `architectures` value (or derived from model_type)
  int64_t max_position_embeddings = 0;  // 0 when absent
  int64_t sliding_window = 0;           // 0 = none (the mask covers every earlier position)
  // Scenario keys the config decides (model.d_model, ...), for "explicit keys win" merging.
  std::vector<std::string> keys;
};

// The architectures lowered (the families that run transformers' Llama-style decoder code).
const std::vector<std::string>& hf_architectures();

HfConfig read_hf_config(const std::string& path);

// The same from the text of a file already read (`path` names it in messages).
HfConfig parse_hf_config(const std::string& text, const std::string& path);

}  // namespace actsim::study
