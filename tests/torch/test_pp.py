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

# (overrides of test_against_torch's BASE, pipeline settings); at most 4 (CI budget).
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


def main(argv):
    actsim = argv[1]
    only = argv[argv.index("--only") + 1] if "--only" in argv else None
    if not os.path.exists(PYTHON) or subprocess.run(
            [PYTHON, "-c", "import torch.distributed.pipelining"], capture_output=True).returncode != 0:
        print("skipped: no torch in .venv")
        return 77
    configs = [(o, p) for o, p in CONFIGS if only is None or only in label(o, p)]
    # One measure_pp.py run per data-parallel degree (its ranks: PP x dp processes).
    measured = {}
    for dp in sorted({p.get("dp", 1) for _, p in configs}):
        groups = []
        for i, (over, par) in enumerate(configs):
            if par.get("dp", 1) != dp:
                continue
            cfg = dict(BASE, **over)
            if groups:
                groups.append("--")
            groups += [f"{k}={v}" for k, v in cfg.items()] + [f"{k}={v}" for k, v in par.items()]
        p = subprocess.run([PYTHON, MEASURE_PP] + groups, capture_output=True, text=True)
        if p.returncode != 0:
            print(p.stderr[-4000:])
            return 1
        done = iter(json.loads(p.stdout)["configs"])
        for i, (over, par) in enumerate(configs):
            if par.get("dp", 1) == dp:
                measured[i] = next(done)
    failures = 0
    for i, (over, par) in enumerate(configs):
        m = measured[i]
        cfg = dict(BASE, **over)
        a = run_json([actsim, "simulate", "--json", "--no-fit"] + actsim_sets(cfg, par))
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
