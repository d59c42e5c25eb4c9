// Block stamping (issue 9): a long run of identical blocks is lowered once and stamped.
#include "actsim/graph/lower.hpp"

#include <fmt/format.h>

#include <charconv>

#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

// Note [Block stamping]
// A 48-block model's step graph is 48 copies of one block's forward, backward, recompute and
// optimizer ops, held together by a few ops outside the blocks (embedding, head, loss, zero_grad).
// Lowering and differentiating every copy is most of a simulation's time. So a run of n >= 6
// consecutive blocks with one checkpoint mode is lowered as five (kContext = 2 blocks on each side
// of a middle one), and the middle block's entities are stamped out n - 4 times.
//
// Every op and storage carries its block (`layer`, -1 outside blocks); a tensor belongs to its
// producer's block, or to its storage's when it exists before the step. Each of the three id
// sequences (ops, tensors, storages) is copied in order; a maximal run of consecutive entities of
// the middle block is emitted once per copy, in place, which is the order in which the lowering's
// per-block loops emit them (forward ascending, backward descending within each run, optimizer
// per parameter). A reference from an entity of block b to an entity of block b + d refers, in
// copy j, to block b + j + d: within a copy, to the copy's own entity; across copies, to the
// entity at the same position (k-th op, tensor or storage of that block) in the neighbouring copy.
// References from outside the blocks to the middle block appear only in lists (the parameters,
// zero_grad's releases, the optimizer's lists), and such a list is expanded the same way.
// Checkpoint regions and names ("blocks.7.attn") follow the same shift.
//
// This holds when a block's structure depends only on its own mode and its neighbours' within
// kContext, and when nothing outside the blocks sums over them (tensor parallelism's collectives
// are per block: stamped). Data and pipeline parallelism (buckets, flat partitions and stages span
// blocks), trainable subsets (frozen patterns may name blocks; LoRA's adapters do not repeat),
// master weights (one flat buffer), fp16's GradScaler (its unscale op counts every gradient's
// elements), reentrant checkpointing, offload (its prefetches reach further), nested recompute
// schedules and segments spanning blocks are lowered block by block.
//
// Autograd does not keep to block boundaries: the accumulation of block b's input gradient runs
// inside block b + 1's backward, tagged b. So a run is grouped by its `home`, the stretch it sits
// in (Numbering::number); what matters is that the grouping repeats from block to block, which
// the checks test as the stamp goes: a reference between blocks further apart than kContext (a
// pipeline stage's last block holds the optimizer's lists over every block), or a count, kind,
// shape or size that differs between a block and the one a reference is moved to, makes it give
// up, and the step is lowered in full. tests/test_stamp.cpp checks the stamped graph against the full
// lowering, field by field, across families, modes and runs of modes, optimizers, profiles,
// dtypes, autocast and accumulation.

