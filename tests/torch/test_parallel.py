"""Byte-exact cross-check of actsim's per-rank simulation of data parallelism against real
torch.distributed on the CPU (issue 13).

usage: test_parallel.py ACTSIM_BINARY [--only SUBSTRING] [--all-dtensor]

Runs every configuration below in 2 ranks (processes joined by the gloo backend on localhost,
tests/torch/measure_dist.py: all configurations in the same two processes, one after another),
each rank measured as tests/torch/measure.py measures one process (the CPU profiler's allocation
trace of a steady-state step: the third, after DDP has rebuilt its buckets), and requires each
rank's figures to equal those of `actsim simulate --json` (runtime.profile = torch2-cpu) for its
rank class, to the byte. Exits 77 (skipped) when .venv's python cannot import torch.
The DTensor block below does the same for tensor parallelism (measure_dtensor.py, tp = 2).
"""
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from figures import figure_pairs  # noqa: E402
from test_against_torch import BASE, MODEL_KEYS, OTHER_KEYS, TRAIN_KEYS, run_json  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(HERE))
PYTHON = os.path.join(ROOT, ".venv", "bin", "python")
MEASURE_DIST = os.path.join(HERE, "measure_dist.py")
DP = 2

# (overrides of test_against_torch's BASE, parallel settings); at most 8 (CI budget: 6 DDP, 2 zero_redundancy).
CONFIGS = [
    ({}, {"parallel": "ddp"}),
    ({"dropout": 0.1}, {"parallel": "ddp", "gradient_as_bucket_view": 1}),
    ({"family": "llama", "dtype": "bf16", "n_kv_heads": 2}, {"parallel": "ddp"}),
    ({"family": "llama", "optimizer_impl": "foreach"}, {"parallel": "ddp", "gradient_as_bucket_view": 1}),
    # more than the 1 MiB first bucket: several buckets of 1 MiB
    ({"d_model": 256, "n_heads": 4, "n_layers": 2}, {"parallel": "ddp", "bucket_cap_mb": 1.0}),
    # accumulation under no_sync (the last of 3 micro-batches reduces), autocast, frozen parameters
    ({"family": "llama", "autocast": "bf16", "trainable": "frozen:tok_embeddings,blocks.0", "grad_accum_steps": 3},
     {"parallel": "ddp"}),
    # zero_redundancy: torch's ZeroRedundancyOptimizer over DDP (parallel.zero_impl = "torch"); the
    # ranks differ (the greedy partition), each compared with its own rank class
    ({}, {"parallel": "zero1"}),
    ({"family": "llama", "autocast": "bf16", "trainable": "frozen:tok_embeddings,blocks.0", "grad_accum_steps": 3,
      "optimizer_impl": "foreach"}, {"parallel": "zero1"}),
]


def actsim_sets(cfg, par):
    sets = ["--set", "runtime.profile=torch2-cpu", "--set", f"parallel.dp={DP}"]
    for k in MODEL_KEYS:
        if k in cfg:
            sets += ["--set", f"model.{k}={cfg[k]}"]
    for k in TRAIN_KEYS:
        sets += ["--set", f"training.{k}={cfg[k]}"]
    for k, key in OTHER_KEYS.items():
        if k in cfg:
            sets += ["--set", f"{key}={cfg[k]}"]
    if "no_sync" in par:
        sets += ["--set", f"parallel.no_sync={'true' if par['no_sync'] else 'false'}"]
    if "bucket_cap_mb" in par:
        sets += ["--set", f"parallel.bucket_cap_mb={par['bucket_cap_mb']}"]
    if par.get("gradient_as_bucket_view"):
        sets += ["--set", "parallel.gradient_as_bucket_view=true"]
    if par.get("parallel") == "zero1":  # zero_redundancy: torch's ZeroRedundancyOptimizer
        sets += ["--set", "parallel.sharding=zero1", "--set", "parallel.zero_impl=torch"]
    return sets


def label(over, par):
    return ",".join(f"{k}={v}" for k, v in list(over.items()) + list(par.items()))


