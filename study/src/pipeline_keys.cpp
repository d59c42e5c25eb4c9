// The pipeline-parallel scenario keys (issue 13): parsing and the refused combinations.
#include "pipeline_keys.hpp"

#include <fmt/format.h>

namespace actsim::study::scenario_detail {

namespace {
std::string blame_pp(const Scenario& sc, std::initializer_list<const char*> keys) {
  for (const char* k : keys) {
    if (sc.origin.count(k)) return sc.where(k);
  }
  return sc.where(*keys.begin());
}
}  // namespace

bool set_pipeline_key(Scenario& sc, const std::string& key, const Value& v, const std::string& where) {
  graph::ParallelConfig& p = sc.training.parallel;
  if (key == "parallel.pp") {
    p.pp = as_int(v, where);
    if (p.pp < 1) fail(where, fmt::format("must be at least 1, got {}", p.pp));
  } else if (key == "parallel.microbatches") {
    p.microbatches = as_int(v, where);
    if (p.microbatches < 1) fail(where, fmt::format("must be at least 1, got {}", p.microbatches));
  } else if (key == "parallel.pp_schedule") {
    const std::string s = as_str(v, where);
    if (s.rfind("interleaved:", 0) == 0) {
      const std::string n = s.substr(12);
      int64_t V = 0;
      bool ok = !n.empty() && n.size() < 7;
      for (char c : n) ok = ok && c >= '0' && c <= '9';
      if (ok) V = std::stoll(n);
      if (!ok || V < 2) fail(where, fmt::format("\"{}\": interleaved:V needs V, the model chunks per stage, an integer >= 2", s));
      p.pp_schedule = graph::PpSchedule::interleaved;
      p.pp_chunks = V;
    } else {
      p.pp_schedule = pick<graph::PpSchedule>(
          s, {{"gpipe", graph::PpSchedule::gpipe}, {"1f1b", graph::PpSchedule::one_f_one_b}, {"interleaved:V", graph::PpSchedule::interleaved}},
          where, "pipeline schedule");
      if (p.pp_schedule == graph::PpSchedule::interleaved) fail(where, "interleaved:V needs V, e.g. \"interleaved:2\"");
      p.pp_chunks = 1;
    }
  } else {
    return false;
  }
  return true;
}

std::optional<std::string> pipeline_problem(const Scenario& sc) {
  auto fail = [](const std::string& where, const std::string& msg) { return std::optional<std::string>(where + ": " + msg); };
  const graph::ParallelConfig& p = sc.training.parallel;
  const graph::TrainingConfig& t = sc.training;
  const int64_t L = sc.model.n_layers, m = p.pp_micro(), V = p.pp_chunks;
  if (p.pp == 1) {
    if (sc.origin.count("parallel.microbatches") || sc.origin.count("parallel.pp_schedule")) {
      return fail(blame_pp(sc, {"parallel.microbatches", "parallel.pp_schedule"}),
                  "micro-batches and a pipeline schedule need parallel.pp > 1");
    }
    return std::nullopt;
  }
  if (p.pp > L) {
    return fail(blame_pp(sc, {"parallel.pp", "model.n_layers"}),
                fmt::format("{} pipeline stages for {} layers: at most one stage per layer", p.pp, L));
  }
  if (L % (p.pp * V) != 0) {
    return fail(V > 1 ? blame_pp(sc, {"parallel.pp_schedule", "parallel.pp", "model.n_layers"})
                      : blame_pp(sc, {"parallel.pp", "model.n_layers"}),
                V > 1 ? fmt::format("{} layers do not split evenly into {} stages x {} chunks (uneven splits are not modelled)", L, p.pp, V)
                      : fmt::format("{} layers do not split evenly into {} stages (uneven splits are not modelled)", L, p.pp));
  }
  if (p.pp_schedule != graph::PpSchedule::gpipe && m < p.pp) {
    return fail(blame_pp(sc, {"parallel.microbatches", "parallel.pp", "parallel.pp_schedule"}),
                fmt::format("{} micro-batches for {} stages: 1F1B and interleaved schedules need at least one per stage", m, p.pp));
  }
  if (p.pp_schedule == graph::PpSchedule::interleaved && m % p.pp != 0) {
    return fail(blame_pp(sc, {"parallel.microbatches", "parallel.pp_schedule"}),
                fmt::format("the interleaved schedule needs micro-batches a multiple of the stages (Megatron-LM's rule): {} is not a multiple of {}",
                            m, p.pp));
  }
  if (sc.model.family != graph::Family::gpt2 && sc.model.family != graph::Family::llama) {
    return fail(blame_pp(sc, {"parallel.pp", "model.hf_config", "model.family"}),
                "pipeline stages are lowered for the gpt2 and llama families only (not yet for model.hf_config)");
  }
  if (t.grad_accum_steps > 1) {
    return fail(blame_pp(sc, {"training.grad_accum_steps", "parallel.pp"}),
                "pipeline parallelism accumulates over its micro-batches; use parallel.microbatches instead of training.grad_accum_steps");
  }
  if (t.autocast_on()) {
    return fail(blame_pp(sc, {"training.autocast", "parallel.pp"}), "autocast with pipeline parallelism is not lowered yet; set training.autocast = \"none\"");
  }
  if (t.trainable.mode != graph::Trainable::all) {
    return fail(blame_pp(sc, {"training.trainable", "parallel.pp"}),
                "frozen parameters or LoRA with pipeline parallelism are not lowered yet; set training.trainable = \"all\"");
  }
  if (t.checkpoint_impl == graph::CheckpointImpl::reentrant) {
    return fail(blame_pp(sc, {"checkpoint.impl", "parallel.pp"}),
                "a stage's input is a received tensor; checkpoint.impl = \"reentrant\" with pipeline stages is not lowered; use \"nonreentrant\"");
  }
  return std::nullopt;
}

}  // namespace actsim::study::scenario_detail
