#!/usr/bin/python3
"""Measure one rank of a tensor-parallel training step with PyTorch DTensor on the CPU (issue 13).

The reference llama (shared/reference/models.py) parallelized with
torch.distributed.tensor.parallel.parallelize_module as torchtitan's apply_tp applies it
(torchtitan/models/llama3/infra/parallelize.py), on a 1-D "cpu" device mesh of `tp` gloo ranks:

  tok_embeddings   RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1) | Replicate())
  norm             SequenceParallel()                                  (sp only)
  lm_head          ColwiseParallel(input_layouts=Shard(1) | Replicate(), output_layouts=Shard(-1),
                   use_local_output=False), the loss under loss_parallel() (torchtitan's default:
                   enable_loss_parallel unless parallelism.disable_loss_parallel)
  per block
    attn_norm, ffn_norm   SequenceParallel()                           (sp only)
    attn, ffn             PrepareModuleInput(Shard(1) -> Replicate())  (sp only)
    q/k/v_proj, w1, w3    ColwiseParallel()
    o_proj, w2            RowwiseParallel(output_layouts=Shard(1) | Replicate())

and, as torchtitan's older apply_tp did, each attention module told its local head counts
(n_heads/tp, n_kv_heads/tp, d_model/tp) so that its views see the shard. Without sp the plan is
the same with the sequence-parallel entries left out (the PyTorch tensor-parallel tutorial's).

Each rank runs tests/torch/measure.py's memory measurement (the CPU profiler's allocation trace of
a steady step; the warm-up is one step), in processes started and joined as measure_dist.py does
(its free_port and its stray-free flatten are reused by import).

Usage: measure_dtensor.py [KEY=VALUE ...] [-- KEY=VALUE ...] with measure.py's keys plus tp=N,
sp=0|1. Prints {"configs": [{"ranks": [rank 0's result, ...]}, ...]}.
"""
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import measure  # noqa: E402
import measure_dist  # noqa: E402

TP_DEFAULTS = {"tp": 2, "sp": 0}


def split(argv):
    tp, rest = dict(TP_DEFAULTS), []
    for a in argv:
        k, sep, v = a.partition("=")
        if sep and k in TP_DEFAULTS:
            tp[k] = int(v)
        else:
            rest.append(a)
    return tp, rest


def parallelize(torch, model, cfg, mesh, sp):
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, RowwiseParallel,
                                                   SequenceParallel, parallelize_module)
    if cfg["family"] != "llama":
        raise measure.UsageError("measure_dtensor: torchtitan's tensor-parallel plan is for llama")
    t = mesh.size()
    seq = Shard(1) if sp else Replicate()
    plan = {
        "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=seq),
        "lm_head": ColwiseParallel(input_layouts=seq, output_layouts=Shard(-1), use_local_output=False),
    }
    if sp:
        plan["norm"] = SequenceParallel()
    parallelize_module(model, mesh, plan)
    for blk in model.blocks:
        plan = {
            "attn.q_proj": ColwiseParallel(), "attn.k_proj": ColwiseParallel(), "attn.v_proj": ColwiseParallel(),
            "attn.o_proj": RowwiseParallel(output_layouts=seq),
            "ffn.w1": ColwiseParallel(), "ffn.w2": RowwiseParallel(output_layouts=seq), "ffn.w3": ColwiseParallel(),
        }
        if sp:
            plan.update({
                "attn_norm": SequenceParallel(), "ffn_norm": SequenceParallel(),
                "attn": PrepareModuleInput(input_layouts=(Shard(1), None), desired_input_layouts=(Replicate(), None)),
                "ffn": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
            })
        parallelize_module(blk, mesh, plan)
        blk.attn.h //= t
        blk.attn.kvh //= t
        blk.attn.d //= t
    return model


def rank_main(rank, world, port, jobs, out_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    import torch
    import torch.distributed as td
    td.init_process_group("gloo", rank=rank, world_size=world)
    import time
    import torch.distributed._functional_collectives as funcol
    plain_wait = funcol.wait_tensor

    def wait_tensor(tensor):
        # gloo's worker thread drops its reference to a collective's work (and the buffers it
        # holds: the output, reduce_scatter's clone of its input) only after the work completes;
        # when the rank's own last reference goes first, the worker frees the buffer and the
        # profiler (which listens on this thread) never sees the free. A moment's pause before
        # and after the wait lets the worker let go first (after it, until this rank holds the
        # output's tensor and storage alone, as measure_dist.released checks; at most 50 ms: a
        # view of the output may legitimately share its storage).
        time.sleep(0.005)
        out = plain_wait(tensor)
        deadline = time.monotonic() + 0.05
        while time.monotonic() < deadline and (
                out._use_count() > 1 or torch._C._storage_Use_Count(out.untyped_storage()._cdata) > 2):
            time.sleep(0.0005)
        return out
    funcol.wait_tensor = wait_tensor
    measure_dist.run_jobs(measure_one, torch, rank, world, jobs, out_path)


def measure_one(torch, rank, world, tp, rest):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import loss_parallel
    cfg, models = measure_dist.load_config(torch, rest)
    mesh = init_device_mesh("cpu", (world,))
    plain_build, plain_step, plain_flatten = measure.build, measure.train_step, measure.flatten
    plain_key = measure.storage_key
    from torch.distributed.tensor import DTensor

    def storage_key(t):  # a DTensor's bytes are its local shard's
        return plain_key(t.to_local() if isinstance(t, DTensor) else t)

    def build(torch_, models_, cfg_):
        model, idx, targets = plain_build(torch_, models_, cfg_)
        return parallelize(torch_, model, cfg_, mesh, bool(tp["sp"])), idx, targets

    def train_step(model, opt, idx, targets, record_function=None, n=1):
        with loss_parallel():
            return plain_step(model, opt, idx, targets, record_function, n=n)

    measure.build, measure.train_step, measure.storage_key = build, train_step, storage_key
    measure.flatten = measure_dist.make_flatten(plain_flatten, set())
    try:
        result = measure.measure_memory(torch, models, cfg, trace=bool(os.environ.get("ACTSIM_DIST_TRACE")))
    finally:
        measure.build, measure.train_step, measure.flatten = plain_build, plain_step, plain_flatten
        measure.storage_key = plain_key
    result["gloo_strays"] = list(measure_dist.STRAYS)
    result["rank"] = rank
    result["parallel"] = tp
    return result


def main(argv):
    """Configurations separated by '--' run one after another in the same `tp` processes."""
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
    world = jobs[0][0]["tp"]
    if any(t["tp"] != world for t, _ in jobs):
        print("measure_dtensor: every configuration needs the same tp", file=sys.stderr)
        return 2
    ctx = mp.get_context("spawn")
    tmp = tempfile.mkdtemp(prefix="actsim-dtensor-")
    port = measure_dist.free_port()
    paths = [os.path.join(tmp, "%d.json" % r) for r in range(world)]
    procs = [ctx.Process(target=rank_main, args=(r, world, port, jobs, paths[r])) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    if any(p.exitcode for p in procs):
        print("measure_dtensor: a rank failed", file=sys.stderr)
        return 1
    per_rank = []
    for path in paths:
        with open(path) as f:
            per_rank.append(json.load(f))
        os.remove(path)
    os.rmdir(tmp)
    json.dump({"configs": [{"ranks": [per_rank[r][i] for r in range(world)]} for i in range(len(jobs))]},
              sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
