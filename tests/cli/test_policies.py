#!/usr/bin/python3
"""End-to-end tests of checkpointing on the command line (issue 3): bad policies and bad fit/sweep
options, and a small sweep's CSV and JSON with a correct Pareto column.

Usage: /usr/bin/python3 tests/cli/test_policies.py PATH/TO/actsim

Bad input: exit code 2, exactly one line on stderr starting with "actsim: error:" that names the
key or option, nothing on stdout, no --out file. Prints "N passed, M failed"; exits 1 on failure.
"""
import csv
import json
import os
import subprocess
import sys
import tempfile

TIMEOUT_S = 120
SMALL = ["--set", "model.family=llama", "--set", "model.n_layers=2", "--set", "model.d_model=64",
         "--set", "model.n_heads=4", "--set", "model.vocab_size=128", "--set", "model.seq_len=32"]


class Runner:
    def __init__(self, actsim):
        self.actsim = actsim
        self.passed = 0
        self.failed = 0

    def run(self, args):
        p = subprocess.run([self.actsim] + args, capture_output=True, text=True, timeout=TIMEOUT_S)
        return p.returncode, p.stdout, p.stderr

    def check(self, name, problems):
        if problems:
            self.failed += 1
            print(f"FAIL {name}")
            for p in problems:
                print(f"     {p}")
        else:
            self.passed += 1
            print(f"ok   {name}")

    def expect_error(self, name, args, must_name, out_path=None):
        problems = []
        try:
            rc, out, err = self.run(args)
        except subprocess.TimeoutExpired:
            self.check(name, [f"timed out after {TIMEOUT_S} s"])
            return
        if rc != 2:
            problems.append(f"exit code {rc}, expected 2")
        lines = err.splitlines()
        if len(lines) != 1 or not err.endswith("\n"):
            problems.append(f"stderr is not exactly one line: {err!r}")
        elif not lines[0].startswith("actsim: error:"):
            problems.append(f"stderr does not start with 'actsim: error:': {err!r}")
        for part in must_name:
            if part not in err:
                problems.append(f"stderr does not name {part!r}: {err!r}")
        if out:
            problems.append(f"stdout is not empty: {out[:200]!r}")
        if out_path and os.path.exists(out_path):
            problems.append(f"{out_path} was written")
        self.check(name, problems)


def pareto(rows):
    """Indices on the frontier: no other row has <= peak and <= time with one strictly lower."""
    on = set()
    for i, (p, t) in enumerate(rows):
        if not any(q <= p and u <= t and (q < p or u < t) for j, (q, u) in enumerate(rows) if j != i):
            on.add(i)
    return on


