// Trainable subsets (training.trainable): frozen parameters by name pattern, and LoRA exactly as
// peft 0.21.2 applies it (peft/tuners/lora/layer.py, Linear.forward):
//
//   result = self.base_layer(x)                    # the frozen nn.Linear
//   x = self._cast_input_dtype(x, lora_A.weight.dtype)   # a copy when the dtypes differ
//   result = result + lora_B(lora_A(dropout(x))) * scaling
//   result = result.to(torch_result_dtype)         # result itself: same dtype
//
// with dropout nn.Dropout(lora_dropout) or nn.Identity when it is 0, lora_A = nn.Linear(in, r,
// bias=False), lora_B = nn.Linear(r, out, bias=False), scaling = lora_alpha / r (a Python float:
// `* scaling` is mul with a wrapped number). The adapter's parameters follow the base layer's in
// named_parameters() (base_layer.weight, base_layer.bias, lora_A.default.weight,
// lora_B.default.weight); every other parameter is frozen (bias="none"). What a frozen base linear
// still saves follows from the save rules: mm/addmm keep `self` only when `mat2` needs a gradient.
#include "actsim/graph/trainable.hpp"

#include <fmt/format.h>

#include <cctype>

#include "lowering.hpp"

namespace actsim::graph {

namespace {

// Glob match of the whole `s`: `*` any run, `?` one character.
bool glob(std::string_view p, std::string_view s) {
  size_t pi = 0, si = 0, star = std::string_view::npos, mark = 0;
  while (si < s.size()) {
    if (pi < p.size() && (p[pi] == '?' || p[pi] == s[si])) {
      ++pi, ++si;
    } else if (pi < p.size() && p[pi] == '*') {
      star = pi++, mark = si;
    } else if (star != std::string_view::npos) {
      pi = star + 1, si = ++mark;
    } else {
      return false;
    }
  }
  while (pi < p.size() && p[pi] == '*') ++pi;
  return pi == p.size();
}

bool all_digits(std::string_view s) {
  if (s.empty() || s.size() > 9) return false;
  for (char c : s) {
    if (!std::isdigit(static_cast<unsigned char>(c))) return false;
  }
  return true;
}

}  // namespace

bool pattern_matches(std::string_view pattern, std::string_view name) {
  if (glob(pattern, name)) return true;
  for (size_t k = 0; k < name.size(); ++k) {
    if (name[k] == '.' && glob(pattern, name.substr(0, k))) return true;
  }
  return false;
}

std::optional<std::vector<std::string>> expand_braces(std::string_view pattern) {
  const size_t open = pattern.find('{');
  if (open == std::string_view::npos) {
    if (pattern.find('}') != std::string_view::npos) return std::nullopt;
    return std::vector<std::string>{std::string(pattern)};
  }
  const size_t close = pattern.find('}', open);
  if (close == std::string_view::npos) return std::nullopt;
  const std::string_view body = pattern.substr(open + 1, close - open - 1);
  const size_t dots = body.find("..");
  if (dots == std::string_view::npos || !all_digits(body.substr(0, dots)) || !all_digits(body.substr(dots + 2))) {
    return std::nullopt;
  }
  const int64_t a = std::stoll(std::string(body.substr(0, dots))), z = std::stoll(std::string(body.substr(dots + 2)));
  const std::string_view rest = pattern.substr(close + 1);
  if (a > z || z - a >= 100000 || rest.find_first_of("{}") != std::string_view::npos) return std::nullopt;
  std::vector<std::string> out;
  for (int64_t i = a; i <= z; ++i) {
    out.push_back(fmt::format("{}{}{}", pattern.substr(0, open), i, rest));
  }
  return out;
}

bool lora_target_matches(std::string_view target, std::string_view module) {
  if (module == target) return true;
  return module.size() > target.size() && module.substr(module.size() - target.size()) == target &&
         module[module.size() - target.size() - 1] == '.';
}

std::vector<std::string> default_lora_targets(Family f) {
  if (f == Family::gpt2 || f == Family::hf_gpt2) return {"c_attn"};
  if (f == Family::hf_neox) return {"query_key_value"};
  return {"q_proj", "v_proj"};
}

bool lora_supported(Family f) { return f == Family::gpt2 || f == Family::llama || f == Family::hf_llama; }

bool is_lora_target(const TrainableConfig& t, Family f, std::string_view module) {
  if (t.mode != Trainable::lora) return false;
  const std::vector<std::string> targets = t.lora_targets.empty() ? default_lora_targets(f) : t.lora_targets;
  // "all-linear": a transformers model (PreTrainedModel) leaves out its output embeddings; the
  // reference classes are plain nn.Modules, so peft targets their lm_head too.
  if (targets.size() == 1 && targets[0] == "all-linear") return !(is_hf(f) && module == "lm_head");
  for (const std::string& x : targets) {
    if (lora_target_matches(x, module)) return true;
  }
  return false;
}

ModelNames model_names(const ModelConfig& model, const RuntimeProfile& prof) {
  TrainingConfig t;
  t.batch_size = 1;
  Lowering l(model, t, prof, nullptr);
  l.params_only = true;
  lower_parameters(l);
  ModelNames n;
  for (TensorId p : l.out.params) n.parameters.push_back(l.out.graph.tensor(p).name);
  n.linear_modules = std::move(l.linear_modules);
  return n;
}

// ---- the lowering's side ------------------------------------------------------------------------
bool Lowering::trainable(const std::string& name) const {
  const TrainableConfig& t = tr.trainable;
  switch (t.mode) {
    case Trainable::all: return true;
    case Trainable::lora: return false;  // the adapters' own parameters are made trainable below
    case Trainable::frozen:
      for (const std::string& p : t.frozen) {
        if (pattern_matches(p, name)) return false;
      }
      return true;
  }
  return true;
}

TensorId Lowering::linear_weight(const std::string& module, const Shape& shape) {
  TensorId w = param(module + ".weight", shape);
  return tied_linear(module, w);
}

TensorId Lowering::tied_linear(const std::string& module, TensorId w) {
  if (!b.is_replaying_leaves()) linear_modules.push_back(module);
  if (!is_lora_target(tr.trainable, m.family, module)) return w;
  const Shape shape = b.graph().tensor(w).shape;  // (out, in)
  const int64_t r = tr.trainable.lora_r;
  LoraAdapter a{.module = module, .layer = b.graph().storage(b.graph().tensor(w).storage).layer};
  auto adapter_param = [&](const char* which, const Shape& s) {
    TensorId t = b.leaf(module + "." + which + ".default.weight", s, dt, Category::parameter, true);
    if (!b.is_replaying_leaves()) out.params.push_back(t);  // a later micro-batch reuses the first's
    return t;
  };
  a.a = adapter_param("lora_A", {r, shape[1]});
  a.b = adapter_param("lora_B", {shape[0], r});
  lora.emplace(index(w), std::move(a));
  return w;
}

TensorId Lowering::linear(TensorId x, TensorId w, std::optional<TensorId> bias) {
  TensorId result = b.linear(x, w, bias);
  auto it = lora.find(index(w));
  if (it == lora.end()) return result;
  const LoraAdapter& a = it->second;
  const TrainableConfig& t = tr.trainable;
  // x = self._cast_input_dtype(x, lora_A.weight.dtype): a new tensor when the dtypes differ (under
  // autocast a bf16 input, the attention output or the MLP product, becomes float32 here and is
  // cast back to bf16 by lora_A's autocast wrapper); the local lives until forward returns.
  TensorId xin = x;
  if (b.graph().tensor(x).dtype != b.graph().tensor(a.a).dtype) {
    scope(a.layer, a.module);
    xin = b.cast(x, b.graph().tensor(a.a).dtype, "cast_input_dtype");
  }
  TensorId h = xin;
  if (t.lora_dropout > 0) {
    scope(a.layer, a.module + ".lora_dropout.default");
    h = b.dropout(xin, t.lora_dropout);
  }
  scope(a.layer, a.module + ".lora_A.default");
  TensorId down = b.linear(h, a.a, std::nullopt);
  scope(a.layer, a.module + ".lora_B.default");
  TensorId up = b.linear(down, a.b, std::nullopt);
  scope(a.layer, a.module);
  TensorId scaled = b.scalar_op(OpKind::mul_scalar, up, t.lora_alpha / static_cast<double>(t.lora_r));
  TensorId sum = b.binary(OpKind::add, result, scaled);
  b.hold_until_last(x);  // lora.Linear.forward's argument, alive until it returns
  if (xin != x) b.hold_until_last(xin);
  return sum;
}

}  // namespace actsim::graph
