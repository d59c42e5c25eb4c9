#!/usr/bin/python3
"""Measure one rank of a pipeline-parallel training step with real torch.distributed.pipelining
on the CPU (issue 13).

The reference model (shared/reference/models.py) is built whole on every rank (same seed, same
weights) and cut into stages as actsim cuts it: the embedding (gpt2: wte, wpe, dropout) on the
first stage, the blocks split evenly, the final norm and the head on the last, whose output is the
logits; the loss is the schedule's loss_fn, the reference's cross-entropy. Each stage is a manual
`PipelineStage` on its own rank (gloo on localhost, ranks as processes: tests/torch/measure_dist.py's
harness, imported), driven by `ScheduleGPipe`, `Schedule1F1B` or `ScheduleInterleaved1F1B` (V
stages per rank, each cut from its own copy of the model, as torchtitan builds one model per
stage) over `microbatches` micro-batches of `batch_size` each (the whole batch, microbatches x
batch_size rows, is what `step` splits), as torchtitan drives it: `step(idx)` on the first stage,
`step(target=targets)` on the last, `step()` between, `return_outputs=False`, the default
`scale_grads=True`; then the optimizer's step and `zero_grad(set_to_none=True)`.

Each rank is measured as measure.py measures one process: everything is created under the CPU
profiler, two warm-up steps (the first initialises the stage: shape inference, receive buffers;
the optimizer's state exists after it), then one steady step whose allocation trace gives the
live bytes at the step's boundaries (step start; after the stage's last forward; after `step`
returns, i.e. every backward, `scale_grads` and the losses dropped; after the optimizer; after
zero_grad) and the peak, each allocation's phase being that of the action running it (forward:
`forward_one_chunk` and the loss; backward: `backward_one_chunk`; else the phase around it).

ppdp: with dp=D > 1 the P x D ranks form torchtitan's mesh ("pp", "dp"): rank = stage x D + d; each
stage's module (each chunk's) is wrapped in DistributedDataParallel on its dp group (the D ranks
of its stage; measure_dist's keys bucket_cap_mb and gradient_as_bucket_view) and the
PipelineStage runs on its pp group (the P ranks of its d). The schedule drives DDP as
torch.distributed.pipelining does: every forward and every backward but the stage's last under
no_sync, the last with the reducer prepared (its buckets all-reduced, then copied back).

Usage: measure_pp.py [KEY=VALUE ...] [-- KEY=VALUE ... ] with measure.py's keys plus
pp_schedule=gpipe|1f1b|interleaved, microbatches=M, chunks=V (interleaved: V stages per rank,
virtual stage c * P + rank), pp=P (default 2) and dp=D (default 1), every configuration the same
P and D. Prints {"configs": [{"ranks": [rank 0's result, ...]}, ...]}, ranks in mesh order.
"""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import measure  # noqa: E402
import measure_dist  # noqa: E402

PP = 2
# measure_dist's argument split knows these keys too. Its "dp" is the world size: main() turns
# dp=D into dp=P x D for it, and measure_one reads the data-parallel degree back as dp / pp.
PP_DEFAULTS = {"pp_schedule": "1f1b", "microbatches": 2, "chunks": 1, "pp": PP}
measure_dist.DIST_DEFAULTS.update(PP_DEFAULTS)
measure_dist.DIST_DEFAULTS["dp"] = PP


def stage_module(torch, model, family, stage, n_stages):
    """Stage `stage` of the reference model: blocks [stage L/P, (stage + 1) L/P). The module holds
    its parts only (not the whole model: the other stages' parameters are freed)."""
    import torch.nn as nn
    per = len(model.blocks) // n_stages
    first, last = stage == 0, stage == n_stages - 1
    st = _stage_class(torch)(family, first, last)
    if first:
        for name in (("wte", "wpe", "drop") if family == "gpt2" else ("tok_embeddings",)):
            setattr(st, name, getattr(model, name))
    st.blocks = nn.ModuleList(list(model.blocks)[stage * per:(stage + 1) * per])
    if last:
        for name in (("ln_f", "lm_head") if family == "gpt2" else ("norm", "lm_head")):
            setattr(st, name, getattr(model, name))
    return st


