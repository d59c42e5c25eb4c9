// Batch scaling of a sweep (Note [Batch scaling] in batch_scaling.cpp): rows that differ only in
// the batch size share one affine model, built from three fully analyzed reference points and
// checked against all three. Internal to study/ (used by sweep.cpp).
//
//   Reference lo = analyze_reference(s2), mid = analyze_reference(s3), hi = analyze_reference(s8);
//   BatchModel m = build_model(lo, mid, hi);     // m.ok false: analyze the group's rows in full
//   graph::Op scratch;
//   BatchModel::Eval e = m.eval(5, device, scratch);
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "actsim/graph/lower.hpp"
#include "actsim/sim/device.hpp"
#include "actsim/sim/engine.hpp"
#include "actsim/study/scenario.hpp"

namespace actsim::study {

// One fully analyzed reference point of a batch-scaling group.
struct Reference {
  int64_t batch = 0;
  sim::SimResult result;
  int64_t saved_bytes = 0;
  uint64_t hash = 0;
  bool single_stream = true;
  std::vector<int64_t> start_live;         // [ops]
  std::vector<double> flops;               // [ops]
  std::vector<int64_t> bytes_moved;        // [ops]
  sim::DeviceSpec device;
  std::shared_ptr<const graph::StepGraph> step;
};

// A hash of everything the engine reads from a graph except sizes, FLOPs and bytes moved: equal
// for two batches of one structure (Note [Batch scaling]).
uint64_t structure_hash(const graph::Graph& g);

// Analyzes `s` in full and records what a batch model needs.
Reference analyze_reference(const Scenario& s);

// Affine in the batch: value(b) = at_lo + slope * (b - lo).
struct AffineI {
  int64_t at_lo = 0, slope = 0;
  int64_t at(int64_t b, int64_t lo) const { return at_lo + slope * (b - lo); }
};
struct AffineD {
  double at_lo = 0, slope = 0;
  double at(int64_t b, int64_t lo) const { return at_lo + slope * static_cast<double>(b - lo); }
};

// The step at any batch >= 2 from lowerings at two consecutive batches of one structure (step 4
// of Note [Batch search] in batch_search.cpp): the lower one's graph with its sizes rewritten in
// place (storage bytes, workspaces, FLOPs, bytes moved), each affine through the two.
//
//   ScaledStep s(lower(b), lower(b + 1), b);   // s.ok(): one structure
//   const graph::Graph* g = s.at(7);           // null when a size overflows int64
class ScaledStep {
 public:
  ScaledStep(graph::StepGraph lo, const graph::StepGraph& hi, int64_t b);
  bool ok() const { return ok_; }
  const graph::Graph* at(int64_t b);

 private:
  graph::StepGraph step_;
  int64_t lo_;
  bool ok_ = false;
  std::vector<AffineI> storage_, workspace_, moved_;
  std::vector<AffineD> flops_;
};

// The batch-scaling model of one group (Note [Batch scaling]); `ok` false when it does not hold.
struct BatchModel {
  bool ok = false;
  int64_t lo = 0;
  std::shared_ptr<const graph::StepGraph> step;  // the lo reference's graph (op kinds, dtypes)
  AffineI step_start, saved;
  std::vector<AffineI> start_live, bytes_moved;  // [ops]
  std::vector<AffineD> flops;                    // [ops]

  struct Eval {
    int64_t peak_bytes, step_time_ns, saved_bytes;
  };
  Eval eval(int64_t b, const sim::DeviceSpec& device, graph::Op& scratch) const;
};

// The model through three references of one group (batches lo < mid < hi); `ok` false when the
// group's structure differs, a figure is not affine, or the model misses a reference.
BatchModel build_model(const Reference& lo, const Reference& mid, const Reference& hi);

}  // namespace actsim::study
