// Hugging Face config.json -> ModelConfig (families hf_llama, hf_gpt2, hf_neox), with transformers 5.18.0's defaults
// (models/{llama,mistral,qwen2,qwen3,gemma,phi3,gpt2,gpt_neox}/configuration_*.py).
#include "actsim/study/hf_config.hpp"

#include <fmt/format.h>

#include <cmath>
#include <optional>
#include <nlohmann/json.hpp>

#include "actsim/util/error.hpp"
#include "actsim/util/files.hpp"

namespace actsim::study {

using util::read_input_file;

using nlohmann::json;

namespace {

struct Arch {
  const char* name;
  const char* model_type;
  int64_t vocab_size;     // transformers' default when the field is absent
  int64_t kv_heads;       // default num_key_value_heads when absent (0 = num_attention_heads)
  int64_t head_dim;       // default head_dim when absent (0 = hidden_size / num_attention_heads)
  bool qkv_bias_always;   // Qwen2: q/k/v projections always have a bias, o_proj never
  bool has_attention_bias;
  bool has_mlp_bias;
  bool qk_norm;
  int64_t sliding_window; // default when absent; 0 = none. Mistral: 4096; Qwen2/3 only with use_sliding_window
  bool phi3;              // fused qkv_proj and gate_up_proj, resid_pdrop, partial_rotary_factor
  double rms_norm_eps;    // default rms_norm_eps
  bool tied;              // default tie_word_embeddings
  bool gemma;             // scaled embeddings, RMSNorm's (1 + weight), gelu_pytorch_tanh
};

constexpr Arch kArchs[] = {
    {"LlamaForCausalLM", "llama", 32000, 0, 0, false, true, true, false, 0, false, 1e-6, false, false},
    {"MistralForCausalLM", "mistral", 32000, 8, 0, false, false, false, false, 4096, false, 1e-6, false, false},
    {"Qwen2ForCausalLM", "qwen2", 151936, 32, 0, true, false, false, false, 4096, false, 1e-6, false, false},
    {"Qwen3ForCausalLM", "qwen3", 151936, 32, 128, false, true, false, true, 4096, false, 1e-6, false, false},
    {"GemmaForCausalLM", "gemma", 256000, 16, 256, false, true, false, false, 0, false, 1e-6, true, true},
    {"Phi3ForCausalLM", "phi3", 32064, 0, 0, false, false, false, false, 0, true, 1e-5, false, false},
    // issue 11 (hfrest): Gemma2 (parse_gemma2) and Mixtral (parse_mixtral).
    {"Gemma2ForCausalLM", "gemma2", 256000, 4, 256, false, true, false, false, 4096, false, 1e-6, true, true},
    {"MixtralForCausalLM", "mixtral", 32000, 8, 0, false, false, false, false, 0, false, 1e-5, false, false},
};

std::string type_of(const json& v) {
  if (v.is_null()) return "null";
  if (v.is_boolean()) return "boolean";
  if (v.is_number_integer() || v.is_number_unsigned()) return "integer";
  if (v.is_number()) return "number";
  if (v.is_string()) return "string";
  if (v.is_array()) return "array";
  return "object";
}

std::string shown(const json& v) {
  std::string s = v.dump(-1, ' ', true, json::error_handler_t::replace);
  if (s.size() > 40) s = s.substr(0, 37) + "...";
  return s;
}

struct Reader {
  const json& j;
  const std::string& path;

