#!/usr/bin/python3
"""Measure one rank of a data-parallel training step with real torch.distributed on the CPU.

Runs measure.py's measurement (the CPU profiler's allocation trace of one steady-state step) in
each of `dp` processes joined by the gloo backend on localhost, with the model wrapped as the
`parallel` key says:

  ddp      torch.nn.parallel.DistributedDataParallel (buckets of bucket_cap_mb, a 1 MiB first one,
           gradient_as_bucket_view), gradients all-reduced during backward
  zero1    DDP + torch.distributed.optim.ZeroRedundancyOptimizer (optimizer state sharded by
           parameter, broadcast of the updated parameters after the step)
  fsdp2    torch.distributed.fsdp.fully_shard per block and on the root

Usage: measure_dist.py [KEY=VALUE ...] with measure.py's keys plus parallel=..., dp=N,
bucket_cap_mb=F, gradient_as_bucket_view=0|1, reshard_after_forward=0|1. Prints
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
                 "reshard_after_forward": 1}


def split(argv):
    dist, rest = dict(DIST_DEFAULTS), []
    for a in argv:
        k, sep, v = a.partition("=")
        if sep and k in DIST_DEFAULTS:
            dist[k] = type(DIST_DEFAULTS[k])(v) if k != "parallel" else v
        else:
            rest.append(a)
    return dist, rest


def rank_main(rank, world, port, jobs, out_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    import gc
    import torch
    import torch.distributed as td
    td.init_process_group("gloo", rank=rank, world_size=world)
    results = []
    for dist, rest in jobs:
        gc.collect()
        results.append(measure_one(torch, rank, world, dist, rest))
        gc.collect()
    with open(out_path, "w") as f:
        json.dump(results, f)
    td.destroy_process_group()


def measure_one(torch, rank, world, dist, rest):
    cfg = measure.parse_config(rest)
    models = measure.load_reference()
    if cfg["d_ff"] is None:
        cfg["d_ff"] = models.default_d_ff(cfg["family"], cfg["d_model"])
    torch.set_num_threads(cfg["threads"])
    plain_build, plain_opt = measure.build, measure.make_optimizer

    def build(torch_, models_, cfg_):
        model, idx, targets = plain_build(torch_, models_, cfg_)
        kind = dist["parallel"]
        if kind in ("ddp", "zero1"):
            from torch.nn.parallel import DistributedDataParallel as DDP
            model = DDP(model, bucket_cap_mb=dist["bucket_cap_mb"],
                        gradient_as_bucket_view=bool(dist["gradient_as_bucket_view"]))
        elif kind == "fsdp2":
            from torch.distributed.fsdp import fully_shard
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

    def train_step(model, opt, idx, targets, record_function=None):
        # The warm-up runs two steps: DDP rebuilds its buckets in the second iteration's forward
        # (in the order the gradients became ready), so the third step is the steady state.
        if record_function is None:
            plain_step(model, opt, idx, targets)
        return plain_step(model, opt, idx, targets, record_function)

    measure.build, measure.make_optimizer, measure.train_step = build, make_optimizer, train_step
    try:
        result = measure.measure_memory(torch, models, cfg, trace=bool(os.environ.get("ACTSIM_DIST_TRACE")))
    finally:
        measure.build, measure.make_optimizer, measure.train_step = plain_build, plain_opt, plain_step
    result["rank"] = rank
    result["parallel"] = dist
    return result


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv):
    """Each argument group separated by '--' is one configuration; each runs in `dp` fresh
    processes (spawned: a fresh allocator and process group per configuration, so that nothing
    of one shows in the next one's trace; forked children of a process that imported torch, or
    one pair of processes running the configurations in turn, both showed stray bytes)."""
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
    ctx = mp.get_context("spawn")
    tmp = tempfile.mkdtemp(prefix="actsim-dist-")
    configs = []
    for i, job in enumerate(jobs):
        port = free_port()
        paths = [os.path.join(tmp, "%d-%d.json" % (i, r)) for r in range(world)]
        procs = [ctx.Process(target=rank_main, args=(r, world, port, [job], paths[r])) for r in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        if any(p.exitcode for p in procs):
            print("measure_dist: a rank failed (configuration %d)" % i, file=sys.stderr)
            return 1
        ranks = []
        for path in paths:
            with open(path) as f:
                ranks.append(json.load(f)[0])
            os.remove(path)
        configs.append({"ranks": ranks})
    os.rmdir(tmp)
    json.dump({"configs": configs}, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
