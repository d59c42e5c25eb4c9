#!/usr/bin/python3
"""Measure one rank of a data-parallel training step with real torch.distributed on the CPU.

Runs measure.py's measurement (the CPU profiler's allocation trace of one steady-state step) in
each of `dp` processes joined by the gloo backend on localhost, with the model wrapped as the
`parallel` key says:

  ddp      torch.nn.parallel.DistributedDataParallel (buckets of bucket_cap_mb, a 1 MiB first one,
           gradient_as_bucket_view), gradients all-reduced during backward
  zero1    DDP + torch.distributed.optim.ZeroRedundancyOptimizer (optimizer state sharded by
           parameter, broadcast of the updated parameters after the step); actsim's
           parallel.zero_impl = "torch". DDP's keys, no_sync accumulation, autocast and frozen
           parameters apply as for ddp; the local optimizer gets the trainable parameters
  fsdp2    torch.distributed.fsdp.fully_shard per block and on the root, reshard_after_forward
           (its parameters and optimizer state are DTensors: counted by their local shard's
           storage; its all-gather and reduce-scatter run as gloo runs them, but the buffers gloo
           holds are freed on the rank's thread: see all_gather_single, reduce_scatter_single)

Usage: measure_dist.py [KEY=VALUE ...] with measure.py's keys plus parallel=..., dp=N,
bucket_cap_mb=F, gradient_as_bucket_view=0|1, reshard_after_forward=0|1, no_sync=0|1 (with
grad_accum_steps > 1: the first micro-batches under DDP's no_sync, as accelerate does; default 1). Prints
{"ranks": [rank 0's result, rank 1's result, ...]} (measure.py --mode memory's object per rank).
"""
import json
import os
import socket
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import measure  # noqa: E402

DIST_DEFAULTS = {"parallel": "ddp", "dp": 2, "bucket_cap_mb": 25.0, "gradient_as_bucket_view": 0,
                 "reshard_after_forward": 1, "no_sync": 1}


def split(argv):
    dist, rest = dict(DIST_DEFAULTS), []
    for a in argv:
        k, sep, v = a.partition("=")
        if sep and k in DIST_DEFAULTS:
            dist[k] = type(DIST_DEFAULTS[k])(v) if k != "parallel" else v
        else:
            rest.append(a)
    return dist, rest


def bucket_assignment(tensors, limit):
    """c10d's compute_bucket_assignment_by_size with one size limit: tensors grouped by dtype and
    device, a bucket closing once it reaches the limit, buckets in the order of their first
    tensor."""
    done, open_ = [], {}
    for i, t in enumerate(tensors):
        key = (t.dtype, t.device)
        idx, size = open_.get(key, ([], 0))
        idx.append(i)
        size += t.numel() * t.element_size()
        if size >= limit:
            done.append(idx)
            open_.pop(key, None)
        else:
            open_[key] = (idx, size)
    done += [idx for idx, _ in open_.values()]
    return sorted(done, key=lambda idx: idx[0])


def released(torch, *tensors):
    """Wait until gloo's worker thread holds none of these tensors (it may keep its own tensor of
    the same storage: both use counts back to the caller's one reference)."""
    import time
    for t in tensors:
        while t._use_count() > 1 or torch._C._storage_Use_Count(t.untyped_storage()._cdata) > 2:
            time.sleep(0)


def verify_params(process_group, tensors, logger=None):
    """DDP's _verify_param_shape_across_processes (c10d verify_params_across_processes: an
    all-gather of the parameter count, a broadcast of every shape and stride from rank 0), its
    tensors freed by this thread (see broadcast_coalesced). Setup only: nothing of it is live in
    the measured step."""
    import torch
    world = process_group.size()
    count = torch.tensor([len(tensors)], dtype=torch.int64)
    counts = [torch.empty_like(count) for _ in range(world)]
    work = process_group.allgather([counts], [count])
    work.wait()
    del work
    released(torch, count, *counts)
    if any(int(c) != len(tensors) for c in counts):
        raise RuntimeError("DDP expects the same number of parameters on every rank")
    meta = torch.tensor([v for t in tensors for v in (*t.shape, *t.stride())], dtype=torch.int64)
    mine = meta.clone()
    opts = torch.distributed.BroadcastOptions()
    opts.rootRank = 0
    opts.rootTensor = 0
    work = process_group.broadcast([meta], opts)
    work.wait()
    del work
    released(torch, meta)
    if not torch.equal(meta, mine):
        raise RuntimeError("DDP expects the same parameter shapes and strides on every rank")