# ---- issue 13: DTensor tensor and sequence parallelism (measure_dtensor.py, lower_dtensor.cpp) ----
MEASURE_DTENSOR = os.path.join(HERE, "measure_dtensor.py")
TP = 2
# (overrides of test_against_torch's BASE, sp): torchtitan's plan on the reference llama, the
# vocabulary divisible by TP. Two run in CI (about 10 s each with the processes' start); the other
# two with --all-dtensor.
DTENSOR_CONFIGS = [
    ({"family": "llama", "vocab_size": 96}, 0),  # the peak in loss_parallel's backward
    # 16-bit logits (loss_parallel's fp32 copy: the forward peak), grouped-query attention, sp
    ({"family": "llama", "vocab_size": 96, "dtype": "bf16", "n_kv_heads": 2, "optimizer_impl": "foreach"}, 1),
]
DTENSOR_MORE = [
    ({"family": "llama", "vocab_size": 96}, 1),
    ({"family": "llama", "vocab_size": 96, "dtype": "bf16", "n_kv_heads": 2}, 0),
]


def dtensor_label(over, sp):
    return ",".join(["dtensor", f"sp={sp}"] + [f"{k}={v}" for k, v in over.items()])


def measure_dtensor(configs):
    groups = []
    for over, sp in configs:
        if groups:
            groups.append("--")
        groups += [f"{k}={v}" for k, v in dict(BASE, **over).items()] + [f"tp={TP}", f"sp={sp}"]
    p = subprocess.run([PYTHON, MEASURE_DTENSOR] + groups, capture_output=True, text=True)
    if p.returncode != 0:
        print(p.stderr[-4000:])
        return None
    return json.loads(p.stdout)["configs"]


def raced(r):
    """Did gloo's worker thread free an allocation of this rank (so that the profiler, which
    listens on the rank's thread, never saw the free)? Signs: an allocation alive at step start
    that is no parameter, buffer, optimizer state or input; one alive after zero_grad besides the
    loss. (One whose pointer was handed out again while it was alive, such as gloo's clone of a
    reduce-scatter's input, is a stray that measure_dist's flatten takes out of the trace.)"""
    extra = [e for e in r["after_zero_grad_extra"] if e["bytes"] > 4]
    return bool(r["step_start_other"] or r["inconsistent_totals"] or extra)


def check_dtensor(actsim, only, more=False):
    """Every rank of each DTENSOR_CONFIGS entry (and DTENSOR_MORE's with `more`) against
    `actsim simulate --json` with parallel.tp_impl = "dtensor"; returns (configurations, failures)."""
    configs = [(o, sp) for o, sp in DTENSOR_CONFIGS + (DTENSOR_MORE if more else [])
               if only is None or only in dtensor_label(o, sp)]
    if not configs:
        return 0, 0
    measured = measure_dtensor(configs)
    if measured is None:
        return len(configs), len(configs)
    # A configuration none of whose ranks has a complete trace (gloo's race, below) is measured
    # once more.
    again = [i for i, m in enumerate(measured) if all(raced(r) for r in m["ranks"])]
    if again:
        print(f"measuring {len(again)} configuration(s) again: gloo's worker thread freed allocations of every rank")
        remeasured = measure_dtensor([configs[i] for i in again]) or []
        for i, m in zip(again, remeasured):
            measured[i] = m
    failures = 0
    for (over, sp), m in zip(configs, measured):
        cfg = dict(BASE, **over)
        sets = actsim_sets(cfg, {})
        sets[sets.index(f"parallel.dp={DP}")] = f"parallel.tp={TP}"
        sets += ["--set", "parallel.tp_impl=dtensor", "--set", f"parallel.sp={'true' if sp else 'false'}"]
        a = run_json([actsim, "simulate", "--json", "--no-fit"] + sets)
        bad, left_out = [], []
        for rank, r in enumerate(m["ranks"]):
            # Every rank is the same rank class: a rank whose trace gloo's race made incomplete
            # is left out; one complete rank is needed.
            if raced(r):
                left_out.append(rank)
                continue
            pairs = figure_pairs(a, r, inputs=False)
            bad += [f"rank {rank} {n}: actsim {x} != torch {y}" for n, x, y in pairs if x != y]
        if len(left_out) == len(m["ranks"]):
            bad.append("no rank's trace is complete (gloo's worker thread freed what the ranks allocated)")
        status = "ok" if not bad else "MISMATCH"
        print(f"{status:8} {dtensor_label(over, sp)}: peak {a['peak']['bytes']} bytes per rank")
        if left_out:
            print(f"         ranks {left_out} left out: gloo's worker thread freed an allocation of theirs")
        for b in bad:
            print("         " + b)
        failures += bool(bad)
    return len(configs), failures
