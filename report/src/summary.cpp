// The summary of an analysis: the `simulate --json` contract and the table.
#include "actsim/report/summary.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <map>
#include <tuple>
#include <nlohmann/json.hpp>

#include "actsim/graph/profile.hpp"
#include "actsim/schedule/schedule.hpp"
#include "actsim/study/pipeline.hpp"
#include "actsim/util/error.hpp"
#include "actsim/util/units.hpp"

namespace actsim::report {

using graph::Category;
using graph::Location;
using schedule::model_json;
using sim::SimResult;
using study::Analysis;
using study::Scenario;
using util::human_bytes;
using util::with_commas;

std::vector<PeakGroup> peak_groups(const Analysis& a) {
  const graph::Graph& g = a.step->graph;
  std::map<std::tuple<int, int32_t, std::string>, PeakGroup> groups;
  for (graph::StorageId sid : a.result.live_at_peak) {
    const graph::Storage& st = g.storage(sid);
    std::string op = st.producer == graph::kNoOp ? "(before the step)" : g.op(st.producer).name;
    auto key = std::make_tuple(static_cast<int>(st.category), st.layer, op);
    PeakGroup& pg = groups[key];
    pg.category = st.category;
    pg.layer = st.layer;
    pg.op = op;
    pg.bytes += st.location == Location::host ? st.bytes : g.allocated(st.bytes);  // as the peak counts it
    pg.count += 1;
  }
  std::vector<PeakGroup> out;
  for (auto& [k, v] : groups) out.push_back(v);
  std::stable_sort(out.begin(), out.end(), [](const PeakGroup& x, const PeakGroup& y) { return x.bytes > y.bytes; });
  return out;
}

namespace {

// ---- issue 13: data parallelism ----
// The rank classes of a data-parallel step: every rank of DDP and of ZeRO's even flat partitions
// holds the same bytes, so one class holds them all.
nlohmann::json figures_json(const Analysis& a, int64_t max_batch);
void add_pipeline_json(nlohmann::json& j, const Analysis& a);

// ---- zero_redundancy (issue 13): torch's ZeroRedundancyOptimizer, one class per distinct partition ----
std::string rank_list(const std::vector<int64_t>& ranks) {  // "0, 2-5, 7"
  std::string out;
  for (size_t i = 0; i < ranks.size();) {
    size_t k = i;
    while (k + 1 < ranks.size() && ranks[k + 1] == ranks[k] + 1) ++k;
    out += fmt::format("{}{}", out.empty() ? "" : ", ", k == i ? fmt::format("{}", ranks[i]) : fmt::format("{}-{}", ranks[i], ranks[k]));
    i = k + 1;
  }
  return out;
}
void add_zero_redundancy_json(nlohmann::json& j, const Analysis& a) {
  const study::ZeroRedundancyRanks& zr = *a.zero_ranks;
  j["parallel"]["zero_impl"] = "torch";
  nlohmann::json ranks = nlohmann::json::array();
  for (size_t c = 0; c < zr.classes.size(); ++c) {
    const study::ZeroRankClass& k = zr.classes[c];
    nlohmann::json fig = k.analysis ? figures_json(*k.analysis, -1) : j;
    if (k.analysis) fig["parallel"] = j["parallel"];
    ranks.push_back({{"class", c},
                     {"coordinates", {{"dp", {k.ranks.front(), k.ranks.back()}}, {"dp_ranks", k.ranks}}},
                     {"count", k.ranks.size()},
                     {"zero_redundancy", {{"partition_param_count", k.params}}},
                     {"figures", std::move(fig)}});
  }
  j["ranks"] = std::move(ranks);
  j["peak_rank_class"] = zr.worst;
}
std::string zero_redundancy_line(const Analysis& a) {
  const study::ZeroRedundancyRanks& zr = *a.zero_ranks;
  const graph::ParallelConfig& p = a.scenario.training.parallel;
  const study::ZeroRankClass& w = zr.classes[static_cast<size_t>(zr.worst)];
  std::string out = fmt::format(
      "        data parallel over {} ranks (zero1: torch's ZeroRedundancyOptimizer over DDP); figures of rank class {} "
      "(dp ranks {}, {} rank{} alike), the highest peak\n",
      p.dp, zr.worst, rank_list(w.ranks), w.ranks.size(), w.ranks.size() == 1 ? "" : "s");
  for (size_t c = 0; c < zr.classes.size(); ++c) {
    const study::ZeroRankClass& k = zr.classes[c];
    const Analysis& ka = k.analysis ? *k.analysis : a;
    out += fmt::format("          class {} (dp ranks {}): {} parameters' state, optimizer state {}, peak {}\n", c,
                       rank_list(k.ranks), with_commas(k.params), human_bytes(ka.optimizer_bytes),
                       human_bytes(ka.result.peak_bytes));
  }
  return out;
}
// ---- end zero_redundancy ----

// ---- pprank (issue 13): tensor parallelism in the parallel object and the rank coordinates ----
// With parallel.tp > 1 the parallel object names tp, sp and tp_impl, and a rank class spans every
// tp rank (they hold the same bytes: tp divides the lowering, not the classes); tp == 1 adds nothing.
void add_tp_json(nlohmann::json& parallel, const graph::ParallelConfig& p) {
  if (p.tp == 1) return;
  parallel["tp"] = p.tp;
  parallel["sp"] = p.sp;
  parallel["tp_impl"] = graph::to_string(p.tp_impl);
}
nlohmann::json class_coordinates(const graph::ParallelConfig& p) {
  nlohmann::json c = {{"dp", {0, p.dp - 1}}};
  if (p.tp > 1) c["tp"] = {0, p.tp - 1};
  return c;
}
// ---- end pprank ----

void add_parallel_json(nlohmann::json& j, const Analysis& a) {
  const graph::TrainingConfig& t = a.scenario.training;
  if (t.master_weights != graph::MasterWeights::none) j["training"]["master_weights"] = "fp32";
  if (a.pipeline) return add_pipeline_json(j, a);
  if (!t.parallel.active() && t.parallel.tp == 1) return;
  const graph::ParallelConfig& p = t.parallel;
  j["parallel"] = {{"dp", p.dp}, {"sharding", graph::to_string(p.sharding)}, {"bucket_cap_mb", p.bucket_cap_mb},
                   {"gradient_as_bucket_view", p.gradient_as_bucket_view}};
  add_tp_json(j["parallel"], p);
  if (a.zero_ranks) return add_zero_redundancy_json(j, a);  // zero_redundancy (issue 13)
  nlohmann::json figures = j;
  j["ranks"] = nlohmann::json::array({{{"class", 0}, {"coordinates", class_coordinates(p)}, {"count", p.dp * p.tp},
                                       {"figures", std::move(figures)}}});
  j["peak_rank_class"] = 0;
}

// ---- issue 13: pipeline parallelism (pp helper) ----
std::string schedule_name(const graph::ParallelConfig& p) {
  return p.pp_schedule == graph::PpSchedule::interleaved ? fmt::format("interleaved:{}", p.pp_chunks)
                                                        : std::string(graph::to_string(p.pp_schedule));
}

// The rank classes of a pipeline: the ranks of one stage (every dp rank and every tp rank: tensor
// parallelism divides the lowering, not the classes) hold the same bytes; the
// stages differ (the embedding, the head, the micro-batches in flight), so each is a class.
void add_pipeline_json(nlohmann::json& j, const Analysis& a) {
  const study::Pipeline& pl = *a.pipeline;
  const graph::ParallelConfig& p = pl.config;
  j["parallel"] = {{"dp", p.dp}, {"sharding", graph::to_string(p.sharding)}, {"bucket_cap_mb", p.bucket_cap_mb},
                   {"gradient_as_bucket_view", p.gradient_as_bucket_view}, {"pp", p.pp},
                   {"microbatches", p.pp_micro()}, {"pp_schedule", schedule_name(p)}};
  add_tp_json(j["parallel"], p);
  nlohmann::json ranks = nlohmann::json::array();
  for (int64_t st = 0; st < p.pp; ++st) {
    // The stage's first chunk's lowering, given the stage's figures for the moment of to_json.
    study::Analysis& k = *pl.kinds[static_cast<size_t>(pl.stage_kinds[static_cast<size_t>(st)][0])];
    const sim::SimResult saved = k.result;
    const auto statics = std::make_tuple(k.params_bytes, k.param_count, k.grads_bytes, k.optimizer_bytes,
                                         k.optimizer_host_bytes, k.buffers_bytes, k.inputs_bytes);
    study::apply_stage(k, pl, static_cast<int>(st));
    nlohmann::json fig = figures_json(k, -1);
    k.result = saved;
    std::tie(k.params_bytes, k.param_count, k.grads_bytes, k.optimizer_bytes, k.optimizer_host_bytes, k.buffers_bytes,
             k.inputs_bytes) = statics;
    const study::PpStageResult& r = pl.result.stages[static_cast<size_t>(st)];
    nlohmann::json coordinates = class_coordinates(p);
    coordinates["pp"] = st;
    ranks.push_back({{"class", st},
                     {"coordinates", std::move(coordinates)},
                     {"count", p.dp * p.tp},
                     {"pipeline", {{"layers", a.scenario.model.n_layers / p.pp}, {"max_in_flight", r.max_in_flight},
                                   {"busy_ns", r.busy_ns}, {"idle_ns", pl.result.step_time_ns - r.busy_ns}}},
                     {"figures", std::move(fig)}});
  }
  j["ranks"] = std::move(ranks);
  j["peak_rank_class"] = pl.worst;
  j["pipeline"] = {{"stages", p.pp}, {"microbatches", p.pp_micro()}, {"schedule", schedule_name(p)},
                   {"chunks", p.pp_chunks}, {"step_time_ns", pl.result.step_time_ns},
                   {"bubble_ns", pl.result.bubble_ns}};
}

// pprank (issue 13): the table's "tensor parallel" line, for tp > 1 only.
std::string tp_line(const graph::ParallelConfig& p) {
  if (p.tp == 1) return "";
  return fmt::format("        tensor parallel over {} ranks ({}{}); figures of one tp rank (its shards), a rank class spans all {}\n",
                     p.tp, p.tp_impl == graph::TpImpl::megatron ? "Megatron-LM" : "DTensor", p.sp ? ", sequence parallel" : "", p.tp);
}

std::string pipeline_line(const Analysis& a) {
  const study::Pipeline& pl = *a.pipeline;
  const graph::ParallelConfig& p = pl.config;
  const auto& w = pl.result.stages[static_cast<size_t>(pl.worst)];
  std::string out = fmt::format(
      "        pipeline of {} stages ({}, {} micro-batches of batch {}){}; figures of rank class {} (pp stage {}, "
      "{} ranks alike), the highest peak: {} micro-batches in flight; bubble {:.1f}% of the step\n",
      p.pp, schedule_name(p), p.pp_micro(), a.scenario.training.batch_size,
      p.dp > 1 ? fmt::format(" x data parallel {} ({})", p.dp, p.sharding == graph::Sharding::none ? "DDP" : graph::to_string(p.sharding)) : "",
      pl.worst, pl.worst, p.dp * p.tp, w.max_in_flight,
      pl.result.step_time_ns > 0 ? 100.0 * static_cast<double>(pl.result.bubble_ns) / static_cast<double>(pl.result.step_time_ns) : 0.0);
  out += tp_line(p);
  for (int64_t st = 0; st < p.pp; ++st) {
    const auto& r = pl.result.stages[static_cast<size_t>(st)];
    out += fmt::format("          stage {}: peak {}, {} in flight, busy {:.3f} ms of {:.3f}\n", st, human_bytes(r.peak_bytes),
                       r.max_in_flight, r.busy_ns / 1e6, pl.result.step_time_ns / 1e6);
  }
  return out;
}

std::string parallel_line(const Analysis& a) {
  const graph::ParallelConfig& p = a.scenario.training.parallel;
  if (a.pipeline) return pipeline_line(a);
  if (a.zero_ranks) return zero_redundancy_line(a);  // zero_redundancy (issue 13)
  if (!p.active()) return tp_line(p);
  return fmt::format("        data parallel over {} ranks ({}); figures of rank class 0 (dp ranks 0-{}, {} ranks alike), "
                     "the highest peak\n",
                     p.dp, p.sharding == graph::Sharding::none ? "DDP" : graph::to_string(p.sharding), p.dp - 1, p.dp * p.tp) +
         tp_line(p);
}

}  // namespace

nlohmann::json to_json(const Analysis& a, int64_t max_batch) {
  nlohmann::json j = figures_json(a, max_batch);
  add_parallel_json(j, a);  // issue 13: only for parallel.dp > 1, parallel.pp > 1 or master weights
  return j;
}

namespace {
nlohmann::json figures_json(const Analysis& a, int64_t max_batch) {
  const SimResult& r = a.result;
  const graph::Graph& g = a.step->graph;
  const Scenario& s = a.scenario;
  nlohmann::json j;
  j["scenario"] = s.name;
  j["model"] = model_json(s.model);
  j["training"] = {{"batch_size", s.training.batch_size}, {"dtype", s.training.dtype == graph::DType::f32 ? "fp32"
                                                                   : s.training.dtype == graph::DType::bf16 ? "bf16"
                                                                                                             : "fp16"},
                   {"optimizer", graph::to_string(s.training.optimizer)},
                   {"optimizer_impl", graph::to_string(a.step->optimizer_impl)}};
  j["runtime"] = {{"profile", graph::to_string(s.profile)}};
  if (s.profile != graph::ProfileId::torch_cuda) j["runtime"]["cpu_isa"] = s.cpu_isa == graph::CpuIsa::avx2 ? "avx2" : "avx512";
  j["device"] = {{"name", s.device.name}, {"memory_bytes", s.device.memory_bytes}};
  j["param_count"] = a.param_count;
  j["params_bytes"] = a.params_bytes;
  j["grads_bytes"] = a.grads_bytes;
  j["optimizer_bytes"] = a.optimizer_bytes;
  j["optimizer_host_bytes"] = a.optimizer_host_bytes;
  j["buffers_bytes"] = a.buffers_bytes;
  j["inputs_bytes"] = a.inputs_bytes;
  nlohmann::json block = nlohmann::json::array();
  for (const auto& it : a.block_saved) {
    block.push_back({{"op", it.op}, {"tensor", it.tensor}, {"shape", it.shape},
                     {"dtype", graph::to_string(it.dtype)}, {"bytes", it.bytes}});
  }
  j["activations"] = {{"saved_bytes", a.saved_bytes},
                      {"per_layer_saved_bytes", a.per_layer_saved},
                      {"outside_layers_saved_bytes", a.outside_saved},
                      {"block_saved", block}};
  nlohmann::json by_cat = nlohmann::json::object();
  for (int c = 0; c < graph::kNumCategories; ++c) {
    by_cat[std::string(graph::to_string(static_cast<Category>(c)))] = r.peak_by_category[static_cast<size_t>(c)];
  }
  const graph::Op& pop = g.op(r.peak_op);
  nlohmann::json live = nlohmann::json::array();
  for (const PeakGroup& pg : peak_groups(a)) {
    live.push_back({{"category", graph::to_string(pg.category)}, {"layer", pg.layer}, {"op", pg.op},
                    {"bytes", pg.bytes}, {"storages", pg.count}});
  }
  j["peak"] = {{"bytes", r.peak_bytes}, {"time_ns", r.peak_time_ns}, {"phase", graph::to_string(r.peak_phase)},
               {"op", pop.name}, {"layer", pop.layer}, {"by_category", by_cat}, {"live", live}};
  j["live_bytes"] = {{"step_start", r.live_step_start}, {"end_forward", r.live_end_forward},
                     {"end_backward", r.live_end_backward}, {"end_optimizer", r.live_end_optimizer},
                     {"end_step", r.live_end_step}};
  j["host_bytes"] = r.host_bytes;
  j["step_time_ns"] = r.step_time_ns;
  j["phase_end_ns"] = {{"forward", r.phase_end_ns[0]}, {"backward", r.phase_end_ns[1]},
                       {"optimizer", r.phase_end_ns[2]}};
  j["events"] = r.events;
  j["micro_batches"] = g.micro_batches;  // gradient accumulation: live_bytes are the last one's
  j["ops"] = g.n_ops();
  j["fits"] = r.peak_bytes <= s.device.memory_bytes;
  if (max_batch >= 0) j["max_batch_size"] = max_batch;
  return j;
}
}  // namespace

std::string to_table(const Analysis& a, int64_t max_batch) {
  const SimResult& r = a.result;
  const graph::Graph& g = a.step->graph;
  const Scenario& s = a.scenario;
  const auto& m = s.model;
  std::string out;
  auto line = [&](const std::string& l) { out += l + "\n"; };
  std::string dt = s.training.dtype == graph::DType::f32 ? "fp32" : s.training.dtype == graph::DType::bf16 ? "bf16" : "fp16";
  if (s.training.autocast_on()) dt += s.training.autocast == graph::DType::bf16 ? " + autocast bf16" : " + autocast fp16";
  line(fmt::format("actsim: {} -- {} family, {} layers, d_model {}, {} heads{}, d_ff {}, vocab {}, seq {}",
                   s.name, graph::to_string(m.family), m.n_layers, m.d_model, m.n_heads,
                   m.kv_heads() != m.n_heads ? fmt::format(" ({} kv)", m.kv_heads()) : "", m.ff(), m.vocab_size,
                   m.seq_len));
  line(fmt::format("        batch {}{}, {}, {} ({}), attention {}, dropout {}, profile {}, device {} ({})",
                   s.training.batch_size,
                   g.micro_batches > 1 ? fmt::format(" x {} micro-batches", g.micro_batches) : "", dt, graph::to_string(s.training.optimizer),
                   graph::to_string(a.step->optimizer_impl), graph::to_string(m.attention), m.dropout,
                   graph::to_string(s.profile), s.device.name, human_bytes(s.device.memory_bytes)));
  out += parallel_line(a);
  line("");
  line(fmt::format("  {:<44} {:>14}", "what", "memory"));
  line(fmt::format("  {:<44} {:>14}", fmt::format("parameters ({} elements)", with_commas(a.param_count)),
                   human_bytes(a.params_bytes)));
  line(fmt::format("  {:<44} {:>14}", "gradients", human_bytes(a.grads_bytes)));
  line(fmt::format("  {:<44} {:>14}", fmt::format("optimizer state ({})", graph::to_string(s.training.optimizer)),
                   human_bytes(a.optimizer_bytes)));
  if (a.buffers_bytes) line(fmt::format("  {:<44} {:>14}", "buffers (masks, RoPE tables)", human_bytes(a.buffers_bytes)));
  line(fmt::format("  {:<44} {:>14}", "activations saved for backward", human_bytes(a.saved_bytes)));
  const int64_t per_sample = s.training.batch_size > 0 ? a.saved_bytes / s.training.batch_size : 0;
  line(fmt::format("  {:<44} {:>14}", "  per sample", human_bytes(per_sample)));
  if (!a.per_layer_saved.empty()) {
    line(fmt::format("  {:<44} {:>14}", "  per block", human_bytes(a.per_layer_saved[0])));
    line(fmt::format("  {:<44} {:>14}", "  outside the blocks (embeddings, head, loss)", human_bytes(a.outside_saved)));
  }
  line(fmt::format("  {:<44} {:>14}", "peak (everything live on the device)", human_bytes(r.peak_bytes)));
  const graph::Op& pop = g.op(r.peak_op);
  line(fmt::format("    at {:.3f} ms in the {} pass, op {}", r.peak_time_ns / 1e6, graph::to_string(r.peak_phase),
                   pop.name));
  line("");
  line(std::string(g.micro_batches > 1 ? "  live bytes (last micro-batch): step start " : "  live bytes: step start ") +
       human_bytes(r.live_step_start) + ", end of forward " +
       human_bytes(r.live_end_forward) + ", end of backward " + human_bytes(r.live_end_backward) +
       ", after the optimizer " + human_bytes(r.live_end_optimizer));
  if (g.micro_batches > 1) {
    line(fmt::format("  simulated step time: {:.3f} ms ({} micro-batches of forward and backward {:.3f}, optimizer {:.3f})",
                     r.step_time_ns / 1e6, g.micro_batches, r.phase_end_ns[1] / 1e6,
                     (r.phase_end_ns[2] - r.phase_end_ns[1]) / 1e6));
  } else {
    line(fmt::format("  simulated step time: {:.3f} ms (forward {:.3f}, backward {:.3f}, optimizer {:.3f})",
                     r.step_time_ns / 1e6, r.phase_end_ns[0] / 1e6, (r.phase_end_ns[1] - r.phase_end_ns[0]) / 1e6,
                     (r.phase_end_ns[2] - r.phase_end_ns[1]) / 1e6));
  }
  line("");
  line("  at the peak, by category:");
  for (int c = 0; c < graph::kNumCategories; ++c) {
    int64_t b = r.peak_by_category[static_cast<size_t>(c)];
    if (b) line(fmt::format("    {:<20} {:>14}", graph::to_string(static_cast<Category>(c)), human_bytes(b)));
  }
  if (!a.block_saved.empty()) {
    line("");
    line(fmt::format("  what one block saves for backward ({} per block, largest first):", human_bytes(a.per_layer_saved[0])));
    auto items = a.block_saved;
    std::stable_sort(items.begin(), items.end(), [](const auto& x, const auto& y) { return x.bytes > y.bytes; });
    for (size_t i = 0; i < items.size() && i < 12; ++i) {
      line(fmt::format("    {:>12}  {:<34} {} {}", human_bytes(items[i].bytes), items[i].op,
                       graph::to_string(items[i].dtype), graph::shape_string(items[i].shape)));
    }
    if (items.size() > 12) {
      int64_t rest = 0;
      for (size_t i = 12; i < items.size(); ++i) rest += items[i].bytes;
      line(fmt::format("    {:>12}  ({} smaller tensors)", human_bytes(rest), items.size() - 12));
    }
  }
  line("");
  line("  top contributors at the peak (category, producing op; blocks.* sums over blocks):");
  // Aggregate the per-layer groups over blocks so that 48 identical rows read as one.
  std::map<std::pair<int, std::string>, std::pair<int64_t, int64_t>> agg;
  for (const PeakGroup& pg : peak_groups(a)) {
    std::string op = pg.op;
    if (op.rfind("blocks.", 0) == 0) {
      size_t dot = op.find('.', 7);
      if (dot != std::string::npos) op = "blocks.*" + op.substr(dot);
    }
    if (pg.op == "(before the step)" && pg.layer >= 0) op = "blocks.* (before the step)";
    auto& v = agg[{static_cast<int>(pg.category), op}];
    v.first += pg.bytes;
    v.second += pg.count;
  }
  std::vector<std::tuple<int64_t, int, std::string, int64_t>> rows;
  for (auto& [k, v] : agg) rows.emplace_back(v.first, k.first, k.second, v.second);
  std::stable_sort(rows.begin(), rows.end(), [](const auto& x, const auto& y) { return std::get<0>(x) > std::get<0>(y); });
  for (size_t i = 0; i < rows.size() && i < 10; ++i) {
    auto& [bytes, cat, op, count] = rows[i];
    line(fmt::format("    {:>12}  {:<16} {} ({} storage{})", human_bytes(bytes),
                     graph::to_string(static_cast<Category>(cat)), op, count, count == 1 ? "" : "s"));
  }
  if (max_batch >= 0) {
    line("");
    line(fmt::format("  largest batch size that fits {} ({}): {}", s.device.name, human_bytes(s.device.memory_bytes),
                     max_batch));
  }
  return out;
}

}  // namespace actsim::report
