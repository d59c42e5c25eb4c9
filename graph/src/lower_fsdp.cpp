// FSDP2 (issue 13, parallel.sharding = "fsdp2"): one rank of PyTorch's fully_shard
// (torch/distributed/fsdp/_fully_shard), applied to every block and to the root (embeddings, final
// norm, head), as tests/torch/measure_dist.py applies it. What a rank allocates, per unit, read
// from the allocation trace (README, "Data parallelism"):
//  - each parameter is a DTensor whose local shard is dim 0 / N rows (dims not divisible by N are
//    refused by the loader: the ranks would differ); the optimizer's state is per parameter, on
//    the shard;
//  - pre-forward (the root's at the model's forward, a block's at its own): a flat all-gather
//    output of the unit's size on the communication stream (gloo's two temporaries of that size
//    while it runs, one at a time: the collective's workspace), then one unsharded tensor per
//    parameter (here one storage per unit, the parameters its views: they are allocated and freed
//    together); the previous unit's flat output is freed after this unit's copy-out, the last
//    block's at the end of the forward;
//  - post-forward, with reshard_after_forward: the unsharded parameters freed (the root's too);
//  - backward: the root gathered again at the loss's first backward node (its flat output freed
//    after the copy-out), and each block's all-gather issued one unit ahead (the last block's at
//    the root's pre-backward, block i-1's at block i's), its copy-out at the block's first
//    backward node, which frees the flat output; the backward reads the new copy (the engine
//    remaps the forward's storage, as for ZeRO-3's regather);
//  - post-backward (a block's when the backward leaves it, the root's at the end of backward):
//    the unsharded parameters freed, the previous unit's reduce-scatter input freed
//    (post_backward_rs_wait), a flat reduce-scatter input of the unit's size (the full gradients
//    freed after the copy-in, but the last parameter's, which the copy-in loop's variable holds
//    until the reduce-scatter returns), a 1/N output whose views are the sharded .grads (one
//    storage per unit, freed by zero_grad), gloo's clone of the input and its AVG division's
//    wrapped number (the collective's workspace); the root's input is freed at the end of
//    backward;
//  - the device mesh's rank map (N int32) stays alive from setup (a leaf; on the CPU profiles).
// Every collective runs on the communication stream. On the CPU profiles (gloo, synchronous) the
// compute stream waits for it at once, which keeps the allocations in the order the trace shows.
// On a CUDA profile gloo's temporaries are left out (NCCL needs none) and the backward overlaps:
// a prefetched all-gather is waited for at its unit's copy-out, a reduce-scatter at the next
// unit's post_backward_rs_wait (the allocations then follow the simulated time, not the CPU's
// issue order).
#include <fmt/format.h>

#include <map>

#include "actsim/util/error.hpp"
#include "lowering.hpp"

