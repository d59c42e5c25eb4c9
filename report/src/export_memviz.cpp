// PyTorch memory_viz snapshot: a pickle of {"segments": [...], "device_traces": [[...]]} in the
// shape torch.cuda.memory._snapshot() produces, written by our own minimal pickle writer.
//
// Note [Placement]: addresses come from first-fit placement of the simulated allocations into
// segments sized as PyTorch's caching allocator sizes them (blocks rounded to 512 B; requests up
// to 1 MiB from 2 MiB segments, up to 10 MiB from 20 MiB segments, larger ones rounded to 2 MiB).
// Unlike the caching allocator, a segment is released (segment_free) as soon as it is empty, as
// with PYTORCH_NO_CUDA_MEMORY_CACHING=1: reserved memory then tracks the simulated live bytes
// plus rounding and fragmentation, which is what the simulator models. Storages that exist before
// the step (parameters, optimizer state, inputs) are in the segments but not in the trace, as for
// a snapshot whose recording started at the beginning of the step; the viewer shows them as
// allocated before the trace.
#include <fmt/format.h>

#include <bit>
#include <cstring>
#include <limits>
#include <map>

#include "actsim/util/error.hpp"
#include "actsim/report/export.hpp"

namespace actsim::report {

using study::Analysis;
using graph::OpId;

using graph::Category;
using graph::index;

// ---- PickleWriter ----

namespace {
void put_le(std::string& out, uint64_t v, int n) {
  for (int i = 0; i < n; ++i) out += static_cast<char>((v >> (8 * i)) & 0xff);
}
}  // namespace

PickleWriter::PickleWriter() { out_ = "\x80\x02"; }  // PROTO 2

void PickleWriter::none() { out_ += 'N'; }
void PickleWriter::boolean(bool v) { out_ += v ? '\x88' : '\x89'; }  // NEWTRUE / NEWFALSE

void PickleWriter::integer(int64_t v) {
  if (v >= 0 && v < 256) {
    out_ += 'K';  // BININT1
    put_le(out_, static_cast<uint64_t>(v), 1);
  } else if (v >= 0 && v < 65536) {
    out_ += 'M';  // BININT2
    put_le(out_, static_cast<uint64_t>(v), 2);
  } else if (v >= INT32_MIN && v <= INT32_MAX) {
    out_ += 'J';  // BININT, signed
    put_le(out_, static_cast<uint64_t>(static_cast<uint32_t>(static_cast<int32_t>(v))), 4);
  } else {
    // LONG1: little-endian two's complement, as few bytes as keep the sign.
    std::string b;
    int64_t x = v;
    for (;;) {
      b += static_cast<char>(x & 0xff);
      const bool sign = (x & 0x80) != 0;
      x >>= 8;  // arithmetic shift
      if ((x == 0 && !sign) || (x == -1 && sign)) break;
    }
    out_ += '\x8a';
    out_ += static_cast<char>(b.size());
    out_ += b;
  }
}

void PickleWriter::real(double v) {
  out_ += 'G';  // BINFLOAT, big-endian
  const uint64_t bits = std::bit_cast<uint64_t>(v);
  for (int i = 7; i >= 0; --i) out_ += static_cast<char>((bits >> (8 * i)) & 0xff);
}

void PickleWriter::str(std::string_view s) {
  if (auto it = strings_.find(s); it != strings_.end()) return memo_get(it->second);
  out_ += 'X';  // BINUNICODE (UTF-8, 4-byte length)
  put_le(out_, s.size(), 4);
  out_ += s;
  strings_.emplace(std::string(s), next_memo_);
  memo_put();
}

void PickleWriter::begin_dict() { out_ += "}("; }  // EMPTY_DICT MARK
void PickleWriter::end_dict() { out_ += 'u'; }     // SETITEMS
void PickleWriter::begin_list() { out_ += "]("; }  // EMPTY_LIST MARK
void PickleWriter::end_list() { out_ += 'e'; }     // APPENDS

bool PickleWriter::put(const std::string& key) {
  if (objects_.count(key)) return false;
  objects_.emplace(key, next_memo_);
  memo_put();
  return true;
}

bool PickleWriter::get(const std::string& key) {
  auto it = objects_.find(key);
  if (it == objects_.end()) return false;
  memo_get(it->second);
  return true;
}

void PickleWriter::memo_put() {
  const uint32_t i = next_memo_++;
  if (i < 256) {
    out_ += 'q';  // BINPUT
    put_le(out_, i, 1);
  } else {
    out_ += 'r';  // LONG_BINPUT
    put_le(out_, i, 4);
  }
}

void PickleWriter::memo_get(uint32_t i) {
  if (i < 256) {
    out_ += 'h';  // BINGET
    put_le(out_, i, 1);
  } else {
    out_ += 'j';  // LONG_BINGET
    put_le(out_, i, 4);
  }
}

std::string PickleWriter::finish() {
  out_ += '.';  // STOP
  return std::move(out_);
}

// ---- placement and the snapshot ----

namespace {

constexpr int64_t kMinBlockSize = 512;        // bytes; every block is a multiple
constexpr int64_t kSmallSize = 1048576;       // 1 MiB: largest request served from small segments
constexpr int64_t kSmallBuffer = 2097152;     // 2 MiB: small segment size
constexpr int64_t kMinLargeAlloc = 10485760;  // 10 MiB: smaller large requests share 20 MiB segments
constexpr int64_t kLargeBuffer = 20971520;    // 20 MiB
constexpr int64_t kRoundLarge = 2097152;      // 2 MiB: rounding of larger segments
constexpr int64_t kBaseAddress = 0x7f0000000000;
constexpr int64_t kMergedOwner = std::numeric_limits<int64_t>::min();  // Block::owner: the merged block
constexpr std::string_view kMergedCategory = "merged";    // Note [Merged block]
constexpr std::string_view kUnknownCategory = "unknown";  // Note [Snapshot entry]

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

struct Block {
  int64_t size = 0;             // rounded
  int64_t requested = 0;        // the storage's bytes
  int64_t owner = 0;            // storage index, -(op index + 1) for a workspace, or kMergedOwner
};

struct Segment {
  int64_t size = 0;
  bool is_small = false;
  std::map<int64_t, int64_t> free;    // offset -> bytes, coalesced
  std::map<int64_t, Block> used;      // offset -> block
  int64_t max_free = 0;               // largest free range: lets first-fit skip full segments