def broadcast_coalesced(process_group, tensors, buffer_size, src):
    """torch.distributed._broadcast_coalesced (c10d/comm.cpp broadcast_coalesced: per bucket a
    flattened copy broadcast, at most two in flight, unflattened back into the tensors) with the
    same allocations, but each flat copy is freed by this thread.

    Why: the C++ version drops its reference to the flat copy right after work.wait(), and gloo's
    worker thread drops its own when it gets back to its queue; whichever is last frees it. When
    it is the worker, the CPU allocator's profiler (thread-local) never sees the free and the rank
    appears to hold those bytes forever: the 4 to 2,048 (buffers) or 118,400 (parameters, at DDP's
    construction) stray bytes this oracle showed under load. Here the rank waits until gloo has
    let go of the flat copy (its tensor's and its storage's use counts back to this function's own
    reference) and frees it."""
    import collections
    import torch
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
    in_flight = collections.deque()

    def finish():
        flat, bucket, work = in_flight.popleft()
        work.wait()
        del work
        released(torch, flat)
        with torch.no_grad():
            for t, u in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
                t.copy_(u)
        del flat

    opts = torch.distributed.BroadcastOptions()
    opts.rootRank = src
    opts.rootTensor = 0
    for idx in bucket_assignment(tensors, buffer_size):
        if len(in_flight) >= 2:
            finish()
        bucket = [tensors[i] for i in idx]
        flat = _flatten_dense_tensors(bucket)
        in_flight.append((flat, bucket, process_group.broadcast([flat], opts)))
        del flat
    while in_flight:
        finish()


def gloo_settled(tensors, before):
    """Wait until gloo's worker thread has dropped its references to these tensors (their and
    their storages' use counts back to `before`, taken before the collective was launched), so
    that whoever frees them later is this thread."""
    import time
    import torch

    def uses():
        return [n for t in tensors for n in (t._use_count(), torch._C._storage_Use_Count(t.untyped_storage()._cdata))]
    if before is None:
        return uses()
    deadline = time.monotonic() + 10
    while any(a > b for a, b in zip(uses(), before)):
        if time.monotonic() > deadline:
            raise RuntimeError("gloo's worker thread kept a collective's tensors")
        time.sleep(0)
    return before


def reduce_scatter_single(self, output_tensor, input_tensor, group, op, async_op=False):
    """FSDP2's reduce-scatter (DefaultReduceScatter: dist.reduce_scatter_single) with gloo's
    allocations (ProcessGroupGloo::_reduce_scatter_base: a clone of the input all-reduced, the
    rank's chunk copied out; AVG a div_ on gloo's worker thread), but the clone is a stand-in
    this thread allocates and frees and the all-reduce runs in the input itself (FSDP2 only keeps
    the input alive afterwards), and this waits until gloo's worker has let go of it. Why: a
    tensor gloo holds is freed by whichever thread lets go last; when that is the worker, the
    profiler never sees the free and the rank appears to hold it forever (the whole flat gradient
    of a block, 50,816 bytes on a rank of the gpt2 base configuration)."""
    import torch
    import torch.distributed as td
    clone = torch.empty_like(input_tensor)
    before = gloo_settled([input_tensor], None)
    work = td.all_reduce(input_tensor, op=op, group=group, async_op=True)
    work.wait()
    del work
    gloo_settled([input_tensor], before)
    rank = td.get_rank(group)
    with torch.no_grad():
        output_tensor.copy_(input_tensor.view(group.size(), -1)[rank])
    del clone
    return None


def all_gather_single(self, output_tensor, input_tensor, group, async_op=False):
    """FSDP2's all-gather (DefaultAllGather: dist.all_gather_single into the flat output), waited
    for here until gloo's worker thread has let go of the output and its input view, so that the
    output's free (when FSDP2 drops its AllGatherState) is always seen on this thread."""
    import torch.distributed as td
    before = gloo_settled([output_tensor, input_tensor], None)
    work = td.all_gather_single(output_tensor, input_tensor, group=group, async_op=True)
    work.wait()
    del work
    gloo_settled([output_tensor, input_tensor], before)
    return None


class _Fields:
    def __init__(self, fields, total):
        self._f, self.total_allocated = fields, total

    def __getattr__(self, name):
        return getattr(self._f, name)


class _Node:
    """A profiler allocation event with its running total corrected."""

    def __init__(self, node, total):
        self._n, self.extra_fields = node, _Fields(node.extra_fields, total)

    def __getattr__(self, name):
        return getattr(self._n, name)


STRAYS = []  # what the last flatten() took out, for the result