# ---- end DTensor ----


def measure_ddp(configs):
    """Each configuration measured on DP gloo ranks (measure_dist.py, all in the same processes, one
    after another); None (stderr printed) when the measurement failed."""
    groups = []
    for over, par in configs:
        cfg = dict(BASE, **over)
        if groups:
            groups.append("--")
        groups += [f"{k}={v}" for k, v in cfg.items()] + [f"{k}={v}" for k, v in par.items()]
    p = subprocess.run([PYTHON, MEASURE_DIST, f"dp={DP}"] + groups, capture_output=True, text=True)
    if p.returncode != 0:
        print(p.stderr[-4000:])
        return None
    return json.loads(p.stdout)["configs"]


def compare_ddp(a, m):
    """What differs between actsim's JSON `a` and the measured ranks `m` of one configuration."""
    bad = []

    def class_of(rank):  # zero_redundancy: a class lists its ranks (dp_ranks); else a range
        for c in a["ranks"]:
            co = c["coordinates"]
            if rank in co.get("dp_ranks", range(co["dp"][0], co["dp"][1] + 1)):
                return c
        return None
    for rank, r in enumerate(m["ranks"]):
        cls = class_of(rank)
        if cls is None:
            bad.append(f"rank {rank} is in no rank class")
            continue
        pairs = figure_pairs(cls["figures"], r, inputs=False)
        bad += [f"rank {rank} {n}: actsim {x} != torch {y}" for n, x, y in pairs if x != y]
        if r["inconsistent_totals"]:
            bad.append(f"rank {rank}: the profiler's totals are inconsistent ({r['inconsistent_totals']})")
    if a["peak"] != a["ranks"][a["peak_rank_class"]]["figures"]["peak"]:
        bad.append("top-level peak is not the peak rank class's")
    return bad


def main(argv):
    actsim = argv[1]
    only = argv[argv.index("--only") + 1] if "--only" in argv else None
    if not os.path.exists(PYTHON) or subprocess.run([PYTHON, "-c", "import torch.distributed"],
                                                    capture_output=True).returncode != 0:
        print("skipped: no torch in .venv")
        return 77
    configs = [(o, p) for o, p in CONFIGS if only is None or only in label(o, p)]
    measured = measure_ddp(configs)
    if measured is None:
        return 1
    failures = 0
    for (over, par), m in zip(configs, measured):
        cfg = dict(BASE, **over)
        a = run_json([actsim, "simulate", "--json", "--no-fit"] + actsim_sets(cfg, par))
        bad = compare_ddp(a, m)
        again = 0
        while bad and again < 2:
            # Note [A rank measured again]: on a loaded machine one rank's figures were seen, about
            # once in ten runs, to be off by one constant at every phase (118,400 B on rank 1 of the
            # first configuration; once 126 KB in another), most likely a warm-up tensor that gloo's
            # worker thread freed out of the profiler's sight. A wrong rule gives the same figures
            # every time; a race does not. So
            # a mismatching configuration is measured again in fresh processes (twice in a row there,
            # the second counted), at most twice, and must then match on every rank.
            again += 1
            print(f"         measured again ({again}): {bad[0]}")
            twice = measure_ddp([(over, par), (over, par)])
            bad = compare_ddp(a, twice[1]) if twice else ["measuring again failed"]
        status = "ok" if not bad else "MISMATCH"
        print(f"{status:8} {label(over, par)}: peak {a['peak']['bytes']} bytes per rank")
        for b in bad:
            print("         " + b)
        failures += bool(bad)
    print(f"{len(configs) - failures}/{len(configs)} configurations byte-exact on {DP} ranks")
    n_dt, failed_dt = check_dtensor(actsim, only, "--all-dtensor" in argv)  # issue 13: DTensor
    if n_dt:
        print(f"{n_dt - failed_dt}/{n_dt} DTensor configurations byte-exact on {TP} ranks")
    return 1 if failures or failed_dt else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