namespace actsim::graph {

namespace {

constexpr int32_t kContext = 2;                    // blocks kept on each side of a stamped one
constexpr int64_t kMinRun = 2 * kContext + 2;      // the shortest run worth stamping
constexpr int32_t kRegionShift = 20;               // Lowering's region bases are multiples of 1 << 20

struct Fail {};                                    // the stamp cannot place something: lower in full

bool eligible(const ModelConfig& m, const TrainingConfig& t, const BlockPlan* plan) {
  const ParallelConfig& p = t.parallel;
  if (m.family != Family::gpt2 && m.family != Family::llama) return false;
  if (p.dp != 1 || p.pp != 1 || p.pp_stage()) return false;
  if (t.trainable.mode != Trainable::all || t.master_weights != MasterWeights::none) return false;
  if (t.autocast == DType::f16) return false;
  if (t.checkpoint_impl == CheckpointImpl::reentrant) return false;  // its backward recomputes across blocks
  if (m.n_layers < kMinRun) return false;
  if (plan) {
    if (!plan->before_backward.empty()) return false;
    for (BlockMode b : plan->mode) {
      if (b == BlockMode::offload) return false;   // its copies and prefetches reach across blocks
    }
    std::unordered_map<int32_t, int> seen;
    for (size_t i = 0; i < plan->mode.size(); ++i) {
      if (plan->mode[i] == BlockMode::recompute && ++seen[plan->segment[i]] > 1) return false;
    }
  }
  return true;
}

// Which compressed block stands for which blocks of the model.
struct Layers {
  std::vector<int32_t> first, copies;              // [compressed block] its first block, how many it stands for
  std::vector<int32_t> comp, copy;                 // [block] its compressed block and copy
};

// Whether the blocks around positions [begin, end) of a sequence, all of block u, go downwards
// (backward): the nearest other block before them is a later one, or the nearest after an earlier
// one. `block(i)` is position i's block, -1 outside the blocks.
template <typename BlockAt>
bool downwards(size_t begin, size_t end, size_t n, int32_t u, BlockAt block) {
  for (size_t y = begin; y-- > 0;) {
    if (const int32_t b = block(y); b >= 0 && b != u) return b > u;
  }
  for (size_t y = end; y < n; ++y) {
    if (const int32_t b = block(y); b >= 0 && b != u) return b < u;
  }
  return false;
}

// The entities of one kind (ops, tensors or storages) of the compressed graph, numbered for the
// stamped one.
struct Numbering {
  std::vector<int32_t> tag;                        // [entity] compressed block, -1 outside blocks
  // [entity] the block whose stretch of the sequence it sits in: its own, except for a short run
  // inside another block's stretch (autograd's accumulation of block b's input gradient runs in
  // block b + 1's backward, tagged b).
  std::vector<int32_t> home;
  std::vector<uint32_t> pos;                       // [entity] index among its block's entities
  std::vector<std::vector<uint32_t>> members;      // [compressed block] its entities, in order
  std::vector<uint32_t> new0;                      // [entity] stamped id of copy 0
  std::vector<int32_t> stride;                     // [entity] ids from one copy to the next (< 0: backward)
  struct Run {
    uint32_t begin, end;
    int32_t copies;
    bool descending;                               // emitted last block first (backward)
  };
  std::vector<Run> runs;                           // the compressed sequence, in emission order
  uint32_t total = 0;

  void number(const Layers& l) {
    const size_t n = tag.size();
    home = tag;
    for (size_t x = 0; x < n;) {
      size_t e = x + 1;
      while (e < n && tag[e] == tag[x]) ++e;
      // A stretch of its own lies between its neighbours (blocks go up in forward, down in
      // backward); a run that does not belongs to the stretch it precedes.
      const int32_t t = tag[x];
      if (t >= 0 && x > 0 && e < n && tag[x - 1] >= 0 && tag[e] >= 0) {
        const int32_t p = tag[x - 1], q = tag[e];
        if (!((p < t && t < q) || (p > t && t > q))) {
          for (size_t y = x; y < e; ++y) home[y] = q;
        }
      }
      x = e;
    }
    pos.resize(n);
    members.assign(l.first.size(), {});
    new0.resize(n);
    stride.assign(n, 0);
    for (size_t x = 0; x < n; ++x) {
      if (home[x] < 0) continue;
      auto& m = members[static_cast<size_t>(home[x])];
      pos[x] = static_cast<uint32_t>(m.size());
      m.push_back(static_cast<uint32_t>(x));
    }
    for (uint32_t x = 0; x < n;) {
      const int32_t u = home[x];
      uint32_t e = x + 1;
      const int32_t k = u >= 0 ? l.copies[static_cast<size_t>(u)] : 1;
      if (k > 1) {
        while (e < n && home[e] == u) ++e;
      }
      const bool down = k > 1 && downwards(x, e, n, u, [&](size_t y) { return home[y]; });
      const auto len = static_cast<int32_t>(e - x);
      for (uint32_t y = x; y < e; ++y) {
        new0[y] = total + (y - x) + (down ? static_cast<uint32_t>((k - 1) * len) : 0);
        stride[y] = k == 1 ? 0 : down ? -len : len;
      }
      runs.push_back({x, e, k, down});
      total += (e - x) * static_cast<uint32_t>(k);
      x = e;
    }
  }
};

class Stamper {
 public:
  Stamper(const StepGraph& c, const Layers& l, const BlockPlan* plan) : c_(c), g_(c.graph), l_(l), plan_(plan) {
    const auto n_ops = g_.ops().size(), n_tensors = g_.tensors().size(), n_storages = g_.storages().size();
    ops_.tag.resize(n_ops);
    for (size_t i = 0; i < n_ops; ++i) ops_.tag[i] = g_.ops()[i].layer;
    storages_.tag.resize(n_storages);
    for (size_t i = 0; i < n_storages; ++i) storages_.tag[i] = g_.storages()[i].layer;
    tensors_.tag.resize(n_tensors);
    for (size_t i = 0; i < n_tensors; ++i) {
      const Tensor& t = g_.tensors()[i];
      tensors_.tag[i] = t.producer != kNoOp ? g_.op(t.producer).layer : g_.storage(t.storage).layer;
    }
    ops_.number(l);
    tensors_.number(l);
    storages_.number(l);
  }