  void update_max_free() {
    max_free = 0;
    for (const auto& [off, n] : free) max_free = std::max(max_free, n);
  }
};

class Placer {
 public:
  // Returns the address; *new_segment is set when a segment had to be created (its address, size).
  int64_t alloc(int64_t requested, int64_t owner, std::pair<int64_t, int64_t>* new_segment) {
    const int64_t size = round_up(std::max<int64_t>(requested, 1), kMinBlockSize);
    const bool small = size <= kSmallSize;
    for (auto& [addr, seg] : segs_) {
      if (seg.is_small != small || seg.max_free < size) continue;
      for (auto it = seg.free.begin(); it != seg.free.end(); ++it) {
        if (it->second < size) continue;
        const int64_t off = it->first, left = it->second - size;
        seg.free.erase(it);
        if (left > 0) seg.free.emplace(off + size, left);
        seg.used.emplace(off, Block{size, requested, owner});
        seg.update_max_free();
        *new_segment = {0, 0};
        return addr + off;
      }
    }
    const int64_t seg_size = small ? kSmallBuffer : size < kMinLargeAlloc ? kLargeBuffer : round_up(size, kRoundLarge);
    const int64_t addr = next_;
    next_ += round_up(seg_size, kRoundLarge);
    Segment& seg = segs_[addr];
    seg.size = seg_size;
    seg.is_small = small;
    seg.used.emplace(0, Block{size, requested, owner});
    if (seg_size > size) seg.free.emplace(size, seg_size - size);
    seg.update_max_free();
    *new_segment = {addr, seg_size};
    return addr;
  }