def gloo_race_candidates(model):
    """The sizes of the tensors that DDP's C++ Reducer::rebuild_buckets (sync_bucket_indices, in
    the warm-up's second forward) allocates on the rank's thread, broadcasts with gloo and drops
    right after wait(), so that gloo's worker thread may be the one that frees them (and the
    profiler, which only listens on this thread, never sees the free): the bucket indices and the
    bucket sizes as int32. (Python-side collectives are replaced above instead.)"""
    params = [p for p in model.parameters() if p.requires_grad]
    n_buckets = max(1, len(str(model._get_ddp_logging_data().get("rebuilt_bucket_sizes", "")).split(",")))
    return {4 * (len(params) + 1), 4 * n_buckets}


def make_flatten(plain_flatten, candidates):
    """measure.flatten without the allocations that gloo's worker thread freed (see
    gloo_race_candidates), every later running total lowered by their bytes. A stray is an
    allocation on this thread whose free never shows: its pointer handed out again while it is
    alive, or alive at the end of the trace though only the race's tensors can be (sizes in
    candidates, allocated by the warm-up's DDP.forward's C++ directly)."""
    def flatten(tree):
        nodes = list(plain_flatten(tree))
        mem = sorted((n for n in nodes if "Allocation" in str(n.tag)), key=lambda n: n.start_time_ns)
        alive, strays = {}, set()
        for n in mem:
            f = n.extra_fields
            if f.alloc_size >= 0:
                if f.ptr in alive:
                    strays.add(id(alive[f.ptr]))
                alive[f.ptr] = n
            else:
                alive.pop(f.ptr, None)
        for n in alive.values():
            chain = measure.op_chain(n)
            if (n.extra_fields.alloc_size in candidates
                    and chain == ["aten::empty", "DistributedDataParallel.forward", "actsim::warmup"]):
                strays.add(id(n))
        STRAYS[:] = [{"bytes": n.extra_fields.alloc_size, "ops": measure.op_chain(n)}
                     for n in mem if id(n) in strays]
        out, less = {}, 0
        for n in mem:
            if id(n) in strays:
                less += n.extra_fields.alloc_size
            elif less:
                out[id(n)] = _Node(n, n.extra_fields.total_allocated - less)
        return [out.get(id(n), n) for n in nodes if id(n) not in strays]
    return flatten