def main():
    r = Runner(sys.argv[1])
    tmp = tempfile.mkdtemp(prefix="actsim_policies_")
    out_csv = os.path.join(tmp, "sweep.csv")
    out_json = os.path.join(tmp, "sweep.json")

    # --set checkpoint.policy=... on simulate (and through fit and sweep, which load the same way).
    for policy, names in [("bogus", ["--set: checkpoint.policy", "bogus"]),
                          ("every:0", ["--set: checkpoint.policy", "every:0"]),
                          ("every:x", ["--set: checkpoint.policy", "every:x"]),
                          ("ops:mm,bogus", ["--set: checkpoint.policy", "bogus"]),
                          ("ops:", ["--set: checkpoint.policy"]),
                          ("budget:60 parsecs", ["--set: checkpoint.policy", "budget"]),
                          ("budget:", ["--set: checkpoint.policy"]),
                          ("budget:-1", ["--set: checkpoint.policy"])]:
        out = os.path.join(tmp, "simulate.json")
        r.expect_error(f"simulate --set checkpoint.policy={policy}",
                       ["simulate", "--set", f"checkpoint.policy={policy}", "--no-fit", "--out", out], names, out)
    r.expect_error("fit --set checkpoint.policy=every:0", ["fit", "--set", "checkpoint.policy=every:0"] + SMALL,
                   ["checkpoint.policy"])

    # A policy in a scenario file: file:line and key.
    bad_toml = os.path.join(tmp, "bad.toml")
    with open(bad_toml, "w") as f:
        f.write("[model]\nn_layers = 2\n\n[checkpoint]\npolicy = \"ops:softmaxx\"\n")
    r.expect_error("scenario file checkpoint.policy = ops:softmaxx", ["simulate", bad_toml, "--no-fit"],
                   [f"{bad_toml}:5: checkpoint.policy", "softmaxx"])

    # fit options.
    r.expect_error("fit --policies with an unknown policy", ["fit", "--policies", "none,fulll"] + SMALL,
                   ["--policies", "fulll"])
    r.expect_error("fit --policies every:0", ["fit", "--policies", "every:0"] + SMALL, ["--policies", "every:0"])
    r.expect_error("fit --policies with an empty entry", ["fit", "--policies", "none,,full"] + SMALL, ["--policies"])
    # One list syntax (util::split_list): an empty item is named, for replay as for fit.
    r.expect_error("replay --policies with a trailing comma", ["replay"] + SMALL + ["--confirm", "--policies", "full,"],
                   ["--policies full,", "empty policy"])
    r.expect_error("fit --policies budget", ["fit", "--policies", "budget:60GiB"] + SMALL, ["--policies", "budget"])
    r.expect_error("fit --bogus", ["fit", "--bogus"], ["--bogus"])

    # sweep options: nothing is written on bad input.
    for name, vary, names in [
            ("unknown key", ["--vary", "model.n_layer=2,4"], ["--vary model.n_layer=2,4", "unknown key", "model.n_layers"]),
            ("empty value list", ["--vary", "model.n_layers="], ["--vary model.n_layers=", "empty"]),
            ("empty value", ["--vary", "model.n_layers=2,,4"], ["--vary model.n_layers=2,,4", "empty"]),
            ("no =", ["--vary", "model.n_layers"], ["--vary model.n_layers"]),
            ("bad integer", ["--vary", "model.n_layers=2,two"], ["--vary model.n_layers=2,two", "model.n_layers"]),
            ("zero", ["--vary", "training.batch_size=0,1"], ["--vary training.batch_size=0,1", "training.batch_size"]),
            ("bad policy", ["--vary", "checkpoint.policy=none,every:0"], ["--vary checkpoint.policy=none,every:0"]),
            ("bad range", ["--vary", "training.batch_size=5..2"], ["--vary training.batch_size=5..2", "range"]),
            ("same key twice", ["--vary", "model.n_layers=1,2", "--vary", "model.n_layers=3"], ["--vary model.n_layers=3"]),
            ("bad combination", ["--vary", "model.n_heads=4,5", "--vary", "model.d_model=64"], ["--vary model.n_heads=4,5"]),
            # The axis blamed is the one whose value makes the run invalid, whatever key the message
            # names first (here model.n_heads, which the message puts first).
            ("value bad with the base", ["--vary", "model.n_heads=4", "--vary", "model.d_model=64,66"],
             ["--vary model.d_model=64,66", "(in the run model.n_heads=4, model.d_model=66)"]),
    ]:
        r.expect_error(f"sweep {name}", ["sweep"] + SMALL + vary + ["--out", out_csv], names, out_csv)
    r.expect_error("sweep without --vary", ["sweep"] + SMALL + ["--out", out_csv], ["--vary"], out_csv)
    r.expect_error("sweep --threads 0", ["sweep"] + SMALL + ["--vary", "model.n_layers=1,2", "--threads", "0",
                                                             "--out", out_csv], ["--threads"], out_csv)
    r.expect_error("sweep --threads x", ["sweep"] + SMALL + ["--vary", "model.n_layers=1,2", "--threads", "x",
                                                             "--out", out_csv], ["threads"], out_csv)
    r.expect_error("sweep --out with another extension", ["sweep"] + SMALL + ["--vary", "model.n_layers=1,2", "--out",
                                                                              os.path.join(tmp, "s.txt")],
                   ["--out", "s.txt"], os.path.join(tmp, "s.txt"))

    # A small sweep, as CSV and as JSON: same rows, and a correct Pareto column.
    vary = ["--vary", "training.batch_size=1..5", "--vary", 'checkpoint.policy=none,full,selective,"ops:mm,bmm",offload']
    results = {}
    for path in (out_csv, out_json):
        problems = []
        rc, out, err = r.run(["sweep"] + SMALL + vary + ["--threads", "2", "--out", path])
        if rc != 0:
            problems.append(f"exit code {rc}: {err!r}")
        elif err:
            problems.append(f"stderr is not empty (not a terminal: no progress bar): {err!r}")
        elif not os.path.exists(path):
            problems.append(f"{path} not written")
        else:
            with open(path) as f:
                if path.endswith(".csv"):
                    rows = list(csv.DictReader(f))
                    header = list(rows[0].keys()) if rows else []
                    want = ["training.batch_size", "checkpoint.policy", "peak_bytes", "step_time_ns", "saved_bytes",
                            "fits", "pareto"]
                    if header != want:
                        problems.append(f"header {header}, expected {want}")
                    rows = [{k: (int(v) if k in ("training.batch_size", "peak_bytes", "step_time_ns", "saved_bytes")
                                 else (v == "true") if k in ("fits", "pareto") else v) for k, v in row.items()}
                            for row in rows]
                else:
                    rows = json.load(f)
            if len(rows) != 25:
                problems.append(f"{len(rows)} rows, expected 25")
            else:
                pts = [(row["peak_bytes"], row["step_time_ns"]) for row in rows]
                want = pareto(pts)
                got = {i for i, row in enumerate(rows) if row["pareto"]}
                if got != want:
                    problems.append(f"pareto rows {sorted(got)}, expected {sorted(want)}")
                if not want:
                    problems.append("empty frontier")
                if "ops:mm,bmm" not in {row["checkpoint.policy"] for row in rows}:
                    problems.append("the quoted value ops:mm,bmm is missing")
                results[path] = rows
        r.check(f"sweep --out {os.path.basename(path)}", problems)
    if len(results) == 2:
        a, b = results[out_csv], results[out_json]
        r.check("sweep CSV and JSON agree", [] if a == b else ["the CSV and JSON rows differ"])

    # Spot checks against simulate: a batch-scaled row equals a full simulation.
    if out_json in results:
        problems = []
        for row in results[out_json]:
            if row["training.batch_size"] not in (4, 5) or row["checkpoint.policy"] not in ("none", "full"):
                continue
            rc, out, err = r.run(["simulate"] + SMALL + ["--set", f"training.batch_size={row['training.batch_size']}",
                                                         "--set", f"checkpoint.policy={row['checkpoint.policy']}",
                                                         "--json", "--no-fit"])
            j = json.loads(out)
            if (j["peak"]["bytes"], j["step_time_ns"], j["activations"]["saved_bytes"]) != \
                    (row["peak_bytes"], row["step_time_ns"], row["saved_bytes"]):
                problems.append(f"row {row} differs from simulate: {j['peak']['bytes']}, {j['step_time_ns']}")
        r.check("sweep rows equal simulate", problems)

    # fit --json: the contract.
    problems = []
    rc, out, err = r.run(["fit"] + SMALL + ["--vary-seq", "--policies", "none,full", "--json"])
    if rc != 0:
        problems.append(f"exit code {rc}: {err!r}")
    else:
        j = json.loads(out)
        if not isinstance(j.get("device_bytes"), int):
            problems.append("device_bytes missing")
        pols = j.get("policies", [])
        if [p.get("policy") for p in pols] != ["none", "full"]:
            problems.append(f"policies {pols}")
        for p in pols:
            for k in ("max_batch_size", "peak_bytes", "step_time_ns", "max_seq_len"):
                if not isinstance(p.get(k), int):
                    problems.append(f"{p.get('policy')}: {k} missing")
            if isinstance(p.get("peak_bytes"), int) and p["peak_bytes"] > j["device_bytes"]:
                problems.append(f"{p['policy']}: peak at the max batch exceeds the device")
        if len(pols) == 2 and pols[1]["max_batch_size"] < pols[0]["max_batch_size"]:
            problems.append("full fits a smaller batch than none")
    r.check("fit --json --vary-seq contract", problems)

    print(f"{r.passed} passed, {r.failed} failed")
    return 1 if r.failed else 0


if __name__ == "__main__":
    sys.exit(main())
