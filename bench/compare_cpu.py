#!/usr/bin/env python3
"""Old vs new binary, alternated in one run: median CPU time (user + sys), wall clock and peak RSS.

The machine is shared, so CPU time is the figure to compare (wall clock follows the load). Each run's
resources are the child's own (os.wait4), to the microsecond. Both binaries read this checkout's
scenarios/ (ACTSIM_DATA), and their stdout must be identical in every run.

    bench/compare_cpu.py OLD NEW [--runs N] -- ARGS...
    bench/compare_cpu.py /tmp/actsim-base build/tools/actsim -- simulate scenarios/seed-gpt2-xl.toml --json
    bench/compare_cpu.py /tmp/actsim-base build/tools/actsim --ignore planner.simulations -- plan \
        scenarios/seed-gpt2-xl.toml --set model.n_layers=96 --set training.batch_size=2 --budget 90GiB --json

--ignore KEY (dotted, repeatable) drops a key of JSON output before the comparison (a figure that is
meant to differ, such as the planner's count of simulations).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def run(binary, args, env):
    start = time.monotonic()
    p = subprocess.Popen([binary, *args], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
    out = p.stdout.read()
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.monotonic() - start
    p.returncode = os.waitstatus_to_exitcode(status)
    return out, p.returncode, ru.ru_utime + ru.ru_stime, wall, ru.ru_maxrss / 1024.0


def strip(out, keys):
    doc = json.loads(out)
    for key in keys:
        *path, last = key.split(".")
        d = doc
        for k in path:
            d = d.get(k, {}) if isinstance(d, dict) else {}
        if isinstance(d, dict):
            d.pop(last, None)
    return json.dumps(doc, sort_keys=True)


def main():
    argv = sys.argv[1:]
    if "--" not in argv:
        sys.exit("usage: compare_cpu.py OLD NEW [--runs N] -- ARGS...")
    split = argv.index("--")
    ap = argparse.ArgumentParser()
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("--runs", type=int, default=9)
    ap.add_argument("--ignore", action="append", default=[])
    opts = ap.parse_args(argv[:split])
    args = argv[split + 1:]
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ)
    env.setdefault("ACTSIM_DATA", os.path.join(here, "scenarios"))
    figures = {"old": [], "new": []}
    for i in range(opts.runs):
        outs = {}
        for which in ("old", "new"):
            out, rc, cpu, wall, rss = run(getattr(opts, which), args, env)
            if rc != 0:
                sys.exit(f"{which} exited with {rc}")
            outs[which] = out
            figures[which].append((cpu, wall, rss))
        if opts.ignore:
            outs = {w: strip(o, opts.ignore) for w, o in outs.items()}
        if outs["old"] != outs["new"]:
            sys.exit(f"outputs differ (run {i + 1})")
    med = {w: [statistics.median(f[k] for f in figures[w]) for k in range(3)] for w in figures}
    load = open("/proc/loadavg").read().split()[:3]
    print(f"actsim {' '.join(args)}")
    print(f"  {opts.runs} runs each, alternated; outputs identical; load {' '.join(load)}")
    for w in ("old", "new"):
        cpu, wall, rss = med[w]
        print(f"  {w}: CPU {cpu:.3f} s, wall {wall:.3f} s, peak RSS {rss:.0f} MiB (medians)")
    print(f"  CPU time old/new: {med['old'][0] / med['new'][0]:.2f}x; wall: {med['old'][1] / med['new'][1]:.2f}x")


if __name__ == "__main__":
    main()