def rank_main(rank, world, port, jobs, out_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    import torch
    import torch.distributed as td
    td.init_process_group("gloo", rank=rank, world_size=world)
    td._broadcast_coalesced = broadcast_coalesced
    import torch.nn.parallel.distributed as ddp_module
    ddp_module._verify_param_shape_across_processes = verify_params
    run_jobs(measure_one, torch, rank, world, jobs, out_path)


def run_jobs(measure, torch, rank, world, jobs, out_path):
    """A rank process's jobs measured one after another (garbage collected around each), the
    results written to out_path for the parent, the process group destroyed. measure_dtensor.py
    and measure_pp.py pass their own measure."""
    import gc
    import torch.distributed as td
    results = []
    for job, rest in jobs:
        gc.collect()
        results.append(measure(torch, rank, world, job, rest))
        gc.collect()
    with open(out_path, "w") as f:
        json.dump(results, f)
    td.destroy_process_group()


def load_config(torch, rest):
    """A job's model configuration (measure.py's keys and defaults) and the reference models."""
    cfg = measure.parse_config(rest)
    models = measure.load_reference()
    if cfg["d_ff"] is None:
        cfg["d_ff"] = models.default_d_ff(cfg["family"], cfg["d_model"])
    torch.set_num_threads(cfg["threads"])
    return cfg, models


def measure_one(torch, rank, world, dist, rest):
    cfg, models = load_config(torch, rest)
    plain_build, plain_opt = measure.build, measure.make_optimizer

    def build(torch_, models_, cfg_):
        model, idx, targets = plain_build(torch_, models_, cfg_)
        kind = dist["parallel"]
        if kind in ("ddp", "zero1"):
            from torch.nn.parallel import DistributedDataParallel as DDP
            model = DDP(model, bucket_cap_mb=dist["bucket_cap_mb"],
                        gradient_as_bucket_view=bool(dist["gradient_as_bucket_view"]))
            n = cfg_["grad_accum_steps"]
            if n > 1 and dist["no_sync"]:
                # `with model.no_sync():` around the first n - 1 micro-batches of every step, as
                # accelerate and HF Trainer do: no_sync only clears require_backward_grad_sync,
                # which DDP reads in its forward, so a pre-hook setting it per call is the same.
                calls = [0]

                def no_sync(module, args):
                    module.require_backward_grad_sync = calls[0] % n == n - 1
                    calls[0] += 1
                model.register_forward_pre_hook(no_sync)
        elif kind == "fsdp2":
            from torch.distributed.fsdp import fully_shard
            from torch.distributed.fsdp._fully_shard import _fsdp_collectives
            _fsdp_collectives.DefaultReduceScatter.__call__ = reduce_scatter_single
            _fsdp_collectives.DefaultAllGather.__call__ = all_gather_single
            from torch.distributed.device_mesh import init_device_mesh
            mesh = init_device_mesh("cpu", (world,))
            raf = bool(dist["reshard_after_forward"])
            for blk in model.blocks:
                fully_shard(blk, mesh=mesh, reshard_after_forward=raf)
            fully_shard(model, mesh=mesh, reshard_after_forward=raf)
        return model, idx, targets

    def make_optimizer(torch_, cfg_, params):
        if dist["parallel"] == "zero1":
            from torch.distributed.optim import ZeroRedundancyOptimizer
            name = {"adamw": torch_.optim.AdamW, "adam": torch_.optim.Adam}[cfg_["optimizer"]]
            return ZeroRedundancyOptimizer(params, optimizer_class=name, lr=measure.LR,
                                           foreach=cfg_["optimizer_impl"] == "foreach")
        return plain_opt(torch_, cfg_, params)

    plain_step = measure.train_step

    def train_step(model, opt, idx, targets, record_function=None, n=1):
        # The warm-up runs two steps: DDP rebuilds its buckets in the second iteration's forward
        # (in the order the gradients became ready), so the third step is the steady state.
        if record_function is None:
            plain_step(model, opt, idx, targets, n=n)
        return plain_step(model, opt, idx, targets, record_function, n=n)

    plain_flatten, plain_storage_key = measure.flatten, measure.storage_key
    plain_optimizer_tensors = measure.optimizer_tensors

    def optimizer_tensors(torch_, opt):
        # ZeroRedundancyOptimizer keeps this rank's state in its local optimizer (.optim)
        return plain_optimizer_tensors(torch_, getattr(opt, "optim", opt))

    def storage_key(t):
        # FSDP2's parameters and the optimizer state made from them are DTensors: their bytes are
        # the local shard's storage (FSDP2's padded per-parameter shard).
        return plain_storage_key(t.to_local() if hasattr(t, "to_local") else t)

    built = []

    def build_and_keep(torch_, models_, cfg_):
        model, idx, targets = build(torch_, models_, cfg_)
        built.append(model)
        return model, idx, targets

    def flatten(tree):
        m = built[0]
        candidates = gloo_race_candidates(m) if hasattr(m, "_get_ddp_logging_data") else set()
        return make_flatten(plain_flatten, candidates)(tree)

    measure.build, measure.make_optimizer, measure.train_step = build_and_keep, make_optimizer, train_step
    measure.flatten, measure.storage_key = flatten, storage_key
    measure.optimizer_tensors = optimizer_tensors
    try:
        result = measure.measure_memory(torch, models, cfg, trace=bool(os.environ.get("ACTSIM_DIST_TRACE")))
    finally:
        measure.build, measure.make_optimizer, measure.train_step = plain_build, plain_opt, plain_step
        measure.flatten, measure.storage_key = plain_flatten, plain_storage_key
        measure.optimizer_tensors = plain_optimizer_tensors
    result["gloo_strays"] = list(STRAYS)
    result["rank"] = rank
    result["parallel"] = dist
    return result


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv):
    """Each argument group separated by '--' is one configuration; all run one after another in
    the same `dp` spawned processes (importing torch is most of the time; each configuration's
    trace starts from its own first allocation, and broadcast_coalesced above keeps gloo's worker
    threads from freeing what the ranks allocated)."""
    import multiprocessing as mp
    import tempfile
    groups, cur = [], []
    for a in argv:
        if a == "--":
            groups.append(cur)
            cur = []
        else:
            cur.append(a)
    groups.append(cur)
    jobs = [split(g) for g in groups]
    world = jobs[0][0]["dp"]
    if any(d["dp"] != world for d, _ in jobs):
        print("measure_dist: every configuration needs the same dp", file=sys.stderr)
        return 2
    ctx = mp.get_context("spawn")
    tmp = tempfile.mkdtemp(prefix="actsim-dist-")
    port = free_port()
    paths = [os.path.join(tmp, "%d.json" % r) for r in range(world)]
    procs = [ctx.Process(target=rank_main, args=(r, world, port, jobs, paths[r])) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    if any(p.exitcode for p in procs):
        print("measure_dist: a rank failed", file=sys.stderr)
        return 1
    per_rank = []
    for path in paths:
        with open(path) as f:
            per_rank.append(json.load(f))
        os.remove(path)
    os.rmdir(tmp)
    configs = [{"ranks": [per_rank[r][i] for r in range(world)]} for i in range(len(jobs))]
    json.dump({"configs": configs}, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