  StepGraph run(int32_t n_layers) {
    StepGraph out;
    Graph& g = out.graph;
    g.n_layers = n_layers;
    g.alloc_granularity = g_.alloc_granularity;
    g.micro_batches = g_.micro_batches;
    for (const Numbering::Run& r : storages_.runs) {
      for (int32_t c = 0; c < r.copies; ++c) {
        const int32_t j = r.descending ? r.copies - 1 - c : c;
        for (uint32_t x = r.begin; x < r.end; ++x) g.add_storage(storage(x, j));
      }
    }
    for (const Numbering::Run& r : tensors_.runs) {
      for (int32_t c = 0; c < r.copies; ++c) {
        const int32_t j = r.descending ? r.copies - 1 - c : c;
        for (uint32_t x = r.begin; x < r.end; ++x) g.add_tensor(tensor(x, j));
      }
    }
    for (const Numbering::Run& r : ops_.runs) {
      for (int32_t c = 0; c < r.copies; ++c) {
        const int32_t j = r.descending ? r.copies - 1 - c : c;
        for (uint32_t x = r.begin; x < r.end; ++x) g.add_op(op(x, j));
      }
    }
    auto op_at = [&](OpId o) {
      if (o == kNoOp) return o;
      if (index(o) == g_.n_ops()) return OpId{ops_.total};
      if (ops_.stride[index(o)] != 0) throw Fail{};
      return OpId{ops_.new0[index(o)]};
    };
    g.last_micro_batch = op_at(g_.last_micro_batch);
    g.after_micro_batches = op_at(g_.after_micro_batches);
    // The parameters and their gradients, expanded together (a frozen parameter has no gradient).
    for (size_t i = 0; i < c_.params.size();) {
      const int32_t u = tensors_.home[index(c_.params[i])];
      const int32_t k = u >= 0 ? l_.copies[static_cast<size_t>(u)] : 1;
      size_t e = i + 1;
      if (k > 1) {
        while (e < c_.params.size() && tensors_.home[index(c_.params[e])] == u) ++e;
      }
      for (int32_t j = 0; j < k; ++j) {
        const int32_t at = u >= 0 ? l_.first[static_cast<size_t>(u)] + j : -1;
        for (size_t y = i; y < e; ++y) {
          out.params.push_back(ref(tensors_, c_.params[y], u, at));
          out.param_grads.push_back(ref(tensors_, c_.param_grads[y], u, at));
        }
      }
      i = e;
    }
    out.loss = ref(tensors_, c_.loss, -1, -1);
    out.optimizer_impl = c_.optimizer_impl;
    return out;
  }

 private:
  // The stamped id of `x` (an op, tensor or storage id) referenced from an entity of compressed
  // block `from` (-1: outside the blocks) standing for block `at`.
  template <typename Id>
  Id ref(const Numbering& k, Id x, int32_t from, int32_t at) const {
    if (x == Id{0xffffffffu}) return x;
    const uint32_t ix = index(x);
    const int32_t tx = k.home[ix];
    if (tx < 0) return Id{k.new0[ix]};
    if (from < 0) {
      if (k.stride[ix] != 0) throw Fail{};      // outside a list, a block is referenced from outside the blocks
      return Id{k.new0[ix]};
    }
    // Blocks further apart than the context: not the local structure a stamp repeats (a list
    // over every block held by a block's op, say).
    if (tx - from > kContext || from - tx > kContext) throw Fail{};
    const int32_t target = at + (tx - from);
    if (target < 0 || target >= static_cast<int32_t>(l_.comp.size())) throw Fail{};
    const int32_t u = l_.comp[static_cast<size_t>(target)], j = l_.copy[static_cast<size_t>(target)];
    uint32_t y = ix;
    if (u != tx) {
      const auto& m = k.members[static_cast<size_t>(u)];
      if (k.pos[ix] >= m.size()) throw Fail{};
      y = m[k.pos[ix]];
      if (!same(x, Id{y})) throw Fail{};
    }
    return Id{static_cast<uint32_t>(static_cast<int64_t>(k.new0[y]) + static_cast<int64_t>(j) * k.stride[y])};
  }
  bool same(OpId a, OpId b) const { return g_.op(a).kind == g_.op(b).kind; }
  bool same(TensorId a, TensorId b) const { return g_.tensor(a).shape == g_.tensor(b).shape; }
  bool same(StorageId a, StorageId b) const { return g_.storage(a).bytes == g_.storage(b).bytes; }

