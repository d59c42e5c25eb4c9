// The schedule reader: JSON lines to a Schedule, every record checked before a Graph is built,
// then the whole schedule validated (docs/schedule-format.md).
#include <fmt/format.h>

#include <array>
#include <cmath>
#include <nlohmann/json.hpp>

#include "actsim/graph/profile.hpp"
#include "actsim/schedule/schedule.hpp"
#include "actsim/util/error.hpp"
#include "actsim/util/files.hpp"
#include "format_names.hpp"

namespace actsim::schedule {

using namespace format;
using graph::OpId;

using graph::Category;
using graph::DType;
using graph::Graph;
using graph::Location;
using graph::Op;
using graph::OpKind;
using graph::Phase;
using graph::StorageId;
using graph::TensorId;
using nlohmann::json;
using Kind = ScheduleEntry::Kind;

namespace {

// Where a record came from, for messages: "file:line: entry 12: ".
struct Where {
  const std::string& file;
  int64_t line = 0;
  int64_t entry = 0;  // 1-based entry number, 0 outside the entries
  std::string str() const {
    return entry ? fmt::format("{}:{}: entry {}", file, line, entry) : fmt::format("{}:{}", file, line);
  }
  [[noreturn]] void fail(const std::string& msg) const { throw InputError(str() + ": " + msg); }
};

int64_t get_int(const json& j, const Where& w, const char* what) {
  if (!j.is_number_integer()) w.fail(fmt::format("{} must be an integer, got {}", what, j.dump()));
  return j.get<int64_t>();
}
double get_num(const json& j, const Where& w, const char* what) {
  if (j.is_number()) return j.get<double>();
  if (j.is_string()) {
    const std::string s = j.get<std::string>();
    if (s == "inf") return INFINITY;
    if (s == "-inf") return -INFINITY;
    if (s == "nan") return NAN;
  }
  w.fail(fmt::format("{} must be a number, got {}", what, j.dump()));
}
std::string get_str(const json& j, const Where& w, const char* what) {
  if (!j.is_string()) w.fail(fmt::format("{} must be a string, got {}", what, j.dump()));
  return j.get<std::string>();
}
template <size_t N>
size_t get_name(const json& j, const std::array<std::string_view, N>& names, const Where& w, const char* what) {
  const std::string s = get_str(j, w, what);
  for (size_t i = 0; i < N; ++i) {
    if (names[i] == s) return i;
  }
  w.fail(fmt::format("unknown {} \"{}\"", what, s));
}
DType get_dtype(const json& j, const Where& w) {
  const std::string s = get_str(j, w, "dtype");
  for (DType d : kDTypes) {
    if (graph::to_string(d) == s) return d;
  }
  w.fail(fmt::format("unknown dtype \"{}\"", s));
}
Category get_category(const json& j, const Where& w) {
  const std::string s = get_str(j, w, "category");
  for (int c = 0; c < graph::kNumCategories; ++c) {
    if (graph::to_string(static_cast<Category>(c)) == s) return static_cast<Category>(c);
  }
  w.fail(fmt::format("unknown category \"{}\"", s));
}
Phase get_phase(const json& j, const Where& w) {
  const std::string s = get_str(j, w, "phase");
  for (Phase p : {Phase::forward, Phase::backward, Phase::optimizer}) {
    if (graph::to_string(p) == s) return p;
  }
  w.fail(fmt::format("unknown phase \"{}\"", s));
}
std::vector<int64_t> get_ints(const json& j, const Where& w, const char* what) {
  if (!j.is_array()) w.fail(fmt::format("{} must be an array of integers", what));
  std::vector<int64_t> v;
  for (const json& x : j) v.push_back(get_int(x, w, what));
  return v;
}
std::vector<TensorId> get_tensors(const json& o, const char* key, size_t n_tensors, const Where& w,
                                  const std::string& ctx) {
  std::vector<TensorId> v;
  if (!o.contains(key)) return v;
  for (int64_t t : get_ints(o[key], w, key)) {
    if (t < 0 || static_cast<size_t>(t) >= n_tensors) w.fail(fmt::format("{}: unknown tensor {} in {}", ctx, t, key));
    v.push_back(TensorId{static_cast<uint32_t>(t)});
  }
  return v;
}


// The raw records, checked one by one before a Graph is built from them (Graph asserts on bad
// structure, which is for our own bugs, not for a user's file).
struct RawTensor {
  graph::Tensor t;
  int64_t line;
};

void read_scenario(const json& sc, const Where& w, Schedule& s) {
  if (!sc.is_object()) w.fail("header: \"scenario\" must be an object");
  auto str = [&](const char* k, const std::string& dflt) {
    return sc.contains(k) ? get_str(sc[k], w, k) : dflt;
  };
  auto integer = [&](const char* k, int64_t dflt) { return sc.contains(k) ? get_int(sc[k], w, k) : dflt; };
  s.scenario_name = str("name", "schedule");
  const std::string fam = str("family", "gpt2");
  if (fam != "gpt2" && fam != "llama") w.fail(fmt::format("header: unknown family \"{}\"", fam));
  s.model.family = fam == "gpt2" ? graph::Family::gpt2 : graph::Family::llama;
  s.model.vocab_size = integer("vocab_size", s.model.vocab_size);
  s.model.seq_len = integer("seq_len", s.model.seq_len);
  s.model.d_model = integer("d_model", s.model.d_model);
  s.model.n_heads = integer("n_heads", s.model.n_heads);
  s.model.n_kv_heads = integer("n_kv_heads", 0);
  s.model.n_layers = integer("n_layers", s.model.n_layers);
  s.model.d_ff = integer("d_ff", 0);
  if (sc.contains("dropout")) s.model.dropout = get_num(sc["dropout"], w, "dropout");
  s.model.attention = str("attention", "eager") == "flash" ? graph::Attention::flash : graph::Attention::eager;
  if (sc.contains("tie_embeddings")) {
    if (!sc["tie_embeddings"].is_boolean()) w.fail(fmt::format("header: tie_embeddings must be true or false, got {}", sc["tie_embeddings"].dump()));
    s.model.tie_embeddings = sc["tie_embeddings"].get<bool>() ? 1 : 0;
  }
  if (sc.contains("rope_theta")) s.model.rope_theta = get_num(sc["rope_theta"], w, "rope_theta");
  s.training.batch_size = integer("batch_size", s.training.batch_size);
  if (sc.contains("dtype")) s.training.dtype = get_dtype(sc["dtype"], w);
  graph::ProfileId p;
  const std::string prof = str("profile", "torch-cuda");
  if (!graph::parse_profile(prof, p)) w.fail(fmt::format("header: unknown profile \"{}\"", prof));
  s.profile = p;
  s.step.graph.alloc_granularity = graph::profile(p).alloc_granularity;
  s.device = str("device", "");
}

void need_fields(const json& r, const Where& lw, const std::string& type, size_t n) {
  if (r.size() != n) lw.fail(fmt::format("a {} record has {} fields, got {}", type, n, r.size()));
}

// One pass over a schedule file's records, in order: header, storages, tensors, ops, entries, end.
struct Reader {
  const std::string& path;
  int64_t& cur_line;                       // the line being read, for nlohmann's own exceptions
  Schedule s;
  size_t n_st = 0, n_t = 0, n_ops = 0, n_entries = 0;  // header.counts
  std::vector<graph::Storage> storages;
  std::vector<RawTensor> tensors;
  std::vector<Op> ops;
  std::vector<int64_t> op_line;            // [ops] line of each op record
  int64_t end_count = -1, end_line = 0;