_STAGE = []


def _stage_class(torch):
    if _STAGE:
        return _STAGE[0]
    import torch.nn as nn

    class Stage(nn.Module):
        """The reference's forward, restricted to one stage's parts."""

        def __init__(self, family, first, last):
            super().__init__()
            self.family, self.first, self.last = family, first, last

        def forward(self, x):
            if self.family == "gpt2":
                if self.first:
                    b, t = x.size()
                    pos = torch.arange(0, t, dtype=torch.long, device=x.device)
                    x = self.drop(self.wte(x) + self.wpe(pos))
                for block in self.blocks:
                    x = block(x)
                if self.last:
                    x = self.lm_head(self.ln_f(x))
                return x
            T = x.shape[1]
            token_positions = torch.arange(T, device=x.device)
            if self.first:
                x = self.tok_embeddings(x)
            for block in self.blocks:
                x = block(x, token_positions)
            if self.last:
                x = self.lm_head(self.norm(x))
            return x
    _STAGE.append(Stage)
    return Stage


def loss_fn_for(torch, family):
    import torch.nn.functional as F

    def loss_fn(logits, targets):  # the reference's loss, on the last stage's output
        if family == "gpt2":
            return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
    return loss_fn


def measure_one(torch, rank, world, dist, rest):
    """One configuration on this rank (stage `rank`, and `rank` + P, ... interleaved): measure.py's
    figures of the steady step."""
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B
    from torch.profiler import ProfilerActivity, profile
    cfg, models = measure_dist.load_config(torch, rest)
    m = dist["microbatches"]
    sched_cls = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B, "interleaved": ScheduleInterleaved1F1B}[dist["pp_schedule"]]
    V = dist["chunks"]
    record_function = measure.profiler_range(torch)
    P = dist["pp"]
    D = world // P  # ppdp: the data-parallel degree
    stage_rank, dp_rank = divmod(rank, D)  # torchtitan's mesh ("pp", "dp"), row-major
    pp_group = dp_group = None
    if D > 1:  # every rank creates every group, in the same order
        for d in range(D):
            g = torch.distributed.new_group([s * D + d for s in range(P)])
            pp_group = g if d == dp_rank else pp_group
        for s in range(P):
            g = torch.distributed.new_group([s * D + d for d in range(D)])
            dp_group = g if s == stage_rank else dp_group
    first, last = stage_rank == 0, stage_rank == P - 1  # this rank holds stage 0 / the last stage
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                 with_stack=False) as prof:
        with record_function("actsim::setup"):
            whole = dict(cfg, batch_size=cfg["batch_size"] * m)
            model, idx, targets = measure.build(torch, models, whole)
            # virtual stage c * world + rank for chunk c (torch's and Megatron-LM's interleaving),
            # each chunk cut from its own copy of the model (same seed), as torchtitan builds one
            # model per stage: no module (llama's shared RoPE tables) shared between chunks
            mods = []
            for c in range(V):
                if c:
                    model = measure.build(torch, models, whole)[0]
                mods.append(stage_module(torch, model, cfg["family"], c * P + stage_rank, P * V))
            del model
            idx = idx if first else None  # the whole batch's inputs, where the stage reads them
            targets = targets if last else None
            run_mods = mods
            if D > 1:  # ppdp: each chunk's module data-parallel on its stage's dp group
                # broadcast_buffers=False: the schedule runs every forward under no_sync, so DDP
                # broadcasts its buffers only in the first forward it ever runs (the stage's shape
                # inference, outside no_sync): never in a steady step. That broadcast hangs
                # measure_dist's broadcast_coalesced (its flat copy's use count never drops
                # inside the shape inference), hence off.
                from torch.nn.parallel import DistributedDataParallel as DDP
                run_mods = [DDP(mod, process_group=dp_group, bucket_cap_mb=dist["bucket_cap_mb"], broadcast_buffers=False,
                                gradient_as_bucket_view=bool(dist["gradient_as_bucket_view"])) for mod in mods]
            stages = [PipelineStage(mod, c * P + stage_rank, P * V, torch.device("cpu"), group=pp_group)
                      for c, mod in enumerate(run_mods)]
            if D > 1:
                # The stage's shape inference runs its module's forward outside no_sync, and the
                # reducer then records the parameters twice before its first rebuild (torch 2.13:
                # "rebuilt parameter indices size is not same as original model parameters size",
                # in the first step's first forward): run it under no_sync, as every other forward.
                for st in stages:
                    st._compute_outputs = _no_sync_outputs(st._compute_outputs)
            if V == 1:
                sched = sched_cls(stages[0], n_microbatches=m, loss_fn=loss_fn_for(torch, cfg["family"]))
            else:
                sched = sched_cls(stages, n_microbatches=m, loss_fn=loss_fn_for(torch, cfg["family"]))
            module = torch.nn.ModuleList(mods)
            opt = measure.make_optimizer(torch, cfg, [p for p in module.parameters() if p.requires_grad])
        # Every action of the stages in a profiler range named after its phase.

        def ranged(name, fn):
            def run(*a, **k):
                with record_function(name):
                    return fn(*a, **k)
            return run
        for stage in stages:
            stage.forward_one_chunk = ranged("actsim::F", stage.forward_one_chunk)
            stage.backward_one_chunk = ranged("actsim::B", stage.backward_one_chunk)
        sched._maybe_compute_loss = ranged("actsim::F", sched._maybe_compute_loss)

        def step(measured):
            def run():
                if first:
                    sched.step(idx, return_outputs=False)
                elif last:
                    sched.step(target=targets, return_outputs=False)
                else:
                    sched.step(return_outputs=False)
            if not measured:
                run()
                opt.step()
                opt.zero_grad(set_to_none=True)
                return
            with record_function("actsim::pipeline"):
                run()
            with record_function("actsim::optimizer"):
                opt.step()
            with record_function("actsim::zero_grad"):
                opt.zero_grad(set_to_none=True)

        with record_function("actsim::warmup"):
            step(False)
            step(False)
        step(True)
        torch.distributed.barrier()  # the peer's last receive is done before its buffers go
    candidates = set().union(*(measure_dist.gloo_race_candidates(m) for m in run_mods)) if D > 1 else set()
    result = analyse(torch, prof, cfg, module, opt, [t for t in (idx, targets) if t is not None], candidates)
    result["rank"] = rank
    result["coordinates"] = {"pp": stage_rank, "dp": dp_rank}
    result["parallel"] = dict(dist, dp=D)
    return result