namespace actsim::graph {

struct Lowering::Fsdp {
  struct Unit {
    std::vector<size_t> members;          // indices into out.params, in parameter order
    int64_t bytes = 0;                    // the unit's unsharded bytes (= its flat all-gather output)
    TensorId flat = kNoTensor;            // the flat all-gather output of the gather in flight
    OpId gather = kNoOp;                  // that all-gather (backward: waited for at the copy-out)
    TensorId unsharded = kNoTensor;       // the storage the parameters are views of now
    StorageId forward_storage{};          // the forward's unsharded storage (remapped in backward)
    std::vector<TensorId> grads;          // full gradients by member (the AccumulateGrad's .grad)
    bool reduced = false;
  };
  std::map<int32_t, Unit> units;          // -1: the root
  bool laid_out = false;
  TensorId prev_flat = kNoTensor;         // forward: the previous unit's flat all-gather output
  OpId root_gather = kNoOp, root_copy = kNoOp;
  bool backward_started = false;
  int32_t current = -1;                   // backward: the block whose nodes run (-1 the root)
  TensorId prev_rs_in = kNoTensor;        // the last reduce-scatter input (freed by the next wait)
  OpId prev_rs = kNoOp;                   // the last reduce-scatter (CUDA: waited for by the next unit)
  std::vector<TensorId> shards;           // per parameter: its local shard (the leaf's storage)
  std::vector<TensorId> shard_grads;      // per parameter: its view of the unit's reduce-scatter output
  std::vector<int32_t> unit_of;           // per parameter: its unit (-1 the root)
};

namespace {
std::string unit_name(int32_t layer) { return layer < 0 ? std::string("root") : fmt::format("blocks.{}", layer); }
// The last op emitted (the new collective starts after it: memory in program order).
OpIds after_last(const Graph& g) {
  if (g.n_ops() == 0) return {};
  return {OpId{static_cast<uint32_t>(g.n_ops() - 1)}};
}
int64_t gloo_bytes(const RuntimeProfile& prof, int64_t bytes) {  // gloo's temporaries: the CPU profiles'
  return prof.id == ProfileId::torch_cpu || prof.id == ProfileId::torch2_cpu ? bytes : 0;
}
}  // namespace

void Lowering::fsdp2_forward_begin() {
  fsdp = std::make_shared<Fsdp>();
  // The root's pre-forward: the parameters do not exist yet (the family makes them); the gather
  // and the copy-out are sized when the first block begins (fsdp2_block).
  Fsdp::Unit& root = fsdp->units[-1];
  b.set_layer(-1);
  b.set_scope("fsdp2");
  root.flat = b.fresh("root.all_gather_output", {0}, dt, Category::parameter);
  fsdp->root_gather = b.emit({.kind = OpKind::all_gather, .name = "root.all_gather", .outputs = {root.flat},
                              .stream = kCommStream, .after = after_last(out.graph),
                              .params = {.group_size = tr.parallel.dp}});
  b.emit({.kind = OpKind::bucket_copy, .name = "root.wait", .kernels = 0, .after = {fsdp->root_gather}});
  root.unsharded = b.fresh("root.unsharded_params", {0}, dt, Category::parameter);
  fsdp->root_copy = b.emit({.kind = OpKind::bucket_copy, .name = "root.all_gather_copy_out",
                            .inputs = {root.flat}, .outputs = {root.unsharded}});
  fsdp->prev_flat = root.flat;
  // init_device_mesh's rank map, torch.arange(N, dtype=torch.int), stays alive (4N bytes, 8 on 2
  // ranks: step_start_other's resize_ in arange); counted on the CPU profiles only (with a CUDA
  // mesh it is host memory).
  if (gloo_bytes(prof, 1) > 0) (void)b.leaf("fsdp2.device_mesh", {tr.parallel.dp}, DType::i32, Category::temporary, false);
}

void Lowering::fsdp2_block(int32_t layer, bool begin) {
  Graph& g = out.graph;
  const int64_t N = tr.parallel.dp;
  const int32_t was_layer = b.layer();
  const std::string was_scope = b.scope();
  if (!fsdp->laid_out) {
    // Every parameter exists now. Each becomes a view of its unit's unsharded storage; its own
    // storage shrinks to this rank's shard (dim 0 / N rows), which the optimizer updates.
    fsdp->laid_out = true;
    for (size_t i = 0; i < out.params.size(); ++i) {
      const TensorId p = out.params[i];
      const Tensor t = g.tensor(p);  // a copy: add_tensor below
      ACTSIM_ASSERT(!t.shape.empty() && t.shape[0] % N == 0, "fsdp2: dim 0 not divisible by dp (checked by the loader)");
      const int32_t unit = g.storage(t.storage).layer < 0 ? -1 : g.storage(t.storage).layer;
      Fsdp::Unit& u = fsdp->units[unit];
      u.members.push_back(i);
      fsdp->unit_of.push_back(unit);
      Tensor sh = t;
      sh.shape[0] /= N;
      sh.strides = contiguous_strides(sh.shape);
      sh.is_view = false;
      const TensorId shard = g.add_tensor(std::move(sh));
      Storage& st = g.mutable_storage(t.storage);
      st.bytes /= N;
      st.first = shard;
      fsdp->shards.push_back(shard);
    }
    for (auto& [l, u] : fsdp->units) {
      for (size_t i : u.members) u.bytes += g.view_bytes(out.params[i]);
    }
    Fsdp::Unit& root = fsdp->units[-1];
    for (TensorId t : {root.flat, root.unsharded}) {
      Tensor& tt = g.mutable_tensor(t);
      tt.shape[0] = root.bytes / dtype_size(dt);
      g.mutable_storage(tt.storage).bytes = root.bytes;
    }
    Op& gather = g.mutable_op(fsdp->root_gather);
    gather.bytes_moved = root.bytes;
    gather.workspace_bytes = gloo_bytes(prof, root.bytes);
    if (root.bytes == 0) gather.kernels = 0;
    g.mutable_op(fsdp->root_copy).bytes_moved = 2 * root.bytes;
    for (auto& [l, u] : fsdp->units) {
      if (l >= 0) continue;
      int64_t offset = 0;
      for (size_t i : u.members) {
        Tensor& t = g.mutable_tensor(out.params[i]);
        t.storage = g.tensor(u.unsharded).storage;
        t.offset = offset;
        t.is_view = true;
        offset += numel(t.shape);
      }
      u.forward_storage = g.tensor(u.unsharded).storage;
    }
  }
  Fsdp::Unit& u = fsdp->units[layer];
  const std::string name = unit_name(layer);
  b.set_layer(layer);
  b.set_scope("fsdp2");
  if (begin) {
    // pre_forward: all-gather into the flat output, copy out into the unsharded parameters; the
    // previous unit's flat output is freed after the copy-out.
    u.flat = b.fresh(name + ".all_gather_output", {u.bytes / dtype_size(dt)}, dt, Category::parameter);
    const OpId gather = b.emit({.kind = OpKind::all_gather, .name = name + ".all_gather", .outputs = {u.flat},
                                .workspace_bytes = gloo_bytes(prof, u.bytes), .bytes_moved = u.bytes,
                                .stream = kCommStream, .after = after_last(g), .params = {.group_size = N}});
    b.emit({.kind = OpKind::bucket_copy, .name = name + ".wait", .kernels = 0, .after = {gather}});
    u.unsharded = b.fresh(name + ".unsharded_params", {u.bytes / dtype_size(dt)}, dt, Category::parameter);
    b.emit({.kind = OpKind::bucket_copy, .name = name + ".all_gather_copy_out", .inputs = {u.flat},
            .outputs = {u.unsharded}, .holds = {fsdp->prev_flat}, .bytes_moved = 2 * u.bytes});
    fsdp->prev_flat = u.flat;
    u.forward_storage = g.tensor(u.unsharded).storage;
    int64_t offset = 0;
    for (size_t i : u.members) {
      Tensor& t = g.mutable_tensor(out.params[i]);
      t.storage = u.forward_storage;
      t.offset = offset;
      t.is_view = true;
      offset += numel(t.shape);
    }
  } else if (tr.parallel.reshard_after_forward) {
    // post_forward: reshard (the unsharded parameters freed; the backward gathers them again).
    b.emit({.kind = OpKind::bucket_copy, .name = name + ".reshard", .inputs = {u.unsharded}, .kernels = 0});
  }
  b.set_layer(was_layer);
  b.set_scope(was_scope);
}

void Lowering::fsdp2_forward_end() {
  ACTSIM_ASSERT(fsdp->laid_out, "fsdp2: a model without blocks");
  // The root's post_forward (reshard when reshard_after_forward), then the last block's flat
  // all-gather output is released.
  b.set_layer(-1);
  b.set_scope("fsdp2");
  Op op{.kind = OpKind::bucket_copy, .name = "root.post_forward", .kernels = 0};
  if (tr.parallel.reshard_after_forward) op.inputs.push_back(fsdp->units[-1].unsharded);
  op.holds.push_back(fsdp->prev_flat);
  b.emit(std::move(op));
  fsdp->prev_flat = kNoTensor;
  b.fsdp_node = [this](int32_t layer) { fsdp2_backward_node(layer); };
}

TensorId Lowering::fsdp2_grad_ready(size_t i, TensorId grad) {
  Fsdp::Unit& u = fsdp->units[fsdp->unit_of.at(i)];
  if (u.grads.empty()) u.grads.assign(u.members.size(), kNoTensor);
  for (size_t k = 0; k < u.members.size(); ++k) {
    if (u.members[k] == i) u.grads[k] = grad;
  }
  return grad;
}

namespace {
struct FsdpScope {
  Builder& b;
  int32_t layer;
  std::string scope;
  FsdpScope(Builder& bb, int32_t l) : b(bb), layer(bb.layer()), scope(bb.scope()) {
    b.set_layer(l);
    b.set_scope("fsdp2");
  }
  ~FsdpScope() {
    b.set_layer(layer);
    b.set_scope(scope);
  }
};
}  // namespace

void Lowering::fsdp2_backward_node(int32_t layer) {
  Graph& g = out.graph;
  const int64_t N = tr.parallel.dp;
  const bool reshard = tr.parallel.reshard_after_forward;
  const int32_t last_block = static_cast<int32_t>(m.n_layers) - 1;
  const bool sync = gloo_bytes(prof, 1) > 0;  // gloo: every collective waited for at once
  auto gather = [&](int32_t l) {  // an all-gather in backward (its flat output)
    Fsdp::Unit& u = fsdp->units[l];
    FsdpScope s(b, l);
    const std::string name = unit_name(l);
    u.flat = b.fresh(name + ".all_gather_output.backward", {u.bytes / dtype_size(dt)}, dt, Category::parameter);
    u.gather = b.emit({.kind = OpKind::all_gather, .name = name + ".all_gather", .outputs = {u.flat},
                       .workspace_bytes = gloo_bytes(prof, u.bytes), .bytes_moved = u.bytes,
                       .stream = kCommStream, .after = after_last(g), .params = {.group_size = N}});
    if (sync) b.emit({.kind = OpKind::bucket_copy, .name = name + ".wait", .kernels = 0, .after = {u.gather}});
  };
  auto copy_out = [&](int32_t l) {  // the unit's pre_backward: unsharded again, the flat output freed
    Fsdp::Unit& u = fsdp->units[l];
    FsdpScope s(b, l);
    const std::string name = unit_name(l);
    u.unsharded = b.fresh(name + ".unsharded_params.backward", {u.bytes / dtype_size(dt)}, dt, Category::parameter);
    b.emit({.kind = OpKind::bucket_copy, .name = name + ".all_gather_copy_out", .inputs = {u.flat},
            .outputs = {u.unsharded}, .bytes_moved = 2 * u.bytes, .after = {u.gather}});
    u.flat = kNoTensor;
    b.fsdp_remap.emplace_back(u.forward_storage, g.tensor(u.unsharded).storage);
  };
  auto post_backward = [&](int32_t l) {
    Fsdp::Unit& u = fsdp->units[l];
    if (u.reduced) return;
    u.reduced = true;
    FsdpScope s(b, l);
    const std::string name = unit_name(l);
    // reshard, then post_backward_rs_wait (the previous reduce-scatter's input freed)
    Op rs_wait{.kind = OpKind::bucket_copy, .name = name + ".post_backward_reshard", .inputs = {u.unsharded},
               .kernels = 0};
    if (fsdp->prev_rs_in != kNoTensor) rs_wait.holds.push_back(fsdp->prev_rs_in);
    if (fsdp->prev_rs != kNoOp) rs_wait.after.push_back(fsdp->prev_rs);
    b.emit(std::move(rs_wait));
    const int64_t elems = u.bytes / dtype_size(dt);
    TensorId rs_in = b.fresh(name + ".reduce_scatter_input", {elems}, dt, Category::gradient);
    std::vector<TensorId> grads;
    for (TensorId t : u.grads) {
      if (t != kNoTensor) grads.push_back(t);
    }
    const TensorId last = grads.empty() ? kNoTensor : grads.back();
    if (!grads.empty()) grads.pop_back();
    b.emit({.kind = OpKind::bucket_copy, .name = name + ".reduce_scatter_copy_in", .inputs = grads,
            .outputs = {rs_in}, .holds = last == kNoTensor ? TensorIds{} : TensorIds{last},
            .bytes_moved = 2 * u.bytes});
    TensorId rs_out = b.fresh(name + ".sharded_grads", {elems / N}, dt, Category::gradient);
    const OpId rs = b.emit({.kind = OpKind::reduce_scatter, .name = name + ".reduce_scatter", .inputs = {rs_in},
                            .outputs = {rs_out},
                            .holds = last == kNoTensor ? TensorIds{} : TensorIds{last},
                            .workspace_bytes = gloo_bytes(prof, u.bytes + prof.scalar_temp_bytes(dt)),
                            .bytes_moved = u.bytes, .stream = kCommStream, .after = after_last(g),
                            .params = {.group_size = N}});
    if (sync) b.emit({.kind = OpKind::bucket_copy, .name = name + ".reduce_scatter.wait", .kernels = 0, .after = {rs}});
    fsdp->prev_rs = rs;
    int64_t offset = 0;
    for (size_t i : u.members) {
      const Tensor& sh = g.tensor(fsdp->shards[i]);
      const Shape shape = sh.shape;
      const std::string pname = sh.name;
      fsdp->shard_grads[i] = b.alias(rs_out, pname + ".grad", shape, {}, offset);
      offset += numel(shape);
    }
    fsdp->prev_rs_in = rs_in;
  };
  if (fsdp->shard_grads.empty()) fsdp->shard_grads.assign(out.params.size(), kNoTensor);
  if (layer == Builder::kFsdpBackwardEnd) {
    // root_post_backward_callback: the last block's and the root's post-backward, then the
    // root's reduce-scatter input is freed when backward returns.
    if (fsdp->current >= 0) post_backward(fsdp->current);
    post_backward(-1);
    FsdpScope s(b, -1);
    b.emit({.kind = OpKind::bucket_copy, .name = "root.post_backward_rs_wait", .holds = {fsdp->prev_rs_in},
            .kernels = 0, .after = {fsdp->prev_rs}});
    fsdp->prev_rs_in = kNoTensor;
    b.fsdp_node = nullptr;
    return;
  }
  if (!fsdp->backward_started) {
    // The root's pre_backward (at the loss's first backward node): gathered again, then the last
    // block's all-gather prefetched.
    fsdp->backward_started = true;
    fsdp->current = -1;
    if (reshard) {
      gather(-1);
      copy_out(-1);
      if (last_block >= 0) gather(last_block);
    }
  }
  if (layer == fsdp->current) return;
  if (fsdp->current >= 0) post_backward(fsdp->current);
  fsdp->current = layer;
  if (layer < 0 || !reshard) return;
  copy_out(layer);
  if (layer > 0) gather(layer - 1);  // prefetch the next unit of the backward
}

void Lowering::fsdp2_backward_end() {
  for (size_t i = 0; i < out.param_grads.size() && i < fsdp->shard_grads.size(); ++i) {
    if (out.param_grads[i] != kNoTensor) out.param_grads[i] = fsdp->shard_grads[i];
  }
}

void Lowering::fsdp2_optimizer() {
  // The optimizer holds the DTensor parameters: its state and its for-loop temporaries are the
  // local shards'.
  const std::vector<TensorId> full = out.params;
  out.params = fsdp->shards;
  optimizer();
  out.params = full;
}

}  // namespace actsim::graph
