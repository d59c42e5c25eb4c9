"""Checks the Chrome trace (and the CSV) against the simulator's own figures: the total counter
reaches exactly the simulated peak, at the simulated peak time, and the category counters add up.

usage: test_trace.py ACTSIM_EXPORT_FIXTURE
"""
import csv
import json
import os
import shutil
import sys

from common import MEDIUM, TINY, run_exports


def check_trace(folder, summary, coarsened):
    with open(os.path.join(folder, "trace.json")) as f:
        trace = json.load(f)
    peak, peak_ns = summary["peak"]["bytes"], summary["peak"]["time_ns"]
    assert trace["metadata"]["scenario"] == summary["scenario"]
    names = [e for e in trace["traceEvents"] if e["ph"] == "M" and e["name"] == "process_name"]
    assert summary["scenario"] in names[0]["args"]["name"]
    # Replay the counters in file order; each row is a total sample, then the category samples
    # that changed in it.
    cats = list(summary["peak"]["by_category"].keys())
    latest = {}
    best, best_ts = -1, None
    for e in trace["traceEvents"]:
        if e["ph"] != "C":
            continue
        latest[e["name"]] = e["args"]["bytes"]
        if e["name"] == "memory.total" and e["args"]["bytes"] > best:
            best, best_ts = e["args"]["bytes"], e["ts"]
    assert best == peak, f"total counter peaks at {best}, simulator says {peak}"
    assert round(best_ts * 1000) == peak_ns, f"counter peak at {best_ts} us, simulator says {peak_ns} ns"
    assert set(latest) == {"memory.total"} | {"memory." + c for c in cats}, sorted(latest)
    # At the end, the category tracks sum to the total, which is the end-of-step live bytes.
    assert sum(latest["memory." + c] for c in cats) == latest["memory.total"] == summary["live_bytes"]["end_step"]
    # The category tracks in the peak's row reproduce the simulator's breakdown at the peak.
    at, seen_peak = {}, False
    for e in trace["traceEvents"]:
        if e["ph"] != "C":
            continue
        if e["name"] == "memory.total":
            if seen_peak:
                break
            seen_peak = e["args"]["bytes"] == peak
        at[e["name"]] = e["args"]["bytes"]
    for c in cats:
        assert at["memory." + c] == summary["peak"]["by_category"][c], (c, at["memory." + c], summary["peak"]["by_category"][c])
    slices = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert slices and all({"op", "layer", "phase", "flops", "bytes_moved"} <= set(e["args"]) for e in slices)
    if not coarsened:
        assert len(slices) == summary["ops"]
    assert any("saves" in e["args"] for e in slices)
    peaks = [e for e in trace["traceEvents"] if e["ph"] == "i"]
    assert len(peaks) == 1 and peaks[0]["args"]["bytes"] == peak and round(peaks[0]["ts"] * 1000) == peak_ns
    return len(trace["traceEvents"])


def check_csv(folder, summary, coarsened):
    with open(os.path.join(folder, "events.csv")) as f:
        rows = list(csv.DictReader(f))
    if not coarsened:
        assert len(rows) == summary["memory_events"] + 1
    cats = list(summary["peak"]["by_category"].keys())
    for r in rows:
        assert sum(int(r[c]) for c in cats) == int(r["total"])
    best = max(rows, key=lambda r: int(r["total"]))
    assert int(best["total"]) == summary["peak"]["bytes"]
    assert int(best["time_ns"]) == summary["peak"]["time_ns"]
    assert int(rows[-1]["total"]) == summary["live_bytes"]["end_step"]
    assert rows[0]["event"] == "step_start" and int(rows[0]["total"]) == summary["live_bytes"]["step_start"]


def check_pipeline_trace(actsim):
    """issue 13 (pprank): `simulate --trace` on a pipeline writes one process per rank class, each
    counter peaking at its class's peak in the JSON; a one-device export with it is refused with one
    line and nothing is written."""
    import subprocess
    import tempfile
    folder = tempfile.mkdtemp(prefix="actsim_pp_trace_")
    try:
        trace = os.path.join(folder, "trace.json")
        sets = ["--set", "model.family=llama", "--set", "parallel.pp=2", "--set", "parallel.microbatches=4"]
        for kv in MEDIUM:
            sets += ["--set", kv]
        p = subprocess.run([actsim, "simulate", "--no-fit", "--json", "--trace", trace] + sets,
                           check=True, capture_output=True, text=True)
        summary = json.loads(p.stdout)
        with open(trace) as f:
            events = json.load(f)["traceEvents"]
        names = {e["pid"]: e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "process_name"}
        assert sorted(names) == [1, 2], names
        for cls in summary["ranks"]:
            pid = cls["class"] + 1
            assert f"pp stage {cls['coordinates']['pp']}" in names[pid], names[pid]
            best = max(e["args"]["bytes"] for e in events if e["ph"] == "C" and e["pid"] == pid)
            assert best == cls["figures"]["peak"]["bytes"], (pid, best, cls["figures"]["peak"]["bytes"])
        os.remove(trace)
        p = subprocess.run([actsim, "simulate", "--no-fit", "--trace", trace, "--csv", os.path.join(folder, "e.csv")] + sets,
                           capture_output=True, text=True)
        assert p.returncode == 2 and "--csv" in p.stderr and "parallel.pp" in p.stderr, (p.returncode, p.stderr)
        assert p.stderr.strip().count("\n") == 0 and os.listdir(folder) == [], (p.stderr, os.listdir(folder))
        print(f"ok: pipeline trace, {len(names)} processes")
    finally:
        shutil.rmtree(folder)


def main():
    actsim = sys.argv[1]
    check_pipeline_trace(actsim)
    for sets, max_events in ((TINY, 0), (MEDIUM, 0), (MEDIUM, 200)):
        folder, summary = run_exports(actsim, sets, max_events)
        try:
            n = check_trace(folder, summary, max_events > 0)
            check_csv(folder, summary, max_events > 0)
            # The timeline for `simulate --json --timeline` also holds the exact peak.
            assert max(p[1] for p in summary["timeline"]) == summary["peak"]["bytes"]
            assert len(summary["timeline"]) <= 4000
            print(f"ok: {summary['memory_events']} memory events, max_events {max_events}: {n} trace events")
        finally:
            shutil.rmtree(folder)


if __name__ == "__main__":
    main()