  [[noreturn]] void fail(const std::string& field, const std::string& msg) const {
    throw InputError(fmt::format("{}: {}: {}", path, field, msg));
  }
  const json* find(const char* field) const {
    auto it = j.find(field);
    return it == j.end() || it->is_null() ? nullptr : &*it;
  }
  int64_t integer(const char* field, std::optional<int64_t> def, bool positive = true) const {
    const json* v = find(field);
    if (!v) {
      if (!def) fail(field, "missing (transformers has no default for it here)");
      return *def;
    }
    if (!(v->is_number_integer() || v->is_number_unsigned())) {
      fail(field, fmt::format("expected an integer, got {} {}", type_of(*v), shown(*v)));
    }
    if (v->is_number_unsigned() && v->get<uint64_t>() > static_cast<uint64_t>(INT64_MAX)) {
      fail(field, fmt::format("{} is too large", shown(*v)));
    }
    const int64_t x = v->get<int64_t>();
    if (positive && x <= 0) fail(field, fmt::format("must be a positive integer, got {}", x));
    return x;
  }
  double number(const char* field, double def) const {
    const json* v = find(field);
    if (!v) return def;
    if (!v->is_number()) fail(field, fmt::format("expected a number, got {} {}", type_of(*v), shown(*v)));
    const double x = v->get<double>();
    if (!std::isfinite(x)) fail(field, "must be finite");
    return x;
  }
  bool boolean(const char* field, bool def) const {
    const json* v = find(field);
    if (!v) return def;
    if (!v->is_boolean()) fail(field, fmt::format("expected true or false, got {} {}", type_of(*v), shown(*v)));
    return v->get<bool>();
  }
  std::string string(const char* field, const std::string& def) const {
    const json* v = find(field);
    if (!v) return def;
    if (!v->is_string()) fail(field, fmt::format("expected a string, got {} {}", type_of(*v), shown(*v)));
    return v->get<std::string>();
  }
};

// GPT2LMHeadModel (models/gpt2/configuration_gpt2.py): n_embd, n_layer, n_head (or their
// attribute_map names hidden_size, num_hidden_layers, num_attention_heads), n_inner, n_positions.
int64_t aliased(const Reader& r, const char* name, const char* alias, std::optional<int64_t> def) {
  return r.find(name) || !r.find(alias) ? r.integer(name, def) : r.integer(alias, def);
}

double dropout_p(const Reader& r, const char* field) {
  const double p = r.number(field, 0.1);
  if (!(p >= 0 && p < 1)) r.fail(field, fmt::format("must be in [0, 1), got {}", p));
  return p;
}

HfConfig parse_gpt2(const Reader& r, const std::string& path) {
  (void)path;
  HfConfig h;
  h.architecture = "GPT2LMHeadModel";
  graph::ModelConfig& m = h.model;
  m.family = graph::Family::hf_gpt2;
  m.d_model = aliased(r, "n_embd", "hidden_size", 768);
  m.n_layers = aliased(r, "n_layer", "num_hidden_layers", 12);
  m.n_heads = aliased(r, "n_head", "num_attention_heads", 12);
  m.vocab_size = r.integer("vocab_size", 50257);
  m.n_positions = aliased(r, "n_positions", "max_position_embeddings", 1024);
  h.max_position_embeddings = m.n_positions;
  m.d_ff = r.integer("n_inner", 4 * m.d_model);
  if (m.d_model % m.n_heads != 0) {
    r.fail("n_head", fmt::format("{} does not divide n_embd = {}", m.n_heads, m.d_model));
  }
  const std::string act = r.string("activation_function", "gelu_new");
  if (act != "gelu_new") r.fail("activation_function", fmt::format("\"{}\" is not lowered (gelu_new is)", act));
  m.dropout = dropout_p(r, "resid_pdrop");
  m.embd_dropout = dropout_p(r, "embd_pdrop");
  m.attention_dropout = dropout_p(r, "attn_pdrop");
  if (!r.boolean("scale_attn_weights", true)) r.fail("scale_attn_weights", "false is not lowered");
  if (r.boolean("scale_attn_by_inverse_layer_idx", false)) r.fail("scale_attn_by_inverse_layer_idx", "true is not lowered");
  if (r.boolean("reorder_and_upcast_attn", false)) r.fail("reorder_and_upcast_attn", "true is not lowered");
  if (r.boolean("add_cross_attention", false)) r.fail("add_cross_attention", "cross-attention is not lowered");
  (void)r.number("layer_norm_epsilon", 1e-5);
  m.tie_embeddings = r.boolean("tie_word_embeddings", true) ? 1 : 0;
  m.use_cache = r.boolean("use_cache", true);
  m.attention = graph::Attention::flash;  // transformers' default attn_implementation: "sdpa"
  return h;
}

// GPTNeoXForCausalLM (models/gpt_neox/configuration_gpt_neox.py): rotary_pct and rotary_emb_base
// (4.x names) or rope_parameters' partial_rotary_factor and rope_theta; attention_bias for both
// query_key_value and dense; hidden_dropout for emb_dropout and the two residual dropouts.
HfConfig parse_neox(const Reader& r) {
  HfConfig h;
  h.architecture = "GPTNeoXForCausalLM";
  graph::ModelConfig& m = h.model;
  m.family = graph::Family::hf_neox;
  m.d_model = r.integer("hidden_size", 6144);
  m.n_layers = r.integer("num_hidden_layers", 44);
  m.n_heads = r.integer("num_attention_heads", 64);
  m.d_ff = r.integer("intermediate_size", 24576);
  m.vocab_size = r.integer("vocab_size", 50432);
  h.max_position_embeddings = r.integer("max_position_embeddings", 2048);
  if (m.d_model % m.n_heads != 0) {
    r.fail("num_attention_heads", fmt::format("{} does not divide hidden_size = {}", m.n_heads, m.d_model));
  }
  const std::string act = r.string("hidden_act", "gelu");
  if (act != "gelu") r.fail("hidden_act", fmt::format("\"{}\" is not lowered (gelu is)", act));
  m.attention_dropout = r.number("attention_dropout", 0.0);
  if (!(m.attention_dropout >= 0 && m.attention_dropout < 1)) {
    r.fail("attention_dropout", fmt::format("must be in [0, 1), got {}", m.attention_dropout));
  }
  m.dropout = m.embd_dropout = r.number("hidden_dropout", 0.0);
  if (!(m.dropout >= 0 && m.dropout < 1)) r.fail("hidden_dropout", fmt::format("must be in [0, 1), got {}", m.dropout));
  m.norm_eps = r.number("layer_norm_eps", 1e-5);
  m.tie_embeddings = r.boolean("tie_word_embeddings", false) ? 1 : 0;
  m.use_cache = r.boolean("use_cache", true);
  m.parallel_residual = r.boolean("use_parallel_residual", true);
  m.qkv_bias = m.o_bias = r.boolean("attention_bias", true);
  double theta = r.number("rotary_emb_base", 10000.0);
  m.partial_rotary = r.number("rotary_pct", 0.25);
  for (const char* k : {"rope_parameters", "rope_scaling"}) {
    if (const json* rp = r.find(k)) {
      if (!rp->is_object()) r.fail(k, fmt::format("expected an object, got {} {}", type_of(*rp), shown(*rp)));
      const Reader sub{*rp, r.path};
      if (sub.find("rope_theta")) theta = sub.number("rope_theta", theta);
      if (sub.find("partial_rotary_factor")) m.partial_rotary = sub.number("partial_rotary_factor", 1.0);
      if (sub.string("rope_type", sub.string("type", "default")) == "longrope") r.fail(k, "longrope is not lowered for GPT-NeoX");
    }
  }
  if (!(theta > 0)) r.fail("rotary_emb_base", "must be positive");
  m.rope_theta = theta;
  const int64_t rd = static_cast<int64_t>(static_cast<double>(m.hd()) * m.partial_rotary);
  if (!(m.partial_rotary > 0 && m.partial_rotary <= 1) || rd < 2 || rd % 2 != 0) {
    r.fail("rotary_pct", fmt::format("{} gives a rotary dim of {} (must be even and positive)", m.partial_rotary, rd));
  }
  m.attention = graph::Attention::flash;  // transformers' default attn_implementation: "sdpa"
  h.keys = {"model.family", "model.vocab_size", "model.d_model", "model.n_heads", "model.n_layers", "model.d_ff",
            "model.tie_embeddings", "model.rope_theta", "model.attention"};
  return h;
}

// A softcapping value: a positive number, or null (explicitly off); `def` when absent.
double softcapping(const Reader& r, const char* field, double def) {
  if (r.j.contains(field) && r.j.at(field).is_null()) return 0;
  const double c = r.number(field, def);
  if (!(c > 0)) r.fail(field, fmt::format("must be positive (or null for none), got {}", c));
  return c;
}

// Gemma2ForCausalLM (models/gemma2/configuration_gemma2.py): query_pre_attn_scalar, tanh
// softcapping of the attention scores (eager) and of the logits, the pre/post feedforward norms,
// layer_types (default: even layers sliding_attention, odd full_attention) and sliding_window.
void parse_gemma2(const Reader& r, HfConfig& h) {
  graph::ModelConfig& m = h.model;
  m.gemma2 = true;
  const double qs = r.number("query_pre_attn_scalar", 256.0);
  if (!(qs > 0)) r.fail("query_pre_attn_scalar", fmt::format("must be positive, got {}", qs));
  m.query_scale = 1.0 / std::sqrt(qs);
  m.attn_softcap = softcapping(r, "attn_logit_softcapping", 50.0);
  m.final_softcap = softcapping(r, "final_logit_softcapping", 30.0);
  if (r.boolean("use_bidirectional_attention", false)) r.fail("use_bidirectional_attention", "true is not lowered");
  if (!r.find("sliding_window") && r.j.contains("sliding_window")) {
    r.fail("sliding_window", "null: Gemma2's forward always builds a sliding-window mask (transformers raises)");
  }
  h.sliding_window = r.integer("sliding_window", 4096);
  m.n_sliding_layers = 0;
  if (const json* lt = r.find("layer_types")) {
    if (!lt->is_array() || static_cast<int64_t>(lt->size()) != m.n_layers) {
      r.fail("layer_types", fmt::format("expected an array of {} strings (num_hidden_layers), got {} {}", m.n_layers,
                                        type_of(*lt), shown(*lt)));
    }
    for (const json& x : *lt) {
      if (!x.is_string() || (x != "sliding_attention" && x != "full_attention")) {
        r.fail("layer_types", fmt::format("expected \"sliding_attention\" or \"full_attention\", got {}", shown(x)));
      }
      m.n_sliding_layers += x == "sliding_attention" ? 1 : 0;
    }
  } else {
    m.n_sliding_layers = (m.n_layers + 1) / 2;
  }
}

// MixtralForCausalLM (models/mixtral/configuration_mixtral.py): num_local_experts (alias
// num_experts), num_experts_per_tok. The load-balancing loss is off unless output_router_logits.
void parse_mixtral(const Reader& r, graph::ModelConfig& m) {
  m.n_experts = aliased(r, "num_local_experts", "num_experts", 8);
  m.experts_top_k = r.integer("num_experts_per_tok", 2);
  if (m.experts_top_k > m.n_experts) {
    r.fail("num_experts_per_tok", fmt::format("{} is more than num_local_experts = {}", m.experts_top_k, m.n_experts));
  }
  m.router_aux_loss = r.boolean("output_router_logits", false);
  if (m.router_aux_loss) r.fail("output_router_logits", "true (the load-balancing loss) is not lowered");
  (void)r.number("router_aux_loss_coef", 0.001);
  if (r.number("router_jitter_noise", 0.0) != 0) r.fail("router_jitter_noise", "jitter in training is not lowered (must be 0)");
}

}  // namespace

const std::vector<std::string>& hf_architectures() {
  static const std::vector<std::string> names = [] {
    std::vector<std::string> v{"GPT2LMHeadModel", "GPTNeoXForCausalLM"};
    for (const Arch& a : kArchs) v.emplace_back(a.name);
    return v;
  }();
  return names;
}

HfConfig parse_hf_config(const std::string& text, const std::string& path) {
  json j;
  try {
    j = json::parse(text);
  } catch (const json::parse_error& e) {
    throw InputError(fmt::format("{}: not a JSON file (byte {}: {})", path, e.byte,
                                 std::string(e.what()).substr(std::string(e.what()).rfind(": ") + 2)));
  }
  if (!j.is_object()) throw InputError(fmt::format("{}: expected a JSON object, got {}", path, type_of(j)));
  const Reader r{j, path};

  // architectures: ["LlamaForCausalLM"], or model_type when absent.
  const Arch* arch = nullptr;
  std::string arch_name;
  if (const json* a = r.find("architectures")) {
    if (!a->is_array() || a->empty() || !(*a)[0].is_string()) {
      r.fail("architectures", fmt::format("expected an array of strings, got {} {}", type_of(*a), shown(*a)));
    }
    arch_name = (*a)[0].get<std::string>();
    for (const Arch& x : kArchs) {
      if (arch_name == x.name) arch = &x;
    }
  } else {
    const std::string mt = r.string("model_type", "");
    if (mt.empty()) r.fail("architectures", "missing (and no model_type)");
    arch_name = "model_type " + mt;
    if (mt == "gpt2") arch_name = "GPT2LMHeadModel";
    if (mt == "gpt_neox") arch_name = "GPTNeoXForCausalLM";
    for (const Arch& x : kArchs) {
      if (mt == x.model_type) arch = &x;
    }
  }
  if (arch_name == "GPT2LMHeadModel") return parse_gpt2(r, path);
  if (arch_name == "GPTNeoXForCausalLM") return parse_neox(r);
  if (!arch) {
    r.fail("architectures", fmt::format("\"{}\" is not supported (supported: {})", arch_name,
                                        fmt::join(hf_architectures(), ", ")));
  }

  HfConfig h;
  h.architecture = arch->name;
  graph::ModelConfig& m = h.model;
  m.family = graph::Family::hf_llama;
  m.d_model = r.integer("hidden_size", std::nullopt);
  m.n_layers = r.integer("num_hidden_layers", std::nullopt);
  m.n_heads = r.integer("num_attention_heads", std::nullopt);
  m.d_ff = r.integer("intermediate_size", std::nullopt);
  m.vocab_size = r.integer("vocab_size", arch->vocab_size);
  m.n_kv_heads = r.integer("num_key_value_heads", arch->kv_heads > 0 ? arch->kv_heads : m.n_heads);
  if (r.find("head_dim")) {
    m.head_dim = r.integer("head_dim", std::nullopt);
  } else if (arch->head_dim > 0) {
    m.head_dim = arch->head_dim;
  } else if (m.d_model % m.n_heads != 0) {
    r.fail("num_attention_heads", fmt::format("{} does not divide hidden_size = {} (and there is no head_dim)",
                                              m.n_heads, m.d_model));
  }
  if (m.n_heads % m.n_kv_heads != 0) {
    r.fail("num_key_value_heads", fmt::format("{} does not divide num_attention_heads = {}", m.n_kv_heads, m.n_heads));
  }
  if (m.hd() % 2 != 0) r.fail(m.head_dim > 0 ? "head_dim" : "hidden_size", fmt::format("RoPE needs an even head size, got {}", m.hd()));
  // Gemma: "gelu" is a legacy value that GemmaConfig turns into gelu_pytorch_tanh.
  // Gemma2's MLP reads hidden_activation (hidden_act is not a Gemma2Config field).
  const bool gemma2 = std::string(arch->model_type) == "gemma2";
  const char* act_field = gemma2 ? "hidden_activation" : "hidden_act";
  const std::string act = r.string(act_field, arch->gemma ? "gelu_pytorch_tanh" : "silu");
  // (GemmaConfig maps the legacy "gelu" to gelu_pytorch_tanh; Gemma2Config does not.)
  if (arch->gemma ? act != "gelu_pytorch_tanh" && (gemma2 || act != "gelu") : act != "silu") {
    r.fail(act_field, fmt::format("\"{}\" is not lowered ({} is)", act, arch->gemma ? "gelu_pytorch_tanh" : "silu"));
  }
  m.gemma = arch->gemma;
  m.norm_eps = r.number("rms_norm_eps", arch->rms_norm_eps);
  if (!(m.norm_eps > 0)) r.fail("rms_norm_eps", "must be positive");
  m.tie_embeddings = r.boolean("tie_word_embeddings", arch->tied) ? 1 : 0;
  m.use_cache = r.boolean("use_cache", true);
  m.attention_dropout = r.number("attention_dropout", 0.0);
  if (m.attention_dropout != 0) r.fail("attention_dropout", "dropout in attention is not lowered (must be 0)");
  if (arch->qkv_bias_always) {
    m.qkv_bias = true;
  } else if (arch->has_attention_bias) {
    m.qkv_bias = m.o_bias = r.boolean("attention_bias", false);
  }
  if (arch->has_mlp_bias) m.mlp_bias = r.boolean("mlp_bias", false);
  m.qk_norm = arch->qk_norm;
  if (arch->phi3) {
    m.fused_qkv_mlp = true;
    m.dropout = r.number("resid_pdrop", 0.0);
    if (!(m.dropout >= 0 && m.dropout < 1)) r.fail("resid_pdrop", fmt::format("must be in [0, 1), got {}", m.dropout));
    m.partial_rotary = r.number("partial_rotary_factor", 1.0);
  }
  // rope_theta: top level (4.x), or rope_parameters / rope_scaling (5.x). The scaling type changes
  // inv_freq's values, not what is allocated.
  double theta = r.number("rope_theta", 10000.0);
  for (const char* k : {"rope_parameters", "rope_scaling"}) {
    if (const json* rp = r.find(k)) {
      if (!rp->is_object()) r.fail(k, fmt::format("expected an object, got {} {}", type_of(*rp), shown(*rp)));
      const Reader sub{*rp, path};
      if (sub.find("rope_theta")) theta = sub.number("rope_theta", theta);
      const std::string type = sub.string("rope_type", sub.string("type", "default"));
      if (type == "longrope") m.longrope = true;
      if (arch->phi3 && sub.find("partial_rotary_factor")) m.partial_rotary = sub.number("partial_rotary_factor", 1.0);
    }
  }
  if (!(theta > 0)) r.fail("rope_theta", "must be positive");
  const int64_t rd = static_cast<int64_t>(static_cast<double>(m.hd()) * m.partial_rotary);
  if (!(m.partial_rotary > 0 && m.partial_rotary <= 1) || rd < 2 || rd % 2 != 0) {
    r.fail("partial_rotary_factor", fmt::format("{} gives a rotary dim of {} (must be even and positive)", m.partial_rotary, rd));
  }
  m.rope_theta = theta;
  h.max_position_embeddings = r.integer("max_position_embeddings", int64_t{0});
  const bool mistral = std::string(arch->model_type) == "mistral" || std::string(arch->model_type) == "mixtral" || arch->phi3;
  if (gemma2) parse_gemma2(r, h);
  if (std::string(arch->model_type) == "mixtral") parse_mixtral(r, m);
  if (!mistral && !gemma2 && arch->sliding_window > 0 && r.boolean("use_sliding_window", false)) {
    r.fail("use_sliding_window", "sliding-window layers (max_window_layers) are not lowered");
  }
  if (mistral) {
    if (r.find("sliding_window")) h.sliding_window = r.integer("sliding_window", std::nullopt);
    else if (j.find("sliding_window") == j.end()) h.sliding_window = arch->sliding_window;
  }
  m.sliding_window = h.sliding_window;
  m.attention = graph::Attention::flash;  // transformers' default attn_implementation: "sdpa"
  h.keys = {"model.family", "model.vocab_size", "model.d_model", "model.n_heads", "model.n_kv_heads",
            "model.n_layers", "model.d_ff", "model.tie_embeddings", "model.rope_theta", "model.attention"};
  return h;
}

HfConfig read_hf_config(const std::string& path) { return parse_hf_config(read_input_file(path, "config.json"), path); }

}  // namespace actsim::study
