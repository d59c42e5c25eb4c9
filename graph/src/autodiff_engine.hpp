// The autograd engine's state (autodiff.cpp): shared by autodiff.cpp (the engine loop, node runs,
// gradient delivery and accumulation) and autodiff_recompute.cpp (checkpoint recomputation and
// offload prefetch). Internal to graph/.
#pragma once

#include <map>
#include <queue>
#include <tuple>
#include <unordered_map>
#include <vector>

#include "autodiff.hpp"
#include "backward_rules.hpp"
#include "checkpoint_frames.hpp"

namespace actsim::graph::autodiff_detail {

constexpr int32_t kBlockRegionBase = 3 << 20;  // lower.cpp's per-block regions of explicit schedules

struct Slot {
  TensorId grad = kNoTensor;  // accumulated gradient for this forward output
};

class Engine {
 public:
  Engine(Builder& b, const std::vector<TensorId>& params, const BlockPlan* plan, OpId forward_begin,
         const std::vector<TensorId>* grads, const GradReadyHook& hook)
      : b_(b), g_(b.graph()), hook_(hook), params_(params), plan_(plan), reentrant_(b.ckpt_reentrant),
        grads_before_(grads) {
    param_grad_.assign(params.size(), kNoTensor);
    param_buf_.assign(params.size(), kNoTensor);
    param_deps_.assign(params.size(), 0);
    slots_.resize(g_.n_ops());  // backward nodes are forward ops: ids below the current count
    deps_.assign(g_.n_ops(), 0);
    refs_.assign(g_.storages().size() * 2, 0);
    for (size_t i = 0; i < params.size(); ++i) param_index_[index(params[i])] = i;
    for (size_t i = index(forward_begin); i < g_.n_ops(); ++i) {
      const Op& op = g_.ops()[i];
      if (op.phase == Phase::forward && op.region >= 0) regions_[op.region].push_back(OpId{static_cast<uint32_t>(i)});
    }
  }

  std::vector<TensorId> run(TensorId loss);

 private:
  bool is_node(OpId f) const {
    for (TensorId t : g_.op(f).inputs) {
      if (g_.tensor(t).requires_grad) return true;
    }
    return false;
  }
  // The edge an input's gradient flows along: a parameter, or (producer op, output index).
  struct Edge {
    bool is_param = false;
    size_t param = 0;
    OpId op = kNoOp;
    size_t out = 0;
  };
  bool edge_of(TensorId t, Edge& e) const;
  TensorId new_grad(const std::string& name, const Shape& shape, DType dt, const Strides& strides = {}) {
    return graph::new_grad(b_, name, shape, dt, strides);
  }
  void run_node(OpId f);
  void deliver(TensorId grad, TensorId input, int32_t from_region = -1);
  void accumulate(TensorId& buf, TensorId grad, int32_t layer);
  void accumulate_grad(size_t param);
  int& ref(TensorId t) {
    const uint32_t s = index(g_.tensor(t).storage);
    if (s >= refs_.size()) refs_.resize(std::max<size_t>(s + 1, refs_.size() * 2), 0);
    return refs_[s];
  }
  void add_ref(TensorId t) { ++ref(t); }
  void drop_ref(TensorId t) { --ref(t); }
  int refs(TensorId t) { return ref(t); }

  Builder& b_;
  Graph& g_;
  GradReadyHook hook_;  // issue 13: DDP / ZeRO gradient hooks
  const std::vector<TensorId>& params_;
  const BlockPlan* plan_;
  const bool reentrant_;                                   // checkpoint.impl = reentrant
  const std::vector<TensorId>* grads_before_;              // [params] .grad from earlier micro-batches
  std::unordered_map<int32_t, bool> scheduled_;            // block -> its before_backward list ran
  std::unordered_map<uint32_t, std::vector<uint32_t>> cached_views_;  // storage -> remapped_t_ keys
  std::unordered_map<uint32_t, size_t> param_index_;
  std::vector<TensorId> param_grad_;
  std::vector<TensorId> param_buf_;                        // AccumulateGrad's InputBuffer
  std::vector<int> param_deps_;                            // AccumulateGrad's pending edges
  std::vector<uint32_t> needed_mark_;                      // recompute_region's [storages] scratch
  uint32_t needed_stamp_ = 0;
  std::vector<util::SmallVector<Slot, 2>> slots_;          // [forward ops] per-output gradient
  std::vector<int> deps_;                                  // [forward ops] pending edges
  std::vector<int> refs_;                                  // [storages] live gradient references
  std::priority_queue<uint32_t> ready_;                    // forward op index: latest first

  // Checkpointing and offload: forward storages replaced in backward by a recomputed or
  // prefetched copy, and the tensors viewing those copies.
  // Flat tables indexed by id (grown on demand; a hash lookup per input was a tenth of a planner
  // probe's lowering): storage -> replacement storage (index + 1, 0 = none), tensor -> the same
  // view of the replacement (kNoTensor = none yet).
  std::vector<uint32_t> remap_;
  size_t n_remapped_ = 0;
  std::vector<TensorId> remapped_t_;
  StorageId remap_of(uint32_t sid) const {
    return sid < remap_.size() && remap_[sid] != 0 ? StorageId{remap_[sid] - 1} : StorageId{~0U};
  }
  void set_remap(uint32_t sid, StorageId to) {
    if (sid >= remap_.size()) remap_.resize(std::max<size_t>(sid + 1, remap_.size() * 2), 0);
    if (remap_[sid] == 0) ++n_remapped_;
    remap_[sid] = index(to) + 1;
  }
  std::unordered_map<int32_t, std::vector<OpId>> regions_; // region -> forward ops, in order
  std::unordered_map<int32_t, bool> recomputed_;
  std::unordered_map<int32_t, Recomputation> recomputations_;
  std::unordered_map<int32_t, bool> prefetched_;           // block -> prefetch emitted
  TensorId mapped(TensorId t);
  void remap_storage(uint32_t sid, StorageId to);
  void recompute_region(int32_t r, const std::vector<uint32_t>* targets = nullptr);
  bool wrapped_scalar(TensorId t) const;
  // Non-reentrant: the recomputation starts when a node unpacks a saved tensor of the region.
  bool unpacks(const Op& f) const {
    for (TensorId t : f.saved) {
      if (!wrapped_scalar(t)) return true;
    }
    return false;
  }
  void prefetch_block(int32_t layer);
  void regather_block(int32_t layer);  // fsdp: ZeRO-3's all-gather of a block's parameters

  // Reentrant checkpoint (CheckpointFunction): the call's backward node is the region's nodes
  // run as one nested backward. Per region: its nodes still to run, the gradients it received
  // (held by the node's args and the nested GraphRoot until it returns), the recomputed output.
  struct Reentrant {
    int pending = 0;
    std::vector<TensorId> grads_in;
    std::vector<TensorId> held;                            // the recomputed outputs of the call
  };
  std::unordered_map<int32_t, Reentrant> reentrant_calls_;
  // Gradients for a reentrant call's arguments (detach_variable's leaves) gather in the leaf's
  // AccumulateGrad: (region, producer op, output) -> the buffer and its pending edges.
  struct ArgGrad {
    TensorId buf = kNoTensor;
    int pending = 0;
  };
  std::map<std::tuple<int32_t, uint32_t, size_t>, ArgGrad> arg_grads_;
  bool is_reentrant_region(int32_t r) const { return reentrant_ && r >= 0; }
  void finish_reentrant(int32_t r);
};

}  // namespace actsim::graph::autodiff_detail
