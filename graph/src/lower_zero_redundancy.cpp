// zero_redundancy (issue 13): torch.distributed.optim.ZeroRedundancyOptimizer over DDP, one rank of
// it (parallel.sharding = "zero1", parallel.zero_impl = "torch").
//
// torch/distributed/optim/zero_redundancy_optimizer.py (2.x), with parameters_as_bucket_view and
// overlap_with_ddp off (their defaults):
//  - the model is DistributedDataParallel's: full gradients, its buckets and hooks as for
//    sharding = "none" (lower_parallel.cpp, ParallelConfig::ddp());
//  - _partition_parameters: per parameter group, the parameters sorted by numel (largest first,
//    Python's stable sort), each given to the rank with the fewest elements so far (_get_min_index:
//    the lowest such rank); the counts carry over between groups (one group here);
//  - _init_local_optimizer: this rank's local optimizer (the optimizer_class, e.g. torch.optim.AdamW)
//    over its parameters in that order: its state is made only for them, in their dtype, and its
//    step's temporaries are those of the same optimizer over that list (lower_optimizer.cpp);
//  - step() = _local_step (the local optimizer's step) then _sync_params: every rank broadcasts
//    each of its updated parameters (dist.broadcast(param.data), async, in place: nothing is
//    allocated), all waited for before step() returns;
//  - zero_grad is torch.optim.Optimizer's over all the parameters (every .grad freed).
// Ranks differ (their partitions), so study simulates one lowering per distinct partition
// (zero_rank; study/src/zero_redundancy.cpp).
#include <algorithm>
#include <numeric>

#include "lowering.hpp"

namespace actsim::graph {

std::string_view to_string(ZeroImpl z) { return z == ZeroImpl::torch ? "torch" : "deepspeed"; }

std::vector<int64_t> zero_redundancy_partition(const std::vector<int64_t>& numels, int64_t ranks) {
  std::vector<size_t> sorted(numels.size());
  std::iota(sorted.begin(), sorted.end(), size_t{0});
  std::stable_sort(sorted.begin(), sorted.end(), [&](size_t a, size_t b) { return numels[a] > numels[b]; });
  std::vector<int64_t> sizes(static_cast<size_t>(std::max<int64_t>(ranks, 1)), 0);
  std::vector<int64_t> rank(numels.size(), 0);
  for (size_t i : sorted) {
    const auto r = static_cast<size_t>(std::min_element(sizes.begin(), sizes.end()) - sizes.begin());  // first minimum
    rank[i] = static_cast<int64_t>(r);
    sizes[r] += numels[i];
  }
  return rank;
}

namespace {

// The parameters ZeroRedundancyOptimizer partitions (measure.py passes those that require grad),
// as indices into `params`, and their element counts.
struct Partitioned {
  std::vector<size_t> index;
  std::vector<int64_t> numels;
};
Partitioned partitioned_params(const Graph& g, const std::vector<TensorId>& params) {
  Partitioned p;
  for (size_t i = 0; i < params.size(); ++i) {
    if (!g.tensor(params[i]).requires_grad) continue;
    p.index.push_back(i);
    p.numels.push_back(numel(g.tensor(params[i]).shape));
  }
  return p;
}

}  // namespace

std::vector<size_t> Lowering::optimizer_order() const {
  // The optimizer's parameter list, as indices into out.params: all of them (frozen ones skipped
  // by the optimizer), or this rank's partition in the local optimizer's order.
  std::vector<size_t> all(out.params.size());
  std::iota(all.begin(), all.end(), size_t{0});
  if (!tr.parallel.zero_redundancy()) return all;
  const Partitioned part = partitioned_params(out.graph, out.params);
  const std::vector<size_t>& trainable = part.index;
  const std::vector<int64_t>& numels = part.numels;  // not a structured binding: the lambda below reads it (clang 14)
  const std::vector<int64_t> rank = zero_redundancy_partition(numels, tr.parallel.dp);
  const int64_t me = std::max<int64_t>(tr.parallel.zero_rank, 0);
  std::vector<size_t> mine;  // trainable order; then sorted by numel, largest first, as the partition
  for (size_t k = 0; k < trainable.size(); ++k) {
    if (rank[k] == me) mine.push_back(k);
  }
  std::stable_sort(mine.begin(), mine.end(), [&](size_t a, size_t b) { return numels[a] > numels[b]; });
  for (size_t& k : mine) k = trainable[k];
  return mine;
}

void Lowering::zero_redundancy_broadcast() {
  // _sync_params: for each rank, a broadcast of each of its parameters from it (in place), every
  // handle waited for. Timed as one all-gather-like collective per source rank of its bytes.
  if (!tr.parallel.zero_redundancy()) return;
  Graph& g = out.graph;
  b.set_phase(Phase::optimizer);
  b.set_layer(-1);
  b.set_scope("zero_redundancy");
  const int64_t N = tr.parallel.dp;
  const Partitioned part = partitioned_params(g, out.params);
  const std::vector<size_t>& trainable = part.index;
  const std::vector<int64_t>& numels = part.numels;
  const std::vector<int64_t> rank = zero_redundancy_partition(numels, N);
  const OpId local_step = OpId{static_cast<uint32_t>(g.n_ops() - 1)};
  std::vector<OpId> handles;
  for (int64_t r = 0; r < N; ++r) {
    Op bc{.kind = OpKind::all_gather, .name = fmt::format("zero_redundancy.rank{}.params.broadcast", r),
          .stream = kCommStream, .after = {local_step}, .params = {.group_size = N}};
    for (size_t k = 0; k < trainable.size(); ++k) {
      if (rank[k] != r) continue;
      const TensorId p = out.params[trainable[k]];
      bc.inputs.push_back(p);
      bc.bytes_moved += g.view_bytes(p);
    }
    bc.kernels = static_cast<int32_t>(bc.inputs.size());
    handles.push_back(b.emit(std::move(bc)));
  }
  b.emit({.kind = OpKind::bucket_copy, .name = "zero_redundancy.wait", .kernels = 0, .after = std::move(handles)});
}

}  // namespace actsim::graph