  // A list of ids, in place: entry by entry from inside a block; from outside, a run of entries of
  // a stamped block is repeated once per copy.
  template <typename List>
  void refs(const Numbering& k, List& list, int32_t from, int32_t at) const {
    if (from >= 0) {
      for (auto& x : list) x = ref(k, x, from, at);
      return;
    }
    bool stamped = false;
    for (auto x : list) stamped |= index(x) != 0xffffffffu && k.stride[index(x)] != 0;
    if (!stamped) {
      for (auto& x : list) x = ref(k, x, from, at);
      return;
    }
    const List in = std::move(list);
    List& out = list;
    out.clear();
    for (size_t i = 0; i < in.size();) {
      const uint32_t ix = index(in[i]);
      const bool none = ix == 0xffffffffu;
      const int32_t u = none ? -1 : k.home[ix];
      if (u < 0 || l_.copies[static_cast<size_t>(u)] == 1) {
        out.push_back(ref(k, in[i], from, at));
        ++i;
        continue;
      }
      size_t e = i + 1;
      while (e < in.size() && index(in[e]) != 0xffffffffu && k.home[index(in[e])] == u) ++e;
      const bool down = downwards(i, e, in.size(), u, [&](size_t y) {  // the list's order around the run
        return index(in[y]) == 0xffffffffu ? -1 : k.home[index(in[y])];
      });
      const int32_t copies = l_.copies[static_cast<size_t>(u)];
      for (int32_t c = 0; c < copies; ++c) {
        const int32_t j = down ? copies - 1 - c : c;
        for (size_t y = i; y < e; ++y) out.push_back(ref(k, in[y], u, l_.first[static_cast<size_t>(u)] + j));
      }
      i = e;
    }
  }

  // "blocks.<b>." in a name of block `from`'s entity, renumbered for block `at`.
  void name(std::string& s, int32_t from, int32_t at) const {
    if (from < 0 || at == from || s.empty()) return;
    static constexpr std::string_view kBlocks = "blocks.";
    for (size_t p = s.find(kBlocks); p != std::string::npos; p = s.find(kBlocks, p + 1)) {
      const size_t q = p + kBlocks.size();
      size_t e = q;
      int32_t b = 0;
      while (e < s.size() && s[e] >= '0' && s[e] <= '9') b = b * 10 + (s[e++] - '0');
      if (e == q || e >= s.size() || s[e] != '.') continue;
      char digits[16];
      const auto r = std::to_chars(digits, digits + sizeof digits, at + (b - from));
      s.replace(q, e - q, digits, static_cast<size_t>(r.ptr - digits));  // in place: the name was just copied
    }
  }

  int32_t region(int32_t r, int32_t from, int32_t at) const {
    if (r < 0) return r;
    const int32_t base = (r >> kRegionShift) << kRegionShift;
    const int32_t v = r - base;                    // the region's block (a segment: its compressed block)
    int32_t b;
    if (from >= 0) b = at + (v - from);
    else if (v < static_cast<int32_t>(l_.copies.size()) && l_.copies[static_cast<size_t>(v)] == 1) b = l_.first[static_cast<size_t>(v)];
    else throw Fail{};
    if (b < 0 || b >= static_cast<int32_t>(l_.comp.size())) throw Fail{};
    if (base != 0) return base + b;
    if (!plan_) throw Fail{};
    return plan_->segment[static_cast<size_t>(b)];
  }

