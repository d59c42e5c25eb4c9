// actsim::study::Scenario — one run to simulate: model, training step, runtime profile, device.
//
//   Scenario s = load_scenario("scenarios/gpt2-small.toml", {"training.batch_size=16"});
//   s.training.batch_size;   // 16
//
// Scenario files are TOML with tables [model], [training], [runtime], [device]; `--set KEY=VALUE`
// overrides use the same dotted keys. Every malformed input throws InputError naming the file,
// line and key ("gpt2.toml:12: model.n_heads = 7 does not divide model.d_model = 768").
#pragma once

#include <map>
#include <optional>
#include <string>
#include <variant>
#include <vector>

#include "actsim/graph/checkpoint.hpp"
#include "actsim/graph/config.hpp"
#include "actsim/graph/profile.hpp"
#include "actsim/sim/device.hpp"
#include "actsim/util/files.hpp"

namespace actsim::study {

struct Scenario {
  std::string name;                    // file stem, or "default"
  std::string file;                    // path, or "" when built from defaults and --set
  graph::ModelConfig model;
  graph::TrainingConfig training;
  graph::ProfileId profile = graph::ProfileId::torch_cuda;
  graph::CpuIsa cpu_isa = graph::native_cpu_isa();  // runtime.cpu_isa; CPU profiles only
  sim::DeviceSpec device;
  std::string hf_architecture;          // model.hf_config's `architectures` value, or ""
  // model.moe_routing (issue 11: hfrest): tokens routed to each expert, one list for every layer
  // or one per layer; empty = balanced. Checked against the config; under transformers' grouped_mm
  // experts no allocation depends on it (README: Mixture of experts).
  std::vector<std::vector<int64_t>> moe_routing;
  // checkpoint.policy, parsed once where it is written (a budget included: resolve() asks the
  // planner), or an explicit per-block plan that a program sets (`actsim plan`: the planner's).
  using Checkpointing = std::variant<graph::CheckpointPolicy, graph::BlockPlan>;
  Checkpointing checkpoint = graph::CheckpointPolicy{};
  // Where each key was set ("file.toml:12" or "--set"), for error messages of later stages.
  std::map<std::string, std::string> origin;

  // The runtime profile's rules (for a CPU profile, on this scenario's CPU ISA).
  const graph::RuntimeProfile& runtime() const { return graph::profile(profile, cpu_isa); }

  // "file.toml:12: key" / "--set key" / "key" (defaults): where a key's value came from.
  std::string where(const std::string& key) const;

  // checkpoint.policy as written ("none" by default); an explicit plan's description.
  std::string checkpoint_text() const;
  // A budget:BYTES policy (the plan depends on everything else in the scenario).
  bool is_budget() const;
};

// All keys a scenario accepts, in documentation order.
const std::vector<std::string>& scenario_keys();

// Loads `path` ("" = defaults) and applies `overrides` ("KEY=VALUE"), then validates.
Scenario load_scenario(const std::string& path, const std::vector<std::string>& overrides);

// The same from the text of a file already read (`path` names it in messages).
Scenario load_scenario_text(const std::string& text, const std::string& path, const std::vector<std::string>& overrides);

// Applies further overrides to a loaded scenario and validates again (used by sweeps).
void apply_overrides(Scenario& s, const std::vector<std::string>& overrides);

// The first constraint between keys that `s` breaks (the one-line message apply_overrides would
// throw), or nullopt: for searches over sizes, where a size the scenario rules out is a "no".
std::optional<std::string> scenario_problem(const Scenario& s);

// Parses "60GiB", "60GB", "64424509440", "1.5TiB" into bytes; false if not a size.
bool parse_size(const std::string& text, int64_t& bytes);

}  // namespace actsim::study