  Schedule read(const std::string& text);
  json header(std::string_view first_line);  // checks the header; sets the counts
  void storage(const json& r, const Where& lw);
  void tensor(const json& r, const Where& lw, int64_t line_no);
  void op(const json& r, const Where& lw, int64_t line_no);
  void entry(const json& r, const Where& lw, const std::string& type, int64_t line_no, bool in_entries);
  void end(const json& r, const Where& lw, int64_t line_no, bool in_entries);
  // Each tensor produced by at most one op; every tensor an op reads, saves, holds or releases
  // exists before the step or comes from an earlier op.
  void check_dataflow() const;
  // The header's tensors, the Graph, its roles and op contracts, the entries' validation, counts.
  void build(const json& h);
};

Schedule Reader::read(const std::string& text) {
  std::vector<std::string_view> lines;
  for (size_t pos = 0; pos < text.size();) {
    size_t nl = text.find('\n', pos);
    if (nl == std::string::npos) nl = text.size();
    lines.emplace_back(text.data() + pos, nl - pos);
    pos = nl + 1;
  }
  if (lines.empty()) throw InputError(fmt::format("{}: empty schedule file", path));

  s.source = path;
  const json h = header(lines[0]);
  size_t li = 1;
  bool ended = false;
  // Records in order: storages, tensors, ops, entries, then ["end", n].
  for (; li < lines.size() && !ended; ++li) {
    const int64_t line_no = static_cast<int64_t>(li) + 1;
    cur_line = line_no;
    const bool in_entries = storages.size() == n_st && tensors.size() == n_t && ops.size() == n_ops;
    Where lw{path, line_no, in_entries ? static_cast<int64_t>(s.entries.size()) + 1 : 0};
    if (lines[li].empty()) {
      if (li + 1 == lines.size()) break;
      lw.fail("empty line");
    }
    json r = json::parse(lines[li], nullptr, false);
    if (r.is_discarded()) {
      lw.fail(li + 1 == lines.size() ? "truncated record (the file ends in the middle of a line)"
                                     : "malformed JSON record");
    }
    if (!r.is_array() || r.empty() || !r[0].is_string()) lw.fail("a record must be an array starting with its type");
    const std::string type = r[0];
    if (type == "storage") {
      storage(r, lw);
    } else if (type == "tensor") {
      tensor(r, lw, line_no);
    } else if (type == "op") {
      op(r, lw, line_no);
    } else if (type == "end") {
      end(r, lw, line_no, in_entries);
      ended = true;
    } else {
      entry(r, lw, type, line_no, in_entries);
    }
  }
  if (!ended) {
    throw InputError(fmt::format(
        "{}:{}: truncated schedule: it ends after entry {} of {} ({} of {} storages, {} of {} tensors, {} of {} ops) "
        "without its end record",
        path, lines.size(), s.entries.size(), n_entries, storages.size(), n_st, tensors.size(), n_t, ops.size(), n_ops));
  }
  for (; li < lines.size(); ++li) {
    if (!lines[li].empty()) Where{path, static_cast<int64_t>(li) + 1}.fail("text after the end record");
  }

  check_dataflow();
  build(h);
  return std::move(s);
}

json Reader::header(std::string_view first_line) {
  Where w{path, 1};
  json h = json::parse(first_line, nullptr, false);
  if (h.is_discarded() || !h.is_object()) w.fail("not a schedule: the first line must be the JSON header object");
  if (!h.contains("format") || h["format"] != "actsim-schedule") w.fail("not a schedule: header.format is not \"actsim-schedule\"");
  if (!h.contains("version") || h["version"] != kFormatVersion) {
    w.fail(fmt::format("unsupported schedule version {} (this actsim reads {})",
                       h.contains("version") ? h["version"].dump() : "none", kFormatVersion));
  }
  for (const char* k : {"counts", "params", "param_grads", "loss"}) {
    if (!h.contains(k)) w.fail(fmt::format("header: missing \"{}\"", k));
  }
  const json& c = h["counts"];
  for (const char* k : {"storages", "tensors", "ops", "entries"}) {
    if (!c.contains(k) || !c[k].is_number_unsigned()) w.fail(fmt::format("header: counts.{} must be a count", k));
  }
  n_st = c["storages"], n_t = c["tensors"], n_ops = c["ops"], n_entries = c["entries"];
  if (h.contains("scenario")) read_scenario(h["scenario"], w, s);
  if (h.contains("simulated")) {
    const json& sim = h["simulated"];
    if (sim.contains("peak_bytes")) s.simulated_peak_bytes = get_int(sim["peak_bytes"], w, "peak_bytes");
    if (sim.contains("live_step_start")) s.simulated_live_step_start = get_int(sim["live_step_start"], w, "live_step_start");
    if (sim.contains("step_time_ns")) s.simulated_step_time_ns = get_int(sim["step_time_ns"], w, "step_time_ns");
  }
  return h;
}

void Reader::storage(const json& r, const Where& lw) {
  auto need = [&](size_t n) { need_fields(r, lw, "storage", n); };
  need(7);
  if (storages.size() >= n_st) lw.fail(fmt::format("more storages than header.counts.storages = {}", n_st));
  if (get_int(r[1], lw, "storage id") != static_cast<int64_t>(storages.size())) {
    lw.fail(fmt::format("storage records must be numbered in order: expected {}", storages.size()));
  }
  graph::Storage st;
  st.bytes = get_int(r[2], lw, "bytes");
  if (st.bytes < 0) lw.fail("negative storage size");
  st.category = get_category(r[3], lw);
  const std::string loc = get_str(r[4], lw, "location");
  if (loc != "device" && loc != "host") lw.fail(fmt::format("unknown location \"{}\"", loc));
  st.location = loc == "host" ? Location::host : Location::device;
  st.layer = static_cast<int32_t>(get_int(r[5], lw, "layer"));
  if (st.layer < -1) lw.fail(fmt::format("storage layer {} (blocks count from 0; -1 = outside)", st.layer));
  st.keep = get_int(r[6], lw, "keep") != 0;
  storages.push_back(st);
}

void Reader::tensor(const json& r, const Where& lw, int64_t line_no) {
  auto need = [&](size_t n) { need_fields(r, lw, "tensor", n); };
  need(10);
  if (storages.size() != n_st) lw.fail(fmt::format("tensor record before all {} storages", n_st));
  if (tensors.size() >= n_t) lw.fail(fmt::format("more tensors than header.counts.tensors = {}", n_t));
  if (get_int(r[1], lw, "tensor id") != static_cast<int64_t>(tensors.size())) {
    lw.fail(fmt::format("tensor records must be numbered in order: expected {}", tensors.size()));
  }
  graph::Tensor t;
  t.name = get_str(r[2], lw, "name");
  t.shape = get_ints(r[3], lw, "shape");
  t.strides = get_ints(r[4], lw, "strides");
  t.offset = get_int(r[5], lw, "offset");
  t.dtype = get_dtype(r[6], lw);
  const int64_t sid = get_int(r[7], lw, "storage");
  if (sid < 0 || static_cast<size_t>(sid) >= n_st) lw.fail(fmt::format("tensor {}: unknown storage {}", t.name, sid));
  t.storage = StorageId{static_cast<uint32_t>(sid)};
  t.is_view = get_int(r[8], lw, "is_view") != 0;
  t.requires_grad = get_int(r[9], lw, "requires_grad") != 0;
  if (t.shape.size() != t.strides.size()) lw.fail(fmt::format("tensor {}: shape and strides differ in rank", t.name));
  int64_t last = t.offset;
  if (t.offset < 0) lw.fail(fmt::format("tensor {}: negative offset", t.name));
  if (t.shape.size() > 64) lw.fail(fmt::format("tensor {}: rank {} (at most 64)", t.name, t.shape.size()));
  // Checked arithmetic: an extent times a stride that wraps around would pass the bounds check.
  bool wraps = false;
  int64_t numel = 1, end_byte = 0;
  for (size_t d = 0; d < t.shape.size(); ++d) {
    if (t.shape[d] < 0 || t.strides[d] < 0) lw.fail(fmt::format("tensor {}: negative extent or stride", t.name));
    int64_t span = 0;
    wraps = wraps || __builtin_mul_overflow(t.shape[d], numel, &numel);
    if (t.shape[d] > 0) wraps = wraps || __builtin_mul_overflow(t.shape[d] - 1, t.strides[d], &span) ||
                                __builtin_add_overflow(last, span, &last);
  }
  wraps = wraps || __builtin_add_overflow(last, 1, &end_byte) ||
          __builtin_mul_overflow(end_byte, graph::dtype_size(t.dtype), &end_byte);
  if (wraps) lw.fail(fmt::format("tensor {}: its extents, strides and offset overflow int64", t.name));
  if (numel > 0 && end_byte > storages[sid].bytes) {
    lw.fail(fmt::format("tensor {} {} overruns its storage {} of {} bytes", t.name, graph::shape_string(t.shape),
                        sid, storages[sid].bytes));
  }
  tensors.push_back({std::move(t), line_no});
}

void Reader::op(const json& r, const Where& lw, int64_t line_no) {
  auto need = [&](size_t n) { need_fields(r, lw, "op", n); };
  need(3);
  if (tensors.size() != n_t) lw.fail(fmt::format("op record before all {} tensors", n_t));
  if (ops.size() >= n_ops) lw.fail(fmt::format("more ops than header.counts.ops = {}", n_ops));
  if (get_int(r[1], lw, "op id") != static_cast<int64_t>(ops.size())) {
    lw.fail(fmt::format("op records must be numbered in order: expected {}", ops.size()));
  }
  const json& o = r[2];
  if (!o.is_object()) lw.fail("an op record's third field must be an object");
  for (const char* k : {"kind", "name", "phase"}) {
    if (!o.contains(k)) lw.fail(fmt::format("op {}: missing \"{}\"", ops.size(), k));
  }
  Op op;
  const std::string kind = get_str(o["kind"], lw, "kind");
  if (!graph::parse_op_kind(kind, op.kind)) lw.fail(fmt::format("op {}: unknown op kind \"{}\"", ops.size(), kind));
  op.name = get_str(o["name"], lw, "name");
  const std::string ctx = fmt::format("op {} ({})", ops.size(), op.name);
  op.phase = get_phase(o["phase"], lw);
  if (o.contains("layer")) op.layer = static_cast<int32_t>(get_int(o["layer"], lw, "layer"));
  if (op.layer < -1) lw.fail(fmt::format("op {}: layer {} (blocks count from 0; -1 = outside)", ops.size(), op.layer));
  op.inputs = get_tensors(o, "inputs", n_t, lw, ctx);
  op.outputs = get_tensors(o, "outputs", n_t, lw, ctx);
  op.saved = get_tensors(o, "saved", n_t, lw, ctx);
  op.holds = get_tensors(o, "holds", n_t, lw, ctx);
  op.releases = get_tensors(o, "releases", n_t, lw, ctx);
  op.grad_outputs = get_tensors(o, "grad_outputs", n_t, lw, ctx);
  if (o.contains("workspace_bytes")) op.workspace_bytes = get_int(o["workspace_bytes"], lw, "workspace_bytes");
  if (op.workspace_bytes < 0) lw.fail(ctx + ": negative workspace_bytes");
  if (o.contains("flops")) op.flops = get_num(o["flops"], lw, "flops");
  if (o.contains("bytes_moved")) op.bytes_moved = get_int(o["bytes_moved"], lw, "bytes_moved");
  if (o.contains("kernels")) op.kernels = static_cast<int32_t>(get_int(o["kernels"], lw, "kernels"));
  if (op.kernels < 0 || op.bytes_moved < 0 || !(op.flops >= 0 && op.flops < 1e30)) lw.fail(ctx + ": negative or non-finite cost");
  if (o.contains("forward")) {
    const int64_t f = get_int(o["forward"], lw, "forward");
    if (f < 0 || f >= static_cast<int64_t>(ops.size())) lw.fail(fmt::format("{}: unknown forward op {}", ctx, f));
    op.forward = OpId{static_cast<uint32_t>(f)};
  }
  auto small = [&](int64_t v, int64_t lo, int64_t hi, const char* what) {
    if (v < lo || v > hi) lw.fail(fmt::format("{}: {} = {} is out of range [{}, {}]", ctx, what, v, lo, hi));
    return v;
  };
  if (o.contains("grad_of")) {
    for (int64_t v : get_ints(o["grad_of"], lw, "grad_of")) op.grad_of.push_back(static_cast<int8_t>(small(v, 0, 127, "grad_of")));
  }
  if (o.contains("grad_in_of")) {
    for (int64_t v : get_ints(o["grad_in_of"], lw, "grad_in_of")) op.grad_in_of.push_back(static_cast<int8_t>(small(v, 0, 127, "grad_in_of")));
  }
  if (o.contains("n_grad_inputs")) op.n_grad_inputs = static_cast<int8_t>(small(get_int(o["n_grad_inputs"], lw, "n_grad_inputs"), 0, 127, "n_grad_inputs"));
  if (op.grad_of.size() != op.grad_outputs.size()) lw.fail(ctx + ": grad_of and grad_outputs differ in length");
  if (op.n_grad_inputs < 0 || static_cast<size_t>(op.n_grad_inputs) > op.inputs.size() ||
      op.grad_in_of.size() != static_cast<size_t>(op.n_grad_inputs)) {
    lw.fail(ctx + ": n_grad_inputs does not match inputs / grad_in_of");
  }
  if (op.kind == OpKind::backward && op.forward == graph::kNoOp) lw.fail(ctx + ": a backward op needs \"forward\"");
  if (op.forward != graph::kNoOp) {
    const Op& f = ops[index(op.forward)];
    for (int8_t k : op.grad_of) {
      if (k < 0 || static_cast<size_t>(k) >= f.inputs.size()) {
        lw.fail(fmt::format("{}: grad_of names input {} of op {}, which has {}", ctx, k, index(op.forward), f.inputs.size()));
      }
    }
    for (int8_t k : op.grad_in_of) {
      if (k < 0 || static_cast<size_t>(k) >= f.outputs.size()) {
        lw.fail(fmt::format("{}: grad_in_of names output {} of op {}, which has {}", ctx, k, index(op.forward), f.outputs.size()));
      }
    }
  }
  if (o.contains("stream")) op.stream = static_cast<int32_t>(small(get_int(o["stream"], lw, "stream"), 0, 1, "stream"));
  if (op.stream < 0) lw.fail(ctx + ": negative stream");
  if (o.contains("after")) {
    for (int64_t a : get_ints(o["after"], lw, "after")) {
      if (a < 0 || a >= static_cast<int64_t>(ops.size())) lw.fail(fmt::format("{}: \"after\" names op {}, which is not an earlier op", ctx, a));
      op.after.push_back(OpId{static_cast<uint32_t>(a)});
    }
  }
  if (o.contains("region")) op.region = static_cast<int32_t>(get_int(o["region"], lw, "region"));
  auto flag = [&](const char* k) { return o.contains(k) && o[k].is_boolean() && o[k].get<bool>(); };
  op.cached = flag("cached");
  op.offload = flag("offload");
  op.recompute = flag("recompute");
  if (o.contains("params")) {
    const json& p = o["params"];
    if (!p.is_object()) lw.fail(ctx + ": params must be an object");
    graph::OpParams& q = op.params;
    if (p.contains("view")) q.view = static_cast<graph::ViewKind>(get_name(p["view"], kViewNames, lw, "view kind"));
    if (p.contains("dim0")) q.dim0 = static_cast<int16_t>(small(get_int(p["dim0"], lw, "dim0"), 0, 64, "dim0"));
    if (p.contains("dim1")) q.dim1 = static_cast<int16_t>(small(get_int(p["dim1"], lw, "dim1"), 0, 64, "dim1"));
    if (p.contains("start")) q.start = get_int(p["start"], lw, "start");
    if (p.contains("step")) q.step = get_int(p["step"], lw, "step");
    if (p.contains("scalar")) q.scalar = get_num(p["scalar"], lw, "scalar");
    if (p.contains("optim")) {
      const json& oj = p["optim"];
      if (!oj.is_object()) lw.fail(ctx + ": params.optim must be an object");
      graph::OptimParams& op2 = q.optim;
      if (oj.contains("step")) op2.step = static_cast<graph::OptimStep>(get_name(oj["step"], kOptimNames, lw, "optimizer step"));
      if (oj.contains("full")) op2.full = oj["full"].is_boolean() && oj["full"].get<bool>();
      if (oj.contains("decoupled")) op2.decoupled = oj["decoupled"].is_boolean() && oj["decoupled"].get<bool>();
      for (auto [k, dst] : {std::pair<const char*, double*>{"lr", &op2.lr}, {"beta1", &op2.beta1},
                            {"beta2", &op2.beta2}, {"eps", &op2.eps}, {"weight_decay", &op2.weight_decay},
                            {"momentum", &op2.momentum}}) {
        if (oj.contains(k)) *dst = get_num(oj[k], lw, k);
      }
    }
  }
  ops.push_back(std::move(op));
  op_line.push_back(line_no);
}

void Reader::end(const json& r, const Where& lw, int64_t line_no, bool in_entries) {
  auto need = [&](size_t n) { need_fields(r, lw, "end", n); };
  need(2);
  if (!in_entries) lw.fail("end record before all storages, tensors and ops");
  end_count = get_int(r[1], lw, "entry count");
  end_line = line_no;
}

void Reader::entry(const json& r, const Where& lw, const std::string& type, int64_t line_no, bool in_entries) {
  auto need = [&](size_t n) { need_fields(r, lw, type, n); };
  size_t ki = kEntryNames.size();
  for (size_t k = 0; k < kEntryNames.size(); ++k) {
    if (kEntryNames[k] == type) ki = k;
  }
  if (ki == kEntryNames.size()) lw.fail(fmt::format("unknown record type \"{}\"", type));
  if (!in_entries) {
    lw.fail(fmt::format("{} entry before all {} storages, {} tensors and {} ops", type, n_st, n_t, n_ops));
  }
  ScheduleEntry e{.kind = static_cast<Kind>(ki)};
  const int64_t id = r.size() > 1 ? get_int(r[1], lw, "id") : -1;
  switch (e.kind) {
    case Kind::alloc:
      need(7);
      if (id < 0 || static_cast<size_t>(id) >= n_st) lw.fail(fmt::format("alloc of unknown storage {}", id));
      e.bytes = get_int(r[2], lw, "bytes");
      get_category(r[3], lw);
      get_dtype(r[4], lw);
      e.live = get_int(r[5], lw, "live");
      e.time_ns = get_int(r[6], lw, "time_ns");
      break;
    case Kind::run:
      need(4);
      if (id < 0 || static_cast<size_t>(id) >= n_ops) lw.fail(fmt::format("run of unknown op {}", id));
      e.time_ns = get_int(r[2], lw, "time_ns");
      e.duration_ns = get_int(r[3], lw, "duration_ns");
      break;
    case Kind::free:
      need(4);
      if (id < 0 || static_cast<size_t>(id) >= n_st) lw.fail(fmt::format("free of unknown storage {}", id));
      e.live = get_int(r[2], lw, "live");
      e.time_ns = get_int(r[3], lw, "time_ns");
      break;
    case Kind::ws_alloc:
    case Kind::ws_free:
      need(5);
      if (id < 0 || static_cast<size_t>(id) >= n_ops) lw.fail(fmt::format("{} of unknown op {}", type, id));
      e.bytes = get_int(r[2], lw, "bytes");
      e.live = get_int(r[3], lw, "live");
      e.time_ns = get_int(r[4], lw, "time_ns");
      break;
  }
  e.id = static_cast<uint32_t>(id);
  s.entries.push_back(e);
  s.entry_line.push_back(line_no);
}

void Reader::check_dataflow() const {
  std::vector<int64_t> producer(n_t, -1);
  for (size_t i = 0; i < ops.size(); ++i) {
    const Where lw{path, op_line[i]};
    for (TensorId t : ops[i].outputs) {
      if (producer[index(t)] >= 0) {
        lw.fail(fmt::format("op {} ({}): tensor {} ({}) is already produced by op {}", i, ops[i].name, index(t),
                            tensors[index(t)].t.name, producer[index(t)]));
      }
      producer[index(t)] = static_cast<int64_t>(i);
    }
  }
  for (size_t i = 0; i < ops.size(); ++i) {
    const Where lw{path, op_line[i]};
    for (const auto* list : {&ops[i].inputs, &ops[i].holds, &ops[i].saved, &ops[i].releases}) {
      for (TensorId t : *list) {
        const int64_t p = producer[index(t)];
        if (p < 0 || p < static_cast<int64_t>(i) || (list == &ops[i].saved && p == static_cast<int64_t>(i))) continue;
        lw.fail(fmt::format("op {} ({}) uses tensor {} ({}) before op {} produces it", i, ops[i].name, index(t),
                            tensors[index(t)].t.name, p));
      }
    }
  }
}

void Reader::build(const json& h) {
  const Where hw{path, 1};
  auto header_tensor = [&](const json& j, const char* what) {
    const int64_t t = get_int(j, hw, what);
    if (t == -1) return graph::kNoTensor;
    if (t < 0 || static_cast<size_t>(t) >= n_t) hw.fail(fmt::format("header: {}: unknown tensor {}", what, t));
    return TensorId{static_cast<uint32_t>(t)};
  };
  if (!h["params"].is_array() || !h["param_grads"].is_array() || h["params"].size() != h["param_grads"].size()) {
    hw.fail("header: params and param_grads must be arrays of the same length");
  }
  for (const json& j : h["params"]) s.step.params.push_back(header_tensor(j, "params"));
  for (const json& j : h["param_grads"]) s.step.param_grads.push_back(header_tensor(j, "param_grads"));
  s.step.loss = header_tensor(h["loss"], "loss");
  if (s.step.loss == graph::kNoTensor) hw.fail("header: the schedule has no loss tensor");

  Graph& g = s.step.graph;
  for (const graph::Storage& st : storages) g.add_storage(st);
  for (RawTensor& t : tensors) g.add_tensor(std::move(t.t));
  for (Op& op : ops) g.add_op(std::move(op));
  // add_op attributes a storage to its producer's layer; keep the file's attribution.
  for (size_t i = 0; i < storages.size(); ++i) g.mutable_storage(StorageId{static_cast<uint32_t>(i)}).layer = storages[i].layer;
  if (h.contains("n_layers")) g.n_layers = static_cast<int32_t>(get_int(h["n_layers"], hw, "n_layers"));
  g.freeze();
  if (g.n_layers < 0) hw.fail("header: negative n_layers");
  for (size_t i = 0; i < g.n_ops(); ++i) {
    const graph::OpId id{static_cast<uint32_t>(i)};
    const Op& op = g.op(id);
    if (op.layer >= g.n_layers && g.n_layers > 0) Where{path, op_line[i]}.fail(fmt::format("op {} ({}): layer {} of {}", i, op.name, op.layer, g.n_layers));
    const std::string why = op_contract_error(g, id);
    if (!why.empty()) Where{path, op_line[i]}.fail(fmt::format("op {} ({}): {}", i, op.name, why));
  }
  for (const graph::Storage& st : g.storages()) {
    if (st.layer >= g.n_layers && g.n_layers > 0) hw.fail(fmt::format("a storage of layer {}, but n_layers is {}", st.layer, g.n_layers));
  }
  // Roles: parameters, buffers, optimizer state and inputs exist before the step.
  for (size_t i = 0; i < g.storages().size(); ++i) {
    const graph::Storage& st = g.storages()[i];
    const bool before = st.producer == graph::kNoOp;
    const bool persistent_kind = st.category == Category::parameter || st.category == Category::buffer ||
                                 st.category == Category::optimizer_state || st.category == Category::input;
    if (persistent_kind && !before) {
      hw.fail(fmt::format("storage {} ({}) is {} but op {} allocates it; such storages exist before the step", i,
                          storage_name(g, static_cast<uint32_t>(i)), to_string(st.category), index(st.producer)));
    }
  }
  for (TensorId p : s.step.params) {
    if (g.storage(g.tensor(p).storage).category != Category::parameter) {
      hw.fail(fmt::format("header: params: tensor {} ({}) is not a parameter", index(p), g.tensor(p).name));
    }
  }
  validate_schedule(s);
  // Counts last: a double free or a read after free in an edited file is the more useful message.
  if (end_count != static_cast<int64_t>(s.entries.size()) || s.entries.size() != n_entries) {
    Where{path, end_line}.fail(fmt::format("the end record says {} entries, header.counts.entries {}, the file has {}",
                                           end_count, n_entries, s.entries.size()));
  }
}

}  // namespace

Schedule parse_schedule(const std::string& path) { return parse_schedule_text(util::read_input_file(path, "schedule"), path); }

Schedule parse_schedule_text(const std::string& text, const std::string& path) {
  // nlohmann's own exceptions (a type or range surprise this reader did not check first) are
  // still bad input: one line naming the file.
  int64_t line = 1;
  try {
    return Reader{path, line}.read(text);
  } catch (const json::exception& e) {
    throw InputError(fmt::format("{}:{}: malformed schedule ({})", path, line, e.what()));
  }
}

}  // namespace actsim::schedule
