#!/usr/bin/env python3
"""Golden summaries: `actsim simulate SCENARIO --json` for every scenario in scenarios/, reduced to
its headline figures, must equal tests/golden/<scenario>.json. A change in any figure shows up as
a diff here; when the change is intended, regenerate with --update and review the diff in git.

usage: test_golden.py ACTSIM SCENARIO_DIR GOLDEN_DIR [--update]
"""
import json
import os
import subprocess
import sys

KEYS = [
    ("param_count",), ("params_bytes",), ("grads_bytes",), ("optimizer_bytes",), ("buffers_bytes",),
    ("activations", "saved_bytes"), ("activations", "outside_layers_saved_bytes"),
    ("peak", "bytes"), ("peak", "phase"), ("peak", "op"), ("peak", "time_ns"),
    ("live_bytes", "step_start"), ("live_bytes", "end_forward"), ("live_bytes", "end_backward"),
    ("live_bytes", "end_optimizer"), ("step_time_ns",), ("events",), ("max_batch_size",),
]


def summary(j):
    out = {}
    for path in KEYS:
        v = j
        for p in path:
            v = v[p]
        out[".".join(path)] = v
    out["activations.per_layer_saved_bytes[0]"] = j["activations"]["per_layer_saved_bytes"][0]
    return out


def main():
    actsim, sdir, gdir = sys.argv[1:4]
    update = "--update" in sys.argv
    passed = failed = 0
    for f in sorted(os.listdir(sdir)):
        if not f.endswith(".toml") or f == "devices.toml":
            continue
        name = f[:-5]
        p = subprocess.run([actsim, "simulate", os.path.join(sdir, f), "--json"], capture_output=True, text=True)
        if p.returncode != 0:
            print(f"FAIL {name}: exit {p.returncode}: {p.stderr.strip()}")
            failed += 1
            continue
        got = summary(json.loads(p.stdout))
        gpath = os.path.join(gdir, name + ".json")
        if update:
            with open(gpath, "w") as fh:
                json.dump(got, fh, indent=2, sort_keys=True)
                fh.write("\n")
        with open(gpath) as fh:
            want = json.load(fh)
        diffs = [f"{k}: {got.get(k)!r} != golden {want.get(k)!r}" for k in sorted(set(got) | set(want))
                 if got.get(k) != want.get(k)]
        if diffs:
            failed += 1
            print(f"FAIL {name}")
            for d in diffs:
                print("     " + d)
        else:
            passed += 1
            print(f"ok   {name}")
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