  // Frees the block at addr; returns the rounded size, and sets *freed_segment if its segment
  // became empty and was released.
  int64_t free(int64_t addr, std::pair<int64_t, int64_t>* freed_segment) {
    auto sit = std::prev(segs_.upper_bound(addr));
    Segment& seg = sit->second;
    const int64_t off = addr - sit->first;
    auto bit = seg.used.find(off);
    ACTSIM_ASSERT(bit != seg.used.end(), "memviz placement: freeing an address that is not allocated");
    const int64_t size = bit->second.size;
    seg.used.erase(bit);
    auto [it, ok] = seg.free.emplace(off, size);
    ACTSIM_ASSERT(ok, "memviz placement: double free");
    if (auto nx = std::next(it); nx != seg.free.end() && nx->first == off + size) {
      it->second += nx->second;
      seg.free.erase(nx);
    }
    if (it != seg.free.begin()) {
      auto pv = std::prev(it);
      if (pv->first + pv->second == it->first) {
        pv->second += it->second;
        seg.free.erase(it);
      }
    }
    seg.update_max_free();
    *freed_segment = {0, 0};
    if (seg.used.empty()) {
      *freed_segment = {sit->first, seg.size};
      segs_.erase(sit);
    }
    return size;
  }

  const std::map<int64_t, Segment>& segments() const { return segs_; }

