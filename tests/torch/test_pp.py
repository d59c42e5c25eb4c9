"""Byte-exact cross-check of actsim's per-stage simulation of pipeline parallelism against real
torch.distributed.pipelining on the CPU (issue 13).

usage: test_pp.py ACTSIM_BINARY [--only SUBSTRING]

Runs every configuration below as 2 pipeline stages on 2 ranks (2 chunks each, interleaved) (processes joined by gloo on
localhost, tests/torch/measure_pp.py: all configurations in the same two processes, one after
another; with dp = 2, 4 ranks, each stage in DDP on its dp group, in a second run), each rank measured as tests/torch/measure.py measures one process (the CPU profiler's
allocation trace of a steady step), and requires each stage's figures to equal those of
`actsim simulate --json` (runtime.profile = torch2-cpu) for its rank class (`ranks`, one per
stage, spanning its dp ranks), to the byte. Exits 77 (skipped) when .venv's python cannot import torch.
"""
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from figures import figure_pairs  # noqa: E402
from test_against_torch import BASE, MODEL_KEYS, TRAIN_KEYS, run_json  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(HERE))
PYTHON = os.path.join(ROOT, ".venv", "bin", "python")
MEASURE_PP = os.path.join(HERE, "measure_pp.py")
PP = 2

# (overrides of test_against_torch's BASE, pipeline settings); at most 4 on 2 ranks and one pp x dp (CI budget).
CONFIGS = [
    ({}, {"pp_schedule": "1f1b", "microbatches": 4}),
    ({"dropout": 0.1}, {"pp_schedule": "gpipe", "microbatches": 3}),
    ({"family": "llama", "dtype": "bf16", "n_kv_heads": 2}, {"pp_schedule": "1f1b", "microbatches": 3}),
    # ScheduleInterleaved1F1B: 2 chunks per rank (virtual stages 0, 2 and 1, 3) of one block each
    ({"n_layers": 4}, {"pp_schedule": "interleaved", "chunks": 2, "microbatches": 4}),
    # ppdp: pp 2 x dp 2 on 4 ranks, each stage's module in DDP on its dp group (measure_pp.py);
    # the other pp x dp configurations are checked by hand (README, pipeline parallelism)
    ({}, {"pp_schedule": "1f1b", "microbatches": 3, "dp": 2}),
]
DP_KEYS = {"bucket_cap_mb": "parallel.bucket_cap_mb", "gradient_as_bucket_view": "parallel.gradient_as_bucket_view"}


def actsim_sets(cfg, par):
    sets = ["--set", "runtime.profile=torch2-cpu", "--set", f"parallel.pp={PP}",
            "--set", f"parallel.microbatches={par['microbatches']}",
            "--set", "parallel.pp_schedule=" + (f"interleaved:{par['chunks']}" if par["pp_schedule"] == "interleaved"
                                                 else par["pp_schedule"])]
    for k in MODEL_KEYS:
        if k in cfg:
            sets += ["--set", f"model.{k}={cfg[k]}"]
    for k in TRAIN_KEYS:
        sets += ["--set", f"training.{k}={cfg[k]}"]
    if par.get("dp", 1) > 1:  # ppdp
        sets += ["--set", f"parallel.dp={par['dp']}"]
        for k, key in DP_KEYS.items():
            if k in par:
                v = par[k] if k != "gradient_as_bucket_view" else ("true" if par[k] else "false")
                sets += ["--set", f"{key}={v}"]
    return sets


def label(over, par):
    return ",".join(f"{k}={v}" for k, v in list(over.items()) + list(par.items()))


def measure(configs):
    """measure_pp.py's result for each of `configs` (one run per data-parallel degree: PP x dp
    processes), or None when a run failed."""
    measured = {}
    for dp in sorted({p.get("dp", 1) for _, p in configs}):
        groups = []
        for over, par in configs:
            if par.get("dp", 1) != dp:
                continue
            if groups:
                groups.append("--")
            groups += [f"{k}={v}" for k, v in dict(BASE, **over).items()] + [f"{k}={v}" for k, v in par.items()]
        p = subprocess.run([PYTHON, MEASURE_PP] + groups, capture_output=True, text=True)
        if p.returncode != 0:
            print(p.stderr[-4000:])
            return None
        done = iter(json.loads(p.stdout)["configs"])
        for i, (over, par) in enumerate(configs):
            if par.get("dp", 1) == dp:
                measured[i] = next(done)
    return [measured[i] for i in range(len(configs))]


def compare(a, m):
    """Every measured rank against its rank class in actsim's JSON: the mismatches."""
    bad = []
    for r in m["ranks"]:
        stage, d = r["coordinates"]["pp"], r["coordinates"]["dp"]
        cls = [c for c in a["ranks"] if c["coordinates"]["pp"] == stage
               and c["coordinates"]["dp"][0] <= d <= c["coordinates"]["dp"][1]]
        if len(cls) != 1:
            bad.append(f"rank {r['rank']} (stage {stage}) is in {len(cls)} rank classes")
            continue
        pairs = figure_pairs(cls[0]["figures"], r, inputs=False)
        bad += [f"rank {r['rank']} (stage {stage}) {n}: actsim {x} != torch {y}" for n, x, y in pairs if x != y]
        if r["inconsistent_totals"]:
            bad.append(f"rank {r['rank']}: the profiler's totals are inconsistent ({r['inconsistent_totals']})")
    return bad


def main(argv):
    actsim = argv[1]
    only = argv[argv.index("--only") + 1] if "--only" in argv else None
    if not os.path.exists(PYTHON) or subprocess.run(
            [PYTHON, "-c", "import torch.distributed.pipelining"], capture_output=True).returncode != 0:
        print("skipped: no torch in .venv")
        return 77
    configs = [(o, p) for o, p in CONFIGS if only is None or only in label(o, p)]
    measured = measure(configs)
    if measured is None:
        return 1
    failures = 0
    for (over, par), m in zip(configs, measured):
        cfg = dict(BASE, **over)
        a = run_json([actsim, "simulate", "--json", "--no-fit"] + actsim_sets(cfg, par))
        bad = compare(a, m)
        again = 0
        while bad and par.get("dp", 1) > 1 and again < 2:
            # ppdp: test_parallel.py's Note [A rank measured again]: DDP's gloo collectives can
            # leave one rank off by one constant at every phase (a warm-up tensor freed by gloo's
            # worker thread, out of the profiler's sight; its identical dp peer matches). A wrong
            # rule repeats, a race does not: measured again in fresh processes, at most twice.
            again += 1
            print(f"         measured again ({again}): {bad[0]}")
            twice = measure([(over, par)])
            bad = compare(a, twice[0]) if twice else ["measuring again failed"]
        worst = a["ranks"][a["peak_rank_class"]]["figures"]["peak"]
        if a["peak"] != worst:
            bad.append("top-level peak is not the peak rank class's")
        status = "ok" if not bad else "MISMATCH"
        print(f"{status:8} {label(over, par)}: peaks {[c['figures']['peak']['bytes'] for c in a['ranks']]} bytes per stage")
        for b in bad:
            print("         " + b)
        failures += bool(bad)
    print(f"{len(configs) - failures}/{len(configs)} configurations byte-exact on {PP} pipeline stages (every rank)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