def _no_sync_outputs(fn):
    def run(*args, module, **kwargs):
        with module.no_sync():
            return fn(*args, module=module, **kwargs)
    return run


def pp_flatten(candidates):
    """ppdp: measure_dist.make_flatten (the bytes gloo's worker thread freed, which the profiler
    never sees) with DDP's forward running inside the stage's forward_one_chunk (actsim::F) and
    the schedule's own ranges ("Forward 0", the interleaved runtime's "PP:1F0"): the chain it
    compares is the allocation's, those ranges left out."""
    plain = measure.op_chain
    keep = {"aten::empty", "DistributedDataParallel.forward", "actsim::warmup"}

    def chain(node):
        return [n for n in plain(node) if n in keep]
    flatten = measure_dist.make_flatten(measure.flatten, candidates)

    def run(tree):
        measure.op_chain = chain
        try:
            return flatten(tree)
        finally:
            measure.op_chain = plain
    return run


def analyse(torch, prof, cfg, module, opt, inputs, candidates=frozenset()):
    flatten = pp_flatten(candidates) if candidates else measure.flatten
    nodes = list(flatten(prof.profiler.kineto_results.experimental_event_tree()))
    ranges = {}  # name -> [(start, end)]
    for n in nodes:
        if n.name.startswith("actsim::") and "Allocation" not in str(n.tag):
            ranges.setdefault(n.name[len("actsim::"):], []).append((n.start_time_ns, n.end_time_ns))
    for name in ("setup", "warmup", "pipeline", "optimizer", "zero_grad"):
        if name not in ranges:
            raise RuntimeError("profiler lost the range %s" % name)
    (t0, t_bwd_end), = ranges["pipeline"]
    (_, t_opt_end), = ranges["optimizer"]
    (_, t_end), = ranges["zero_grad"]
    actions = sorted([(s, e, "forward") for s, e in ranges.get("F", []) if s >= t0]
                     + [(s, e, "backward") for s, e in ranges.get("B", []) if s >= t0])
    t_fwd_end = max(e for s, e, p in actions if p == "forward")

    def phase_of(t):
        if t < t0:
            return "before"
        for s, e, p in actions:
            if s <= t <= e:
                return p
        if t <= t_bwd_end:
            return "pipeline"  # the schedule's own code between actions (sends, receives)
        if t <= t_opt_end:
            return "optimizer"
        return "zero_grad" if t <= t_end else "after"

    mem = sorted((n for n in nodes if "Allocation" in str(n.tag)), key=lambda n: n.start_time_ns)
    base = mem[0].extra_fields.total_allocated - mem[0].extra_fields.alloc_size if mem else 0
    events, total, inconsistent = [], 0, 0
    for n in mem:
        f = n.extra_fields
        if f.total_allocated - base != total + f.alloc_size:
            inconsistent += 1
        total = f.total_allocated - base
        events.append({"t": n.start_time_ns, "phase": phase_of(n.start_time_ns), "bytes": f.alloc_size,
                       "total": total, "ops": measure.op_chain(n)})

    def total_at(t, inclusive):
        value = 0
        for e in events:
            if e["t"] > t or (e["t"] == t and not inclusive):
                break
            value = e["total"]
        return value

    live = {
        "step_start": total_at(t0, False),
        "end_forward": total_at(t_fwd_end, True),
        "end_backward": total_at(t_bwd_end, True),
        "end_optimizer": total_at(t_opt_end, True),
        "after_zero_grad": total_at(t_end, True),
    }
    peak = None
    step = [e for e in events if t0 <= e["t"] <= t_end]
    for i, e in enumerate(step):
        if peak is None or e["total"] > peak["bytes"]:
            peak = {"bytes": e["total"], "phase": e["phase"], "op": e["ops"][0] if e["ops"] else None, "index": i}
    params_bytes, _ = measure.distinct_storage_bytes(module.parameters())
    buffers_bytes, _ = measure.distinct_storage_bytes(module.buffers())
    opt_bytes, _ = measure.distinct_storage_bytes(measure.optimizer_tensors(torch, opt))
    inputs_bytes, _ = measure.distinct_storage_bytes(inputs)
    result = {
        "config": cfg,
        "live_bytes": live,
        "peak": peak,
        "params_bytes": params_bytes,
        "buffers_bytes": buffers_bytes,
        "optimizer_bytes": opt_bytes,
        "inputs_bytes": inputs_bytes,
        "n_step_events": len(step),
        "inconsistent_totals": inconsistent,
    }
    if candidates:
        result["gloo_strays"] = list(measure_dist.STRAYS)
    if os.environ.get("ACTSIM_DIST_TRACE"):
        result["events"] = [{k: e[k] for k in ("phase", "bytes", "total", "ops")} for e in step]
    return result


def rank_main(rank, world, port, jobs, out_path):
    """measure_dist's rank process, measuring pipeline stages instead of data-parallel ranks."""
    measure_dist.measure_one = measure_one
    measure_dist.rank_main(rank, world, port, jobs, out_path)


def main(argv):
    # ppdp: dp=D means P x D ranks for measure_dist (its dp is the world size)
    groups, cur = [], []
    for a in argv + ["--"]:
        if a != "--":
            cur.append(a)
            continue
        kv = dict(x.partition("=")[::2] for x in cur if "=" in x)
        P, D = int(kv.get("pp", PP)), int(kv.get("dp", 1))
        groups += [x for x in cur if not x.startswith("dp=")] + ["dp=%d" % (P * D), "--"]
        cur = []
    argv = groups[:-1]
    measure_dist.rank_main, plain = rank_main, measure_dist.rank_main
    try:
        return measure_dist.main(argv)
    finally:
        measure_dist.rank_main = plain


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