 private:
  std::map<int64_t, Segment> segs_;   // by address
  int64_t next_ = kBaseAddress;
};

}  // namespace

std::string memviz_pickle(const Analysis& a, const Timeline& t, int64_t max_events) {
  const graph::Graph& g = a.step->graph;
  const int64_t threshold = coarsen_threshold(t, max_events);
  PickleWriter p;
  Placer placer;
  std::vector<int64_t> addr(g.storages().size(), -1);        // [storages]
  std::vector<int64_t> ws_addr(g.n_ops(), -1);               // [ops]
  int64_t merged = 0;                                        // allocations in the merged block

  // Frames, innermost first as in PyTorch: the tensor, then the op that allocated it.
  auto frames = [&](int64_t owner) {
    p.begin_list();
    if (owner == kMergedOwner) {
      p.begin_dict();
      p.str("name"), p.str(fmt::format("allocations under {} bytes, merged (--max-events)", threshold));
      p.str("filename"), p.str("actsim");
      p.str("line"), p.integer(0);
      p.end_dict();
      p.end_list();
      return;
    }
    if (owner >= 0) {
      const graph::Storage& st = g.storages()[static_cast<size_t>(owner)];
      const std::string tname = st.first != graph::kNoTensor ? g.tensor(st.first).name : "storage";
      p.begin_dict();
      p.str("name"), p.str(tname);
      p.str("filename"), p.str(graph::to_string(st.category));
      p.str("line"), p.integer(0);
      p.end_dict();
      if (st.producer == graph::kNoOp) {
        p.begin_dict();
        p.str("name"), p.str("(before the step)");
        p.str("filename"), p.str("actsim");
        p.str("line"), p.integer(0);
        p.end_dict();
      }
    }
    if (owner < 0 || g.storages()[static_cast<size_t>(owner)].producer != graph::kNoOp) {
      const OpId op = owner < 0 ? OpId{static_cast<uint32_t>(-owner - 1)}
                                : g.storages()[static_cast<size_t>(owner)].producer;
      const graph::Op& o = g.op(op);
      if (owner < 0) {
        p.begin_dict();
        p.str("name"), p.str("workspace");
        p.str("filename"), p.str("temporary");
        p.str("line"), p.integer(0);
        p.end_dict();
      }
      p.begin_dict();
      p.str("name"), p.str(o.name.empty() ? graph::to_string(o.kind) : std::string_view(o.name));
      p.str("filename"), p.str(o.layer >= 0 ? fmt::format("{} layer {}", graph::to_string(o.phase), o.layer)
                                           : std::string(graph::to_string(o.phase)));
      p.str("line"), p.integer(o.layer);
      p.end_dict();
    }
    p.end_list();
  };
  auto category_of = [&](int64_t owner) -> std::string_view {
    if (owner == kMergedOwner) return kMergedCategory;
    return graph::to_string(owner >= 0 ? g.storages()[static_cast<size_t>(owner)].category : Category::temporary);
  };

  // Storages that exist before the step: placed first, not in the trace; never merged (they cost
  // no trace entries, and the viewer needs them as its baseline).
  for (size_t s = 0; s < g.storages().size(); ++s) {
    const graph::Storage& st = g.storages()[s];
    if (st.producer != graph::kNoOp || st.location == graph::Location::host || st.bytes <= 0) continue;
    std::pair<int64_t, int64_t> seg;
    addr[s] = placer.alloc(g.allocated(st.bytes), static_cast<int64_t>(s), &seg);
  }

  p.begin_dict();
  p.str("device_traces");
  p.begin_list();
  p.begin_list();
  auto entry = [&](std::string_view action, int64_t at, int64_t size, int64_t time_ns, int64_t owner, bool with_frames) {
    p.begin_dict();
    p.str("action"), p.str(action);
    p.str("addr"), p.integer(at);
    p.str("size"), p.integer(size);
    p.str("stream"), p.integer(0);
    p.str("time_us"), p.integer(time_ns / 1000);
    p.str("frames");
    if (with_frames) frames(owner);
    else p.begin_list(), p.end_list();
    if (with_frames) p.str("category"), p.str(category_of(owner));
    p.end_dict();
  };
  auto place = [&](int64_t bytes, int64_t owner, int64_t time_ns) {
    std::pair<int64_t, int64_t> seg;
    const int64_t at = placer.alloc(bytes, owner, &seg);
    if (seg.second > 0) entry("segment_alloc", seg.first, seg.second, time_ns, owner, true);
    entry("alloc", at, bytes, time_ns, owner, true);
    return at;
  };
  auto release = [&](int64_t at, int64_t bytes, int64_t owner, int64_t time_ns) {
    std::pair<int64_t, int64_t> seg;
    entry("free_requested", at, bytes, time_ns, owner, true);
    entry("free_completed", at, bytes, time_ns, owner, true);
    placer.free(at, &seg);
    if (seg.second > 0) entry("segment_free", seg.first, seg.second, time_ns, owner, false);
  };

  // Note [Merged block]: with --max-events, allocations under the threshold are not entries of
  // their own: their live bytes are one block (category "merged"), resized (freed, then allocated
  // again) just before each kept event. The viewer's total at every kept event is then the
  // simulated live bytes exactly, and in between never above them, so its largest total is the
  // simulated peak (the peak event is always kept, as in coarsen()).
  int64_t merged_live = 0, merged_size = 0, merged_addr = -1;
  auto sync_merged = [&](int64_t time_ns) {
    if (merged_live == merged_size) return;
    if (merged_addr >= 0) release(merged_addr, merged_size, kMergedOwner, time_ns);
    merged_addr = merged_live > 0 ? place(merged_live, kMergedOwner, time_ns) : -1;
    merged_size = merged_live;
  };
  for (size_t i = 0; i < t.events.size(); ++i) {
    const MemEvent& e = t.events[i];
    const bool is_ws = e.storage == kNoStorage;
    const bool is_alloc = e.kind == MemEventKind::alloc || e.kind == MemEventKind::workspace_alloc;
    const int64_t owner = is_ws ? -static_cast<int64_t>(index(e.op)) - 1 : static_cast<int64_t>(index(e.storage));
    int64_t& slot = is_ws ? ws_addr[index(e.op)] : addr[index(e.storage)];
    // An allocation is kept if large enough or the peak; its free is kept iff it was.
    const bool kept = is_alloc ? e.bytes >= threshold || static_cast<int64_t>(i) == t.peak_event : slot >= 0;
    if (!kept) {
      if (is_alloc) ++merged;
      merged_live += e.delta();
      continue;
    }
    sync_merged(e.time_ns);
    if (is_alloc) {
      ACTSIM_ASSERT(slot < 0, "memviz: allocation of a live storage");
      slot = place(e.bytes, owner, e.time_ns);
    } else {
      release(slot, e.bytes, owner, e.time_ns);
      slot = -1;
    }
  }
  sync_merged(t.step_time_ns);
  ACTSIM_ASSERT(merged_live >= 0, "memviz: merged allocations freed more than they allocated");

  // Note [Snapshot entry]: PyTorch's allocator records a "snapshot" entry (size: the active bytes)
  // when a snapshot is taken; ours closes the trace at the end of the step. It carries the
  // category "unknown" on purpose: MemoryViz.js draws the blocks allocated before the trace in the
  // colour of "unknown", and when the trace's categories lack "unknown" it adds it with
  // `snapshot.categores.push('unknown')` (sic) -- a TypeError that leaves the page empty.
  int64_t active_end = 0;
  for (const auto& [base, seg] : placer.segments())
    for (const auto& [off, b] : seg.used) active_end += b.size;
  p.begin_dict();
  p.str("action"), p.str("snapshot");
  p.str("addr"), p.integer(0);
  p.str("size"), p.integer(active_end);
  p.str("stream"), p.integer(0);
  p.str("time_us"), p.integer(t.step_time_ns / 1000);
  p.str("frames"), p.begin_list(), p.end_list();
  p.str("category"), p.str(kUnknownCategory);
  p.end_dict();
  p.end_list();
  p.end_list();

  // The final segments: exactly what replaying the trace from the initial state leaves.
  p.str("segments");
  p.begin_list();
  for (const auto& [base, seg] : placer.segments()) {
    int64_t allocated = 0, requested = 0;
    for (const auto& [off, b] : seg.used) allocated += b.size, requested += b.requested;
    p.begin_dict();
    p.str("device"), p.integer(0);
    p.str("address"), p.integer(base);
    p.str("total_size"), p.integer(seg.size);
    p.str("allocated_size"), p.integer(allocated);
    p.str("active_size"), p.integer(allocated);
    p.str("requested_size"), p.integer(requested);
    p.str("stream"), p.integer(0);
    p.str("segment_type"), p.str(seg.is_small ? "small" : "large");
    p.str("is_expandable"), p.boolean(false);
    p.str("frames"), p.begin_list(), p.end_list();
    p.str("blocks");
    p.begin_list();
    auto u = seg.used.begin();
    auto f = seg.free.begin();
    while (u != seg.used.end() || f != seg.free.end()) {
      const bool take_used = f == seg.free.end() || (u != seg.used.end() && u->first < f->first);
      p.begin_dict();
      if (take_used) {
        const Block& b = u->second;
        p.str("address"), p.integer(base + u->first);
        p.str("size"), p.integer(b.size);
        p.str("requested_size"), p.integer(b.requested);
        p.str("state"), p.str("active_allocated");
        p.str("category"), p.str(category_of(b.owner));
        p.str("frames"), frames(b.owner);
        // torch 1.13's _memory_viz reads a block's frames from its history.
        p.str("history"), p.begin_list(), p.begin_dict();
        p.str("addr"), p.integer(base + u->first);
        p.str("real_size"), p.integer(b.requested);
        p.str("frames"), frames(b.owner);
        p.end_dict(), p.end_list();
        ++u;
      } else {
        p.str("address"), p.integer(base + f->first);
        p.str("size"), p.integer(f->second);
        p.str("requested_size"), p.integer(0);
        p.str("state"), p.str("inactive");
        p.str("frames"), p.begin_list(), p.end_list();
        ++f;
      }
      p.end_dict();
    }
    p.end_list();
    p.end_dict();
  }
  p.end_list();

  p.str("allocator_settings");
  p.begin_dict();
  p.str("PYTORCH_NO_CUDA_MEMORY_CACHING"), p.boolean(true);
  p.end_dict();
  p.str("actsim");
  p.begin_dict();
  p.str("scenario"), p.str(a.scenario.name);
  p.str("device"), p.str(a.scenario.device.name);
  p.str("peak_bytes"), p.integer(a.result.peak_bytes);
  p.str("peak_time_us"), p.real(static_cast<double>(a.result.peak_time_ns) / 1000.0);
  p.str("merged_below_bytes"), p.integer(threshold);
  p.str("merged_allocations"), p.integer(merged);
  p.end_dict();
  p.end_dict();
  return p.finish();
}

}  // namespace actsim::report
