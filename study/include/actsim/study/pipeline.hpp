// actsim::study pipeline — pipeline parallelism (issue 13): the schedules, the cross-stage event
// simulation and the per-stage analyses.
//
//   Scenario s = load_scenario(path, {"parallel.pp=4", "parallel.microbatches=8"});
//   Analysis a = analyze(s);              // the stage with the highest peak; a.pipeline has all stages
//
// Each stage's piece of the model is lowered and simulated once for one micro-batch (one lowering
// per kind of virtual stage: first, middle, last); the pipeline then replays each stage's
// forwards and backwards of every micro-batch in the order its schedule defines (Note [Pipeline
// replay] in pipeline_schedule.cpp), with the sends and receives between stages, and gives each
// stage its peak, its micro-batches in flight and the step's time with the bubble.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "actsim/graph/config.hpp"
#include "actsim/graph/profile.hpp"

namespace actsim::study {

struct Analysis;
struct Scenario;

// One action of a stage: the forward or backward of micro-batch `mb` through model chunk `chunk`
// (virtual stage chunk * p + stage).
struct PpAction {
  bool backward = false;
  int32_t mb = 0;
  int32_t chunk = 0;
};
// Per stage, its actions in order: GPipe (all forwards, then all backwards), 1F1B (p - s - 1
// warm-up forwards, then one forward and one backward, then the cool-down backwards), Megatron's
// interleaved 1F1B with V chunks per stage.
std::vector<std::vector<PpAction>> pp_schedule(graph::PpSchedule kind, int64_t stages, int64_t microbatches,
                                               int64_t chunks);

// What one virtual stage's single micro-batch does, from its simulation (bytes relative to
// `base`, the bytes live before any micro-batch: parameters, buffers, optimizer state).
struct PpSegment {
  int64_t base = 0;
  int64_t held = 0;          // kept from a forward until its backward (saved activations, received input)
  int64_t fwd_peak = 0;      // the forward's peak above base
  int64_t bwd_peak = 0;      // the first backward's peak above base (this micro-batch's held bytes included)
  int64_t bwd_peak_grads = 0;  // gradients live at that peak (a later backward adds into existing ones)
  int64_t grads = 0;         // left after the first backward (.grad)
  int64_t opt_peak = 0;      // the optimizer's peak above the bytes live when it starts
  int64_t opt_mid = 0;       // live change over the optimizer step alone
  int64_t opt_end = 0;       // live change over the optimizer step and zero_grad
  int64_t fwd_ns = 0, bwd_ns = 0, opt_ns = 0;  // compute-stream time of one forward, backward, step
  int64_t p2p_ns = 0;        // sending this stage's output (or input gradient) to its neighbour
  // torch.distributed.pipelining's runtime (Note [PipelineStage's buffers]): bytes the stage holds
  // for the whole step beyond one micro-batch's lowering (the receive buffers, allocated once per
  // micro-batch and reused; the rest of the whole batch's idx or targets), and the loss of each
  // micro-batch, which the schedule keeps until step() returns (last stage only).
  int64_t persist = 0;
  int64_t loss = 0;
  int64_t out = 0;             // the stage's output (the activation sent on; the last stage's logits)
  bool out_sent = false;       // the output is sent to the next stage (every stage but the last)
  int64_t in_grad = 0;         // the gradient of the received input, sent back
  int64_t fwd_peak_body = 0;   // the forward's peak before the loss (the last stage; else fwd_peak)
  int64_t bwd_peak_later = 0;  // a later backward's peak, .grad existing (its new gradients temporaries)
  // ppdp: DDP inside the stage (Note [DDP inside a stage]): the backwards before the stage's last
  // run under no_sync, as the stage without DDP runs them (its first and later backward's peaks);
  // the last one arms the hooks (bwd_peak, bwd_peak_later above). With gradient_as_bucket_view
  // the no_sync backwards make plain .grad tensors (grads_nosync bytes beyond `grads`), which
  // the last backward's hooks replace by the buckets' views.
  bool ddp_nosync = false;
  int64_t bwd_peak_nosync = 0, bwd_peak_later_nosync = 0, grads_nosync = 0;
};

// pprank (issue 13): one action of a stage as the replay ran it, for the per-class trace: its
// times and the stage's live bytes before, at its peak and after (mb -1: the optimizer step).
struct PpSpan {
  PpAction action;
  int64_t start_ns = 0, end_ns = 0;
  int64_t live_before = 0, peak = 0, live_after = 0;
};

struct PpStageResult {
  int64_t peak_bytes = 0;
  int64_t max_in_flight = 0;   // micro-batches whose activations the stage held at once
  int64_t busy_ns = 0;         // forwards, backwards and the optimizer step
  int64_t forward_end_ns = 0;  // the stage's last forward ends
  int64_t backward_end_ns = 0; // its last backward ends
  int64_t end_ns = 0;          // its optimizer step ends
  int64_t live_step_start = 0, live_end_forward = 0;  // before the step; after the stage's last forward
  int64_t live_end_backward = 0, live_end_optimizer = 0, live_end_step = 0;
  int64_t extra_held = 0;      // at the peak: held bytes of the other micro-batches in flight
  graph::Phase peak_phase = graph::Phase::forward;
  std::vector<PpSpan> spans;   // pprank: every action in schedule order, then the optimizer step
};

struct PpResult {
  std::vector<PpStageResult> stages;
  int64_t step_time_ns = 0;    // the last stage to end
  int64_t bubble_ns = 0;       // step time minus the busiest stage's busy time
};

// The pipeline replay: `segments` per virtual stage (chunk * p + stage). Pure: tests check it.
// `kind` chooses torch's lifetimes of the stage outputs and input gradients (Note
// [torch.distributed.pipelining's lifetimes]); segments without them (out, in_grad 0) do not care.
PpResult run_pipeline(const std::vector<std::vector<PpAction>>& schedule, const std::vector<PpSegment>& segments,
                      int64_t stages, graph::PpSchedule kind = graph::PpSchedule::one_f_one_b);

// The stage analyses of a pipeline-parallel scenario (analyze() calls it when parallel.pp > 1).
struct Pipeline {
  graph::ParallelConfig config;
  std::vector<std::shared_ptr<Analysis>> kinds;  // one per kind of virtual stage lowered
  std::vector<std::vector<int>> stage_kinds;     // per stage, per chunk: index into kinds
  std::vector<PpSegment> segments;               // per virtual stage
  PpResult result;
  int worst = 0;                                 // the stage with the highest peak
};

// A pipeline-parallel scenario's analysis (analyze() calls it when parallel.pp > 1): the stage
// with the highest peak, with `pipeline` holding every stage.
Analysis analyze_pipeline(const Scenario& s, const graph::RuntimeProfile& runtime);
// Gives `a` (a lowering of stage `stage`'s first chunk) that stage's pipeline figures: its peak
// (the other micro-batches in flight counted as activations), the step's time, its phase ends,
// and with several chunks their parameters, gradients and state summed.
void apply_stage(Analysis& a, const Pipeline& pl, int stage);

}  // namespace actsim::study