  // Copy j of entity x: its home block's block in the model (what references are resolved
  // against), and its own (its layer, names and regions).
  struct Place {
    int32_t home, at, tag, block;
  };
  Place place(const Numbering& k, uint32_t x, int32_t j) const {
    const int32_t h = k.home[x], t = k.tag[x];
    if (h < 0) return {-1, -1, -1, -1};
    const int32_t at = l_.first[static_cast<size_t>(h)] + j;
    return {h, at, t, at + (t - h)};
  }

  Storage storage(uint32_t x, int32_t j) const {
    Storage s = g_.storages()[x];
    const Place p = place(storages_, x, j);
    s.layer = p.block;
    s.producer = ref(ops_, s.producer, p.home, p.at);
    s.first = ref(tensors_, s.first, p.home, p.at);
    return s;
  }
  Tensor tensor(uint32_t x, int32_t j) const {
    Tensor t = g_.tensors()[x];
    const Place p = place(tensors_, x, j);
    t.storage = ref(storages_, t.storage, p.home, p.at);
    t.producer = kNoOp;                            // add_op sets it
    name(t.name, p.tag, p.block);
    return t;
  }
  Op op(uint32_t x, int32_t j) const {
    Op o = g_.ops()[x];
    const Place p = place(ops_, x, j);
    o.layer = p.block;
    name(o.name, p.tag, p.block);
    refs(tensors_, o.inputs, p.home, p.at);
    refs(tensors_, o.outputs, p.home, p.at);
    refs(tensors_, o.saved, p.home, p.at);
    refs(tensors_, o.holds, p.home, p.at);
    refs(tensors_, o.releases, p.home, p.at);
    refs(tensors_, o.grad_outputs, p.home, p.at);
    refs(ops_, o.after, p.home, p.at);
    o.forward = ref(ops_, o.forward, p.home, p.at);
    o.region = region(o.region, p.tag, p.block);
    return o;
  }

  const StepGraph& c_;
  const Graph& g_;
  const Layers& l_;
  const BlockPlan* plan_;
  Numbering ops_, tensors_, storages_;
};

}  // namespace

std::optional<StepGraph> lower_stamped(const ModelConfig& model, const TrainingConfig& training,
                                       const RuntimeProfile& prof, const BlockPlan* plan, LowerOptions options) {
  if (!eligible(model, training, plan)) return std::nullopt;
  const auto n = static_cast<int32_t>(model.n_layers);
  auto mode = [&](int32_t i) { return plan ? plan->mode[static_cast<size_t>(i)] : BlockMode::keep; };
  Layers l;
  l.comp.resize(static_cast<size_t>(n));
  l.copy.resize(static_cast<size_t>(n));
  BlockPlan small;
  auto add = [&](int32_t block, int32_t copies) {
    const auto u = static_cast<int32_t>(l.first.size());
    l.first.push_back(block);
    l.copies.push_back(copies);
    for (int32_t j = 0; j < copies; ++j) l.comp[static_cast<size_t>(block + j)] = u, l.copy[static_cast<size_t>(block + j)] = j;
    if (plan) {
      small.mode.push_back(mode(block));
      small.segment.push_back(mode(block) == BlockMode::recompute ? u : -1);
    }
  };
  for (int32_t i = 0; i < n;) {
    int32_t e = i + 1;
    while (e < n && mode(e) == mode(i)) ++e;
    if (e - i >= kMinRun) {
      for (int32_t b = i; b < i + kContext; ++b) add(b, 1);
      add(i + kContext, e - i - 2 * kContext);
      for (int32_t b = e - kContext; b < e; ++b) add(b, 1);
    } else {
      for (int32_t b = i; b < e; ++b) add(b, 1);
    }
    i = e;
  }
  if (l.first.size() == static_cast<size_t>(n)) return std::nullopt;  // no run long enough
  if (plan) small.keep_kinds = plan->keep_kinds;
  ModelConfig m = model;
  m.n_layers = static_cast<int64_t>(l.first.size());
  LowerOptions o = options;
  o.validate = false;
  o.stamp = false;
  const StepGraph c = lower_training_step(m, training, prof, plan ? &small : nullptr, o);
  try {
    StepGraph out = Stamper(c, l, plan).run(n);
    if (options.validate) out.graph.freeze();
    else out.graph.freeze_unchecked();
    return out;
  } catch (const Fail&) {
    return std::nullopt;
  }
}

}  // namespace actsim::graph
