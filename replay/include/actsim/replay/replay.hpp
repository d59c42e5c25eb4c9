// actsim::replay::run — executes a simulated schedule for real, and the confirmations that
// check the simulator against it (DESIGN.md, "Replay").
//
//   schedule::Schedule s = schedule::parse_schedule("step.jsonl");      // or study::make_schedule(analysis)
//   auto be = backends::make_backend("cpu");
//   ReplayResult r = replay(s, *be, {.poison_freed = true});   // alloc / run / free as written
//   SafetyCheck safe = confirm_safety(s, *be, r);              // vs a run that frees nothing
//   MemoryCheck mem = confirm_memory(s, r);                    // high-water mark and timeline
//   TightnessCheck tight = confirm_tightness(s, *be, r, {.max_checked = 40});
//
// The executor does exactly what the entries say: `alloc` takes a buffer from the backend through
// a counting allocator (device bytes in use, the high-water mark, and bytes in use after every
// memory entry), `run` builds an OpCall of strided views into the storages' buffers and runs it,
// `free` returns the buffer. Storages that exist before the step (parameters, buffers, optimizer
// state, inputs) are allocated and filled deterministically first (seeded; token ids in
// [0, vocab)). Host storages (CUDA's 0-dim CPU scalars) are allocated too but, as in the
// simulator, not counted as device bytes.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "actsim/backends/backend.hpp"
#include "actsim/schedule/schedule.hpp"

namespace actsim::replay {

struct ReplayOptions {
  uint64_t seed = 0;                       // initial values and dropout keys
  bool free_buffers = true;                // false: keep every buffer (the safety reference)
  bool poison_freed = false;               // fill a buffer with 0xFF bytes (NaN) before freeing it
  // Tightness: poison this storage just before the `run` entry at this index.
  std::optional<graph::StorageId> poison_storage;
  size_t poison_before_entry = 0;
  bool stop_after_backward = false;        // skip the optimizer step (loss and gradients only)
  bool keep_initial_values = false;        // keep the host copies of pre-step storages (torch dump)
  // Called every few hundred entries and at the end with (entries done, entries): a progress line.
  std::function<void(int64_t done, int64_t total)> progress;
};

struct ReplayResult {
  std::string backend;
  double loss = 0;                         // the loss as a double (from its dtype)
  std::vector<uint8_t> loss_bytes;         // raw bytes of the loss tensor
  std::vector<std::vector<uint8_t>> grads;         // [params] raw gradient bytes (empty: no gradient)
  std::vector<std::vector<uint8_t>> params_after;  // [params] raw bytes after the optimizer step
  std::vector<std::vector<uint8_t>> initial;       // [storages] pre-step values (keep_initial_values)
  int64_t bytes_step_start = 0;            // device bytes in use before the first entry
  int64_t peak_bytes = 0;                  // high-water mark of device bytes in use
  std::vector<int64_t> timeline;           // [entries] device bytes in use after it (-1: run entry)
  std::vector<double> op_seconds;          // [ops] measured time of each op's run()
  double step_seconds = 0;                 // sum of op_seconds
  double wall_seconds = 0;                 // the whole replay, allocation and init included
  bool completed_optimizer = false;        // false when stop_after_backward cut the run short
};

// Executes the schedule. Throws ReplayError (a std::runtime_error) naming the entry and op when
// the backend fails (an unsupported op kind).
ReplayResult run(const schedule::Schedule& s, backends::Backend& be, const ReplayOptions& opts = {});

class ReplayError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Loss and every parameter gradient equal, bit for bit.
bool grads_equal(const ReplayResult& a, const ReplayResult& b);

// (a) Safety: the run that frees (and poisons) at the simulated points against one that frees
// nothing: loss, every gradient and every updated parameter equal bit for bit.
struct SafetyCheck {
  bool ok = false;
  std::string detail;                      // the first difference, when not ok
};
SafetyCheck confirm_safety(const schedule::Schedule& s, backends::Backend& be, const ReplayResult& freed, uint64_t seed = 0,
                           std::function<void(int64_t done, int64_t total)> progress = {});

// (b) Tightness: poisoning a saved activation just before its simulated last use (the last op
// reading it) changes the loss or a gradient. Saved activations are the step's storages that a
// backward op reads as saved tensors, and under checkpointing the forward tensors a recompute op
// reads. Probes share the unpoisoned prefix of their runs (save, poison, run on, restore).
struct TightnessItem {
  std::string name;                        // the storage's first tensor
  graph::StorageId storage{0};
  std::string last_reader;                 // op name
  bool confirmed = false;
  std::string reason;                      // why not, when not confirmed
};
struct TightnessCheck {
  int64_t candidates = 0;                  // saved activation storages in the step
  int64_t checked = 0;
  int64_t confirmed = 0;
  std::vector<TightnessItem> items;
};
struct TightnessOptions {
  size_t max_checked = 40;                 // a seeded sample when there are more candidates
  uint64_t seed = 0;
  bool share_prefix = true;                // probes share the unpoisoned prefix (same results, faster)
  std::function<void(int64_t done, int64_t total)> progress;  // (probes done, probes)
};
TightnessCheck confirm_tightness(const schedule::Schedule& s, backends::Backend& be, const ReplayResult& reference,
                                 const TightnessOptions& opts = {});

// (c) Memory: measured high-water mark equals the simulated peak, and the measured bytes in use
// equal the simulated ones after every memory entry.
struct MemoryCheck {
  bool ok = false;
  int64_t simulated_peak_bytes = 0;
  int64_t measured_peak_bytes = 0;
  int64_t events_compared = 0;
  std::string detail;                      // the first mismatch, when not ok
};
MemoryCheck confirm_memory(const schedule::Schedule& s, const ReplayResult& r);

// (d) Recompute: every checkpoint policy's schedule gives the loss and gradients of the schedule
// without checkpointing, bit for bit. The schedules come from `schedule_of(policy)` (the caller
// simulates them: replay knows no scenario); each is validated, then replayed up to the end of
// backward. Throws InputError (a schedule that cannot run) or ReplayError.
//
//   RecomputeCheck c = confirm_recompute(recompute_policies({"full", "offload"}, "none"),
//       [&](const std::string& p) { return study::make_schedule(analyze(with_policy(sc, p))); }, *be, seed);
struct RecomputeItem {
  std::string policy;
  bool equal = false;
};
struct RecomputeCheck {
  bool ok = true;
  std::vector<RecomputeItem> items;        // one per policy compared, in order
};
// The policies to compare: those asked for (without "none", the reference) plus the scenario's
// own policy when it is not among them.
std::vector<std::string> recompute_policies(const std::vector<std::string>& asked, const std::string& own);
RecomputeCheck confirm_recompute(const std::vector<std::string>& policies,
                                 const std::function<schedule::Schedule(const std::string& policy)>& schedule_of,
                                 backends::Backend& be, uint64_t seed = 0);

// FNV-1a over the loss, gradients and updated parameters, as 16 hex digits: equal digests,
// bitwise equal runs (replay --json's result_digest).
std::string result_digest(const ReplayResult& r);

// (e) Inputs for the PyTorch cross-check (python/torch_check.py): one JSON header line,
// then raw little-endian arrays (fp32 for floating point, int64 for token ids) of parameters,
// buffers and inputs (before the step) and of the gradients and loss the replay computed.
std::string torch_dump(const schedule::Schedule& s, const ReplayResult& r);

// Whether PyTorch (Debian's 1.13, CPU) can check this schedule; the reason when it cannot.
bool torch_checkable(const schedule::Schedule& s, std::string& why_not);

}  // namespace actsim::replay
