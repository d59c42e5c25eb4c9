#include "actsim/study/scenario.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <limits>
#include <optional>
#include <toml++/toml.h>
#include <variant>

#include "actsim/graph/checkpoint.hpp"
#include "actsim/util/error.hpp"
#include "actsim/util/files.hpp"
#include "actsim/graph/profile.hpp"
#include "actsim/graph/trainable.hpp"
#include "actsim/study/hf_config.hpp"
#include "pipeline_keys.hpp"
#include "scenario_values.hpp"

namespace actsim::study {

using sim::find_device;
using sim::closest;

using graph::Attention;
using graph::DType;
using graph::Family;
using graph::Optimizer;
using graph::OptimizerImpl;

const std::vector<std::string>& scenario_keys() {
  static const std::vector<std::string> keys{
      "name",
      "description",
      "model.family",
      "model.vocab_size",
      "model.seq_len",
      "model.d_model",
      "model.n_heads",
      "model.n_kv_heads",
      "model.n_layers",
      "model.d_ff",
      "model.dropout",
      "model.attention",
      "model.tie_embeddings",
      "model.rope_theta",
      "training.batch_size",
      "training.dtype",
      "training.optimizer",
      "training.optimizer_impl",
      "training.weight_decay",
      // gradient accumulation (issue 12, recipe 2)
      "training.grad_accum_steps",
      "training.autocast",  // autocast recipe (issue 12)
      "runtime.profile",
      "runtime.cpu_isa",
      "device.name",
      "checkpoint.policy",
      // trainable subsets (issue 12, recipe 3): LoRA and frozen weights
      "training.trainable",
      "lora.r",
      "lora.alpha",
      "lora.dropout",
      "lora.targets",
      // checkpoint implementation (issue 12, recipe 4)
      "checkpoint.impl",
      "checkpoint.preserve_rng_state",
      // issue 13: data parallelism and sharding, master weights
      "parallel.dp",
      "parallel.sharding",
      "parallel.bucket_cap_mb",
      "parallel.gradient_as_bucket_view",
      "training.master_weights",
      // issue 13: tensor and sequence parallelism (scenario_tp.cpp)
      "parallel.tp",
      "parallel.sp",
      "parallel.tp_impl",
      // dp2 (issue 13, data-parallel half)
      "parallel.no_sync",
      // issue 13: pipeline parallelism (pp helper, pipeline_keys.cpp)
      "parallel.pp",
      "parallel.microbatches",
      "parallel.pp_schedule",
      // fsdp2 (issue 13): FSDP2's fully_shard (lower_fsdp.cpp)
      "parallel.reshard_after_forward",
      // zero_redundancy (issue 13): torch's ZeroRedundancyOptimizer (scenario_zero_redundancy.cpp)
      "parallel.zero_impl",
  };
  return keys;
}

std::string Scenario::where(const std::string& key) const {
  auto it = origin.find(key);
  if (it == origin.end()) return key;
  return it->second + ": " + key;
}

std::string Scenario::checkpoint_text() const {
  if (const auto* p = std::get_if<graph::CheckpointPolicy>(&checkpoint)) return p->text;
  return std::get<graph::BlockPlan>(checkpoint).describe();
}

bool Scenario::is_budget() const {
  const auto* p = std::get_if<graph::CheckpointPolicy>(&checkpoint);
  return p && p->kind == graph::CheckpointPolicy::Kind::budget;
}

bool parse_size(const std::string& text, int64_t& bytes) { return graph::parse_size(text, bytes); }

namespace {

using namespace scenario_detail;

// model.hf_config (issue 11): a Hugging Face config.json decides the architecture; keys set
// explicitly (before or after it, in the file or with --set) win over its values. A relative path
// in a scenario file is relative to that file. Not in scenario_keys(): `actsim keys` lists it apart.
void set_hf_config(Scenario& sc, const std::string& file, const std::string& loc) {
  std::filesystem::path p(file);
  if (p.is_relative() && loc != "--set" && !sc.file.empty()) p = std::filesystem::path(sc.file).parent_path() / p;
  const HfConfig h = read_hf_config(p.string());
  graph::ModelConfig& m = sc.model;
  const graph::ModelConfig keep = m;
  auto explicit_key = [&](const char* k) { return sc.origin.count(k) > 0; };
  m = h.model;
  m.seq_len = keep.seq_len;
  if (explicit_key("model.dropout")) m.dropout = keep.dropout;
  if (explicit_key("model.vocab_size")) m.vocab_size = keep.vocab_size;
  if (explicit_key("model.d_model")) m.d_model = keep.d_model;
  if (explicit_key("model.n_heads")) m.n_heads = keep.n_heads;
  if (explicit_key("model.n_kv_heads")) m.n_kv_heads = keep.n_kv_heads;
  if (explicit_key("model.n_layers")) m.n_layers = keep.n_layers;
  if (explicit_key("model.d_ff")) m.d_ff = keep.d_ff;
  if (explicit_key("model.tie_embeddings")) m.tie_embeddings = keep.tie_embeddings;
  if (explicit_key("model.rope_theta")) m.rope_theta = keep.rope_theta;
  if (explicit_key("model.attention")) m.attention = keep.attention;
  sc.hf_architecture = h.architecture;
}


void set_key(Scenario& sc, const std::string& key, const Value& v, const std::string& loc) {
  const std::string where = loc + ": " + key;
  if (key == "model.hf_config") {
    set_hf_config(sc, as_str(v, where), loc);
    sc.origin[key] = loc;
    return;
  }
  // issue 11 (hfrest): model.moe_routing = "n0,n1,...,nE-1" tokens per expert for every layer, or
  // one such list per layer separated by ';'. Checked against the model in first_problem.
  if (key == "model.moe_routing") {
    sc.moe_routing.clear();
    const std::string text = as_str(v, where);
    std::vector<int64_t> cur;
    std::string num;
    auto flush_num = [&]() {
      size_t a = num.find_first_not_of(" \t"), z = num.find_last_not_of(" \t");
      const std::string n = a == std::string::npos ? "" : num.substr(a, z - a + 1);
      if (n.empty() || n.find_first_not_of("0123456789") != std::string::npos || n.size() > 12) {
        fail(where, fmt::format("expected comma-separated token counts (\"8,8,0,16\", layers separated by ';'), got \"{}\"", text));
      }
      cur.push_back(std::stoll(n));
      num.clear();
    };
    for (char c : text + ";") {
      if (c == ',') flush_num();
      else if (c == ';') {
        flush_num();
        sc.moe_routing.push_back(cur);
        cur.clear();
      } else num += c;
    }
    sc.origin[key] = loc;
    return;
  }
  if (key == "model.family" && graph::is_hf(sc.model.family)) {
    fail(where, "model.hf_config decides the family; remove one of them");
  }
  auto positive = [&](int64_t x) {
    if (x <= 0) fail(where, fmt::format("must be a positive integer, got {}", x));
    return x;
  };
  auto& m = sc.model;
  auto& t = sc.training;
  if (key == "name") sc.name = as_str(v, where);
  else if (key == "description") (void)as_str(v, where);
  else if (key == "model.family")
    m.family = pick<Family>(as_str(v, where), {{"gpt2", Family::gpt2}, {"llama", Family::llama}}, where, "family");
  else if (key == "model.vocab_size") m.vocab_size = positive(as_int(v, where));
  else if (key == "model.seq_len") m.seq_len = positive(as_int(v, where));
  else if (key == "model.d_model") m.d_model = positive(as_int(v, where));
  else if (key == "model.n_heads") m.n_heads = positive(as_int(v, where));
  else if (key == "model.n_kv_heads") m.n_kv_heads = positive(as_int(v, where));
  else if (key == "model.n_layers") m.n_layers = positive(as_int(v, where));
  else if (key == "model.d_ff") m.d_ff = positive(as_int(v, where));
  else if (key == "model.dropout") {
    m.dropout = as_num(v, where);
    if (!(m.dropout >= 0 && m.dropout < 1)) fail(where, fmt::format("must be in [0, 1), got {}", m.dropout));
  } else if (key == "model.attention")
    m.attention = pick<Attention>(as_str(v, where), {{"eager", Attention::eager}, {"flash", Attention::flash}}, where,
                                  "attention");
  else if (key == "model.tie_embeddings") m.tie_embeddings = as_bool(v, where) ? 1 : 0;
  else if (key == "model.rope_theta") {
    m.rope_theta = as_num(v, where);
    if (!(m.rope_theta > 0)) fail(where, "must be positive");
  } else if (key == "training.batch_size") t.batch_size = positive(as_int(v, where));
  else if (key == "training.dtype")
    t.dtype = pick<DType>(as_str(v, where), {{"fp32", DType::f32}, {"bf16", DType::bf16}, {"fp16", DType::f16}},
                          where, "dtype");
  else if (key == "training.optimizer")
    t.optimizer = pick<Optimizer>(as_str(v, where),
                                  {{"adamw", Optimizer::adamw}, {"adam", Optimizer::adam}, {"sgd", Optimizer::sgd},
                                   {"sgd_momentum", Optimizer::sgd_momentum}},
                                  where, "optimizer");
  else if (key == "training.optimizer_impl")
    t.optimizer_impl = pick<OptimizerImpl>(
        as_str(v, where),
        {{"for_loop", OptimizerImpl::for_loop}, {"foreach", OptimizerImpl::foreach}, {"fused", OptimizerImpl::fused}},
        where, "optimizer implementation");
  // --- autocast recipe (issue 12): torch.autocast's dtype for the forward, or none ---
  else if (key == "training.autocast")
    t.autocast = pick<DType>(as_str(v, where), {{"none", DType::f32}, {"bf16", DType::bf16}, {"fp16", DType::f16}},
                             where, "autocast dtype");
  // --- end autocast recipe ---
  else if (key == "training.weight_decay") {
    t.weight_decay = as_num(v, where);
    if (t.weight_decay < 0) fail(where, "must be non-negative");
  } else if (key == "training.grad_accum_steps") {  // gradient accumulation (issue 12, recipe 2)
    t.grad_accum_steps = positive(as_int(v, where));
  } else if (key == "runtime.profile") {
    std::string p = as_str(v, where);
    if (!graph::parse_profile(p, sc.profile)) {
      pick<int>(p, {{"torch-cuda", 0}, {"torch2-cpu", 1}, {"torch-cpu", 2}}, where, "runtime profile");
    }
  } else if (key == "runtime.cpu_isa") {
    const std::string isa = as_str(v, where);
    // "native" is resolved here; its entry in the list below only names it in the error message.
    sc.cpu_isa = isa == "native" ? graph::native_cpu_isa()
                                 : pick<graph::CpuIsa>(isa, {{"native", graph::CpuIsa::avx512}, {"avx512", graph::CpuIsa::avx512},
                                                             {"avx2", graph::CpuIsa::avx2}}, where, "CPU ISA");
  } else if (key == "device.name") sc.device = find_device(as_str(v, where), where);
  // ---- issue 13: data parallelism and sharding, master weights ----
  else if (key == "parallel.dp") t.parallel.dp = positive(as_int(v, where));
  else if (key == "parallel.sharding") {
    t.parallel.sharding = pick<graph::Sharding>(
        as_str(v, where),
        {{"none", graph::Sharding::none}, {"zero1", graph::Sharding::zero1}, {"zero2", graph::Sharding::zero2},
         {"zero3", graph::Sharding::zero3}, {"fsdp2", graph::Sharding::fsdp2}},  // fsdp2: lower_fsdp.cpp
        where, "sharding");
  } else if (key == "parallel.bucket_cap_mb") {
    t.parallel.bucket_cap_mb = as_num(v, where);
    if (!(t.parallel.bucket_cap_mb > 0 && t.parallel.bucket_cap_mb < 1e9)) fail(where, "must be a positive number of MiB");
  } else if (key == "parallel.gradient_as_bucket_view") t.parallel.gradient_as_bucket_view = as_bool(v, where);
  else if (key == "parallel.no_sync") t.parallel.no_sync = as_bool(v, where);
  else if (key == "parallel.reshard_after_forward") t.parallel.reshard_after_forward = as_bool(v, where);  // fsdp2
  else if (key == "training.master_weights")
    t.master_weights = pick<graph::MasterWeights>(
        as_str(v, where), {{"none", graph::MasterWeights::none}, {"fp32", graph::MasterWeights::fp32}}, where,
        "master weights");
  // ---- end issue 13 ----
  else if (key == "checkpoint.policy") {
    sc.checkpoint = graph::parse_policy(as_str(v, where), where);  // parsed once, rejected where it is written
  }
  else if (set_zero_redundancy_key(sc, key, v, where)) {  // zero_redundancy (issue 13)
  } else if (set_tp_key(sc, key, v, where)) {  // issue 13: tensor and sequence parallelism
  } else if (set_pipeline_key(sc, key, v, where)) {  // issue 13: pipeline parallelism (pipeline_keys.cpp)
  } else if (set_trainable_key(sc, key, v, where)) {
  }
  // checkpoint implementation (issue 12, recipe 4)
  else if (key == "checkpoint.impl")
    sc.training.checkpoint_impl = pick<graph::CheckpointImpl>(
        as_str(v, where),
        {{"nonreentrant", graph::CheckpointImpl::nonreentrant}, {"reentrant", graph::CheckpointImpl::reentrant}}, where,
        "checkpoint implementation");
  else if (key == "checkpoint.preserve_rng_state") sc.training.preserve_rng_state = as_bool(v, where);
  else {
    std::string hint = closest(key, scenario_keys());
    fail(where, fmt::format("unknown key{}", hint.empty() ? "" : fmt::format("; did you mean \"{}\"?", hint)));
  }
  sc.origin[key] = loc;
}

std::optional<Value> from_node(const toml::node& n) {
  if (auto i = n.as_integer()) return Value{i->get()};
  if (auto d = n.as_floating_point()) return Value{d->get()};
  if (auto b = n.as_boolean()) return Value{b->get()};
  if (auto s = n.as_string()) return Value{s->get()};
  return std::nullopt;
}

void walk(Scenario& sc, const toml::table& t, const std::string& prefix, const std::string& file) {
  for (auto&& [k, node] : t) {
    const std::string key = prefix.empty() ? std::string(k.str()) : prefix + "." + std::string(k.str());
    const std::string loc = fmt::format("{}:{}", file, node.source().begin.line);
    if (auto sub = node.as_table()) {
      bool known_table = false;
      for (const auto& known : scenario_keys()) known_table = known_table || known.rfind(key + ".", 0) == 0;
      if (!known_table) {
        std::string hint = closest(key, {"model", "training", "runtime", "device", "checkpoint", "lora"});
        fail(loc + ": " + key,
             fmt::format("unknown table{}", hint.empty() ? "" : fmt::format("; did you mean [{}]?", hint)));
      }
      walk(sc, *sub, key, file);
      continue;
    }
    auto v = from_node(node);
    if (const toml::array* arr = node.as_array(); arr && key == "lora.targets") {  // ["q_proj", "v_proj"]
      std::string joined;
      for (const toml::node& e : *arr) {
        const auto* str = e.as_string();
        if (!str) fail(loc + ": " + key, "expected a list of module names (strings)");
        joined += (joined.empty() ? "" : ",") + str->get();
      }
      v = Value{joined};
    }
    if (!v) fail(loc + ": " + key, "expected a number, boolean or string");
    set_key(sc, key, *v, loc);
  }
}

// Note [TOML nesting]: toml++ parses nested tables, dotted keys, arrays and inline tables
// recursively, so a file nested 50,000 deep overflows the stack inside the parser. Before
// parsing, a small lexer (strings and comments skipped) measures the nesting: open brackets and
// braces plus the dots of the current line. A scenario needs 2 levels; more than
// kMaxTomlNesting is refused. Returns the depth, and the 1-based line where it was first
// exceeded in *line (when not null).
constexpr int64_t kMaxTomlNesting = 32;

int64_t toml_nesting_depth(std::string_view text, int64_t* line = nullptr) {
  int64_t depth = 0, dots = 0, max_depth = 0, ln = 1;
  size_t i = 0;
  const size_t n = text.size();
  auto starts = [&](std::string_view s) { return text.substr(i, s.size()) == s; };
  while (i < n) {
    const char c = text[i];
    if (c == '\n') {
      ++ln, dots = 0, ++i;
      continue;
    }
    if (c == '#') {
      while (i < n && text[i] != '\n') ++i;
      continue;
    }
    if (c == '"' || c == '\'') {
      const bool multi = starts(c == '"' ? "\"\"\"" : "'''");
      const std::string_view close = multi ? (c == '"' ? "\"\"\"" : "'''") : std::string_view(&text[i], 1);
      i += close.size();
      while (i < n && !starts(close)) {
        if (text[i] == '\n') {
          if (!multi) break;  // an unterminated one-line string: the parser reports it
          ++ln;
        }
        if (c == '"' && text[i] == '\\') ++i;  // an escape: skip the escaped character
        ++i;
      }
      if (i < n && starts(close)) i += close.size();
      continue;
    }
    if (c == '[' || c == '{') ++depth;
    else if (c == ']' || c == '}') depth = std::max<int64_t>(0, depth - 1);
    else if (c == '.') ++dots;
    if (depth + dots + 1 > max_depth) {
      max_depth = depth + dots + 1;
      if (line && max_depth == kMaxTomlNesting + 1) *line = ln;
    }
    ++i;
  }
  return max_depth;
}

Value parse_override_value(const std::string& text) {
  // A TOML scalar if it parses as one (42, 0.1, true, "x"), else the bare text as a string.
  // Deeply nested text ([[[[...) is no scalar, and toml++ would recurse once per level.
  if (toml_nesting_depth(text) > kMaxTomlNesting) return Value{text};
  try {
    toml::table t = toml::parse("v = " + text);
    if (auto v = from_node(*t.get("v"))) return *v;
  } catch (const toml::parse_error&) {
  }
  return Value{text};
}

// Whether the product of positive sizes fits int64 with room for sums (a factor of 16).
bool fits_int64(const std::vector<int64_t>& xs) {
  __int128 p = 1;
  for (int64_t x : xs) {
    p *= x;
    if (p > std::numeric_limits<int64_t>::max() / 16) return false;
  }
  return true;
}

// The first constraint `sc` breaks, as the one-line message validate() throws; nullopt if none.
std::optional<std::string> first_problem(const Scenario& sc) {
  auto fail = [](const std::string& where, const std::string& msg) { return std::optional<std::string>(where + ": " + msg); };
  const auto& m = sc.model;
  // The graph has ~100 ops per block; beyond this a run would take minutes and gigabytes.
  constexpr int64_t kMaxLayers = 20000;
  if (m.n_layers > kMaxLayers) {
    return fail(sc.where("model.n_layers"), fmt::format("{} layers is more than actsim simulates (at most {})", m.n_layers, kMaxLayers));
  }
  const auto& t = sc.training;
  if (graph::is_hf(m.family)) {  // model.hf_config (issue 11)
    if (sc.profile == graph::ProfileId::torch_cpu) {
      return fail(blame(sc, {"runtime.profile", "model.hf_config"}), "transformers 5 needs PyTorch 2.x: use torch2-cpu or torch-cuda");
    }
    if (m.attention == Attention::flash && m.sliding_window > 0 && m.seq_len >= m.sliding_window) {
      return fail(blame(sc, {"model.seq_len", "model.hf_config"}),
           fmt::format("seq_len {} reaches sliding_window {}: sdpa then gets a sliding-window mask, which is not lowered",
                       m.seq_len, m.sliding_window));
    }
    // model.moe_routing (issue 11: hfrest): one list per layer (or one for all), one count per
    // expert, each at most the token count (topk picks an expert once per token), summing to
    // tokens x num_experts_per_tok.
    if (!sc.moe_routing.empty()) {
      const std::string w = sc.where("model.moe_routing");
      if (m.n_experts == 0) return fail(w, "needs a mixture-of-experts model (model.hf_config with num_local_experts)");
      const auto n_lists = static_cast<int64_t>(sc.moe_routing.size());
      if (n_lists != 1 && n_lists != m.n_layers) {
        return fail(w, fmt::format("{} lists: give one for every layer or one per layer ({})", n_lists, m.n_layers));
      }
      const int64_t tokens = t.batch_size * m.seq_len;
      for (int64_t l = 0; l < n_lists; ++l) {
        const auto& r = sc.moe_routing[static_cast<size_t>(l)];
        const std::string which = n_lists == 1 ? "" : fmt::format("layer {}: ", l);
        if (static_cast<int64_t>(r.size()) != m.n_experts) {
          return fail(w, fmt::format("{}{} counts for {} experts (num_local_experts)", which, r.size(), m.n_experts));
        }
        int64_t sum = 0;
        for (int64_t c : r) {
          if (c > tokens) return fail(w, fmt::format("{}{} tokens for one expert, but there are {} tokens", which, c, tokens));
          sum += c;
        }
        if (sum != tokens * m.experts_top_k) {
          return fail(w, fmt::format("{}the counts sum to {}, not tokens x num_experts_per_tok = {} x {} = {}", which, sum,
                                     tokens, m.experts_top_k, tokens * m.experts_top_k));
        }
      }
    }
    if (m.family == Family::hf_llama && m.hd() % 2 != 0) return fail(blame(sc, {"model.n_heads", "model.d_model"}), "RoPE needs an even head size");
    if (m.family == Family::hf_neox) {
      const int64_t rd = static_cast<int64_t>(static_cast<double>(m.hd()) * m.partial_rotary);
      if (rd < 2 || rd % 2 != 0) {
        return fail(blame(sc, {"model.n_heads", "model.d_model"}), fmt::format("RoPE needs an even rotary dim, got {}", rd));
      }
    }
  }
  if (m.head_dim == 0 && m.d_model % m.n_heads != 0) {
    return fail(blame(sc, {"model.n_heads", "model.d_model"}),
         fmt::format("model.n_heads = {} does not divide model.d_model = {}", m.n_heads, m.d_model));
  }
  if (m.n_kv_heads > 0 && m.n_heads % m.n_kv_heads != 0) {
    return fail(blame(sc, {"model.n_kv_heads", "model.n_heads"}),
         fmt::format("model.n_kv_heads = {} does not divide model.n_heads = {}", m.n_kv_heads, m.n_heads));
  }
  if (m.family == Family::gpt2 && m.n_kv_heads > 0 && m.n_kv_heads != m.n_heads) {
    return fail(blame(sc, {"model.n_kv_heads", "model.family", "model.n_heads"}), "gpt2 has no grouped-query attention (n_kv_heads must equal n_heads)");
  }
  if (m.family == Family::llama && m.dropout > 0) {
    return fail(blame(sc, {"model.dropout", "model.family"}), "llama has no dropout (the reference model has none)");
  }
  if (m.family == Family::llama && (m.d_model / m.n_heads) % 2 != 0) {
    return fail(blame(sc, {"model.n_heads", "model.d_model", "model.family"}),
         fmt::format("RoPE needs an even head size, d_model / n_heads = {}", m.d_model / m.n_heads));
  }
  if (m.attention == Attention::flash && !sc.runtime().has_sdpa) {
    return fail(blame(sc, {"model.attention", "runtime.profile"}),
         "attention = \"flash\" needs runtime.profile = \"torch-cuda\" or \"torch2-cpu\" (PyTorch 1.13 has no "
         "scaled_dot_product_attention)");
  }
  const bool hf = graph::is_hf(m.family);
  if (m.attention == Attention::flash && (hf ? m.attention_dropout : m.dropout) > 0 &&
      sc.profile == graph::ProfileId::torch2_cpu) {
    // sdp_utils_cpp.cpp use_flash_attention_cpp: check_for_dropout fails on the CPU, and the math
    // fallback (_scaled_dot_product_attention_math: scaled copies, a float mask, the T x T
    // probabilities and their dropout) is not lowered.
    return fail(blame(sc, {"model.attention", "model.dropout", "runtime.profile"}),
         "PyTorch 2.x on the CPU runs attention = \"flash\" with dropout > 0 through SDPA's math fallback, "
         "which actsim does not lower; use attention = \"eager\" or dropout = 0");
  }
  if (std::optional<std::string> p = trainable_problem(sc)) return p;  // trainable subsets (issue 12)
  if (std::optional<std::string> p = pipeline_problem(sc)) return p;  // issue 13: pipeline parallelism
  // checkpoint implementation (issue 12, recipe 4): torch.utils.checkpoint refuses context_fn (what
  // selective activation checkpointing passes) with use_reentrant=True.
  if (t.checkpoint_impl == graph::CheckpointImpl::reentrant) {
    const auto* p = std::get_if<graph::CheckpointPolicy>(&sc.checkpoint);
    if (p && p->kind == graph::CheckpointPolicy::Kind::ops) {
      return fail(blame(sc, {"checkpoint.impl", "checkpoint.policy"}),
                  fmt::format("checkpoint.policy = \"{}\" (selective activation checkpointing) needs checkpoint.impl = "
                              "\"nonreentrant\": torch.utils.checkpoint passes its context_fn only with "
                              "use_reentrant=False",
                              p->text));
    }
    // A reentrant call's output requires grad only if one of its tensor inputs does. With the
    // embeddings frozen (LoRA freezes them; so may frozen:PATTERNS) the first checkpointed block's
    // input does not, and PyTorch gives the checkpointed blocks no gradients at all ("None of the
    // inputs have requires_grad=True. Gradients will be None"): refuse that step rather than
    // simulate one nobody meant to run.
    const auto* pol = std::get_if<graph::CheckpointPolicy>(&sc.checkpoint);
    const bool checkpointing = !pol || pol->kind != graph::CheckpointPolicy::Kind::none;
    const graph::TrainableConfig& tc = t.trainable;
    if (checkpointing && tc.mode != graph::Trainable::all) {
      bool input_requires_grad = false;
      if (tc.mode == graph::Trainable::frozen) {
        for (const std::string& n : graph::model_names(m, sc.runtime()).parameters) {
          if (n.find(".0.") != std::string::npos) break;  // the first block: what comes before it embeds
          bool frozen = false;
          for (const std::string& pat : tc.frozen) frozen = frozen || graph::pattern_matches(pat, n);
          input_requires_grad = input_requires_grad || !frozen;
        }
      }
      if (!input_requires_grad) {
        return fail(blame(sc, {"checkpoint.impl", "training.trainable"}),
                    "checkpoint.impl = \"reentrant\" with frozen embeddings: the first checkpointed block's input "
                    "does not require grad, so torch.utils.checkpoint(use_reentrant=True) gives the checkpointed "
                    "blocks no gradients (PyTorch warns \"None of the inputs have requires_grad=True\"); use "
                    "checkpoint.impl = \"nonreentrant\"");
      }
    }
  }
  // autocast recipe (issue 12)
  if (!sc.runtime().autocast_supports(t.autocast)) {
    return fail(blame(sc, {"training.autocast", "runtime.profile"}),
                "PyTorch 1.13's CPU autocast supports bf16 only (torch.autocast(\"cpu\", dtype=torch.float16) raises "
                "\"AutocastCPU only support Bfloat16\"); use training.autocast = \"bf16\" or runtime.profile = "
                "\"torch2-cpu\"");
  }
  // ---- issue 13: data parallelism and sharding, master weights ----
  // zero_redundancy: torch's ZeroRedundancyOptimizer is DDP's with a partitioned optimizer (ddp())
  if (std::optional<std::string> p = zero_redundancy_problem(sc)) return p;
  const bool ds_zero = t.parallel.sharding != graph::Sharding::none && !t.parallel.zero_redundancy();
  if (ds_zero && t.grad_accum_steps > 1) {
    return fail(blame(sc, {"parallel.sharding", "training.grad_accum_steps"}),
                "ZeRO with gradient accumulation is not lowered yet; set training.grad_accum_steps = 1");
  }
  if (sc.origin.count("parallel.no_sync") && (!t.parallel.ddp() ||
                                              t.grad_accum_steps < 2)) {
    return fail(sc.where("parallel.no_sync"),
                "no_sync is DDP's with gradient accumulation (parallel.dp > 1, sharding = \"none\", "
                "training.grad_accum_steps > 1)");
  }
  // DDP (sharding none) runs with autocast and trainable subsets; the flat fp32 partitions do not.
  const bool flat_state = ds_zero || t.master_weights != graph::MasterWeights::none;
  if (flat_state && t.autocast_on()) {
    return fail(blame(sc, {"training.autocast", "parallel.sharding", "training.master_weights"}),
                "autocast with ZeRO or master weights is not lowered yet; set training.autocast = \"none\"");
  }
  if (flat_state && t.trainable.mode != graph::Trainable::all) {
    return fail(blame(sc, {"training.trainable", "parallel.sharding", "training.master_weights"}),
                "frozen parameters or LoRA with ZeRO or master weights are not lowered yet; set "
                "training.trainable = \"all\"");
  }
  if (t.master_weights == graph::MasterWeights::fp32 && t.dtype == DType::f32) {
    return fail(blame(sc, {"training.master_weights", "training.dtype"}),
                "master_weights = \"fp32\" keeps an fp32 copy of bf16/fp16 parameters; the parameters are fp32 already");
  }
  const bool fsdp2 = t.parallel.sharding == graph::Sharding::fsdp2;  // fsdp2: per-parameter state, any impl
  const bool flat = t.master_weights == graph::MasterWeights::fp32 || (ds_zero && !fsdp2);
  if ((flat || fsdp2) && t.optimizer != Optimizer::adamw && t.optimizer != Optimizer::adam) {
    return fail(blame(sc, {"training.optimizer", "parallel.sharding", "training.master_weights"}),
                "master weights and ZeRO are modelled for Adam/AdamW (the fp32 flat partitions of FusedAdam)");
  }
  if (flat && sc.origin.count("training.optimizer_impl")) {
    return fail(sc.where("training.optimizer_impl"),
                "master weights and ZeRO step with FusedAdam over a flat fp32 partition; remove optimizer_impl");
  }
  if (t.parallel.sharding != graph::Sharding::none && t.parallel.dp < 2) {
    return fail(blame(sc, {"parallel.sharding", "parallel.dp"}), "sharding needs parallel.dp > 1 (there is nothing to shard over)");
  }
  if (t.parallel.dp == 1 && (sc.origin.count("parallel.bucket_cap_mb") || sc.origin.count("parallel.gradient_as_bucket_view"))) {
    return fail(blame(sc, {"parallel.bucket_cap_mb", "parallel.gradient_as_bucket_view"}),
                "DDP's buckets need parallel.dp > 1");
  }
  if (ds_zero && sc.origin.count("parallel.gradient_as_bucket_view")) {
    return fail(sc.where("parallel.gradient_as_bucket_view"), "gradient_as_bucket_view is DDP's (parallel.sharding = \"none\")");
  }
  if (std::optional<std::string> p = sharding_problem(sc)) return p;  // ZeRO-3 and FSDP2 (scenario_sharding.cpp)
  // ---- end issue 13 ----
  if (std::optional<std::string> p = tp_problem(sc)) return p;  // issue 13: tensor and sequence parallelism
  if (t.optimizer_impl == OptimizerImpl::fused && !sc.runtime().has_fused_optimizers) {
    return fail(blame(sc, {"training.optimizer_impl", "runtime.profile"}), "torch 1.13 on the CPU has no fused optimizers");
  }
  // Byte counts of the largest tensors must fit int64 (with room for sums). An overflow is
  // reported at the largest factor the user set: that is the value to fix.
  const int64_t B = t.batch_size, T = m.seq_len, V = m.vocab_size, d = m.d_model, H = m.n_heads, L = m.n_layers;
  const int64_t ff = m.d_ff > 0 ? m.d_ff : graph::default_d_ff(m.family, d);
  const char* ff_key = m.d_ff > 0 ? "model.d_ff" : "model.d_model";
  struct Factor {
    int64_t value;
    const char* key;
  };
  struct Check {
    std::initializer_list<Factor> factors;
    int64_t bytes_per_element;
    const char* what;
  };
  const Check checks[] = {
      {{{B, "training.batch_size"}, {T, "model.seq_len"}, {V, "model.vocab_size"}}, 8,
       "the logits (batch_size x seq_len x vocab_size)"},
      {{{B, "training.batch_size"}, {H, "model.n_heads"}, {T, "model.seq_len"}, {T, "model.seq_len"}}, 8,
       "the attention scores (batch_size x n_heads x seq_len^2)"},
      {{{V, "model.vocab_size"}, {d, "model.d_model"}}, 8, "the embedding (vocab_size x d_model)"},
      {{{ff, ff_key}, {d, "model.d_model"}, {L, "model.n_layers"}}, 8, "the MLP weights (d_ff x d_model x n_layers)"},
      {{{d, "model.d_model"}, {d, "model.d_model"}, {L, "model.n_layers"}}, 16, "the weights (d_model^2 x n_layers)"},
      {{{B, "training.batch_size"}, {T, "model.seq_len"}, {ff, ff_key}, {L, "model.n_layers"}}, 8,
       "the activations (batch_size x seq_len x d_ff x n_layers)"},
      {{{T, "model.seq_len"}, {T, "model.seq_len"}, {L, "model.n_layers"}}, 8, "the causal masks (seq_len^2 x n_layers)"},
      // Eager attention keeps several batch x n_heads x seq_len^2 tensors in every block.
      {{{B, "training.batch_size"}, {H, "model.n_heads"}, {T, "model.seq_len"}, {T, "model.seq_len"},
        {m.attention == Attention::eager ? L : 1, "model.n_layers"}}, 8,
       "the attention scores of all blocks (batch_size x n_heads x seq_len^2 x n_layers)"},
      {{{B, "training.batch_size"}, {T, "model.seq_len"}, {V, "model.vocab_size"}, {3, "model.vocab_size"}}, 8,
       "the logits and their gradients (3 x batch_size x seq_len x vocab_size)"},
  };
  for (const Check& c : checks) {
    std::vector<int64_t> xs{c.bytes_per_element};
    for (const Factor& f : c.factors) xs.push_back(f.value);
    if (fits_int64(xs)) continue;
    const Factor* culprit = nullptr;
    for (const Factor& f : c.factors) {
      if (sc.origin.count(f.key) && (!culprit || f.value > culprit->value)) culprit = &f;
    }
    if (!culprit) culprit = c.factors.begin();
    return fail(sc.where(culprit->key), fmt::format("byte count of {} overflows int64", c.what));
  }
  return std::nullopt;
}

void validate(const Scenario& sc) {
  if (std::optional<std::string> problem = first_problem(sc)) throw InputError(*problem);
}

}  // namespace

std::optional<std::string> scenario_problem(const Scenario& sc) { return first_problem(sc); }

void apply_overrides(Scenario& sc, const std::vector<std::string>& overrides) {
  for (const std::string& o : overrides) {
    auto eq = o.find('=');
    if (eq == std::string::npos || eq == 0) {
      throw InputError(fmt::format("--set {}: expected KEY=VALUE", o));
    }
    std::string key = o.substr(0, eq);
    set_key(sc, key, parse_override_value(o.substr(eq + 1)), "--set");
  }
  validate(sc);
}

Scenario load_scenario_text(const std::string& text, const std::string& path, const std::vector<std::string>& overrides) {
  Scenario sc;
  sc.name = "default";
  sc.device = find_device("H100-SXM-80GB");
  sc.file = path;
  sc.name = std::filesystem::path(path).stem().string();
  if (text.find_first_not_of(" \t\r\n") == std::string::npos) throw InputError(fmt::format("{}: empty scenario file", path));
  int64_t deep_line = 0;
  if (toml_nesting_depth(text, &deep_line) > kMaxTomlNesting) {
    throw InputError(fmt::format("{}:{}: nested deeper than {} levels (tables, dotted keys, arrays); a scenario needs 2",
                                 path, deep_line, kMaxTomlNesting));
  }
  toml::table t;
  try {
    t = toml::parse(std::string_view(text), path);
  } catch (const toml::parse_error& e) {
    // toml++'s descriptions are one line today; keep the error to one line regardless.
    std::string what(e.description());
    std::replace(what.begin(), what.end(), '\n', ' ');
    throw InputError(fmt::format("{}:{}: {}", path, e.source().begin.line, what));
  }
  if (t.empty()) throw InputError(fmt::format("{}: no scenario keys (an empty or comment-only file)", path));
  walk(sc, t, "", path);
  apply_overrides(sc, overrides);
  return sc;
}

Scenario load_scenario(const std::string& path, const std::vector<std::string>& overrides) {
  if (!path.empty()) return load_scenario_text(util::read_input_file(path, "scenario"), path, overrides);
  Scenario sc;
  sc.name = "default";
  sc.device = find_device("H100-SXM-80GB");
  apply_overrides(sc, overrides);
  return sc;
}

}  // namespace actsim::study
