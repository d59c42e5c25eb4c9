"""Checks actsim's Chrome trace strictly against the Trace Event Format's documented fields (the
format Perfetto and chrome://tracing import). Perfetto's trace processor is not available here as a
package (the PyPI `perfetto` package downloads its binary at run time), so this is the check:

  - strict JSON (no NaN/Infinity), the JSON Object Format: a "traceEvents" list, displayTimeUnit
    "ms" or "ns" if present;
  - every event: a known phase; "name" a string; "pid" an int; "cat" a string and "args" an object
    when present;
  - per phase: X has ts and dur >= 0 and a tid; C has ts and args of numbers only; i/I have ts and
    scope s in g/p/t (t needs a tid); M is a documented metadata name with its documented argument;
    B/E balanced and nested per thread;
  - complete slices on one thread nest (none ends inside another that it started after), as
    Perfetto needs to build its slice tracks; counter samples of a track in time order.

usage: test_trace_format.py ACTSIM
"""
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile

from common import MEDIUM, TINY

PHASES = set("BEXiICbneMstfPONDcR") | {"(", ")", "T", "p", "S", "F"}
METADATA = {"process_name": ("name", str), "process_labels": ("labels", str), "process_sort_index": ("sort_index", int),
            "thread_name": ("name", str), "thread_sort_index": ("sort_index", int)}
EPS = 1e-6  # microseconds: ts/dur are printed with ns precision


def is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def reject_constant(name):
    raise AssertionError(f"not strict JSON: {name}")


def check(path):
    with open(path, encoding="utf-8") as f:
        doc = json.load(f, parse_constant=reject_constant)
    assert isinstance(doc, dict) and isinstance(doc.get("traceEvents"), list), "JSON Object Format needs traceEvents"
    assert doc.get("displayTimeUnit", "ms") in ("ms", "ns"), doc.get("displayTimeUnit")
    slices, stacks, counters = {}, {}, {}
    phases = {}
    for k, e in enumerate(doc["traceEvents"]):
        where = f"{path}: traceEvents[{k}]"
        assert isinstance(e, dict), where
        ph = e.get("ph")
        assert ph in PHASES, f"{where}: unknown phase {ph!r}"
        phases[ph] = phases.get(ph, 0) + 1
        assert isinstance(e.get("name"), str) and e["name"], f"{where}: name"
        assert isinstance(e.get("pid"), int) and not isinstance(e["pid"], bool), f"{where}: pid"
        if "tid" in e:
            assert isinstance(e["tid"], int) and not isinstance(e["tid"], bool), f"{where}: tid"
        if "cat" in e:
            assert isinstance(e["cat"], str), f"{where}: cat"
        if "args" in e:
            assert isinstance(e["args"], dict), f"{where}: args"
        if ph != "M":
            assert is_number(e.get("ts")) and e["ts"] >= 0, f"{where}: ts"
        if ph == "X":
            assert "tid" in e and is_number(e.get("dur")) and e["dur"] >= 0, f"{where}: X needs tid and dur >= 0"
            slices.setdefault((e["pid"], e["tid"]), []).append((e["ts"], e["ts"] + e["dur"], k))
        elif ph == "C":
            assert e.get("args") and all(is_number(v) for v in e["args"].values()), f"{where}: counter args must be numbers"
            track = (e["pid"], e["name"], e.get("id"))
            assert e["ts"] >= counters.get(track, 0), f"{where}: counter {track} goes back in time"
            counters[track] = e["ts"]
        elif ph in ("i", "I"):
            s = e.get("s", "t")
            assert s in ("g", "p", "t"), f"{where}: instant scope {s!r}"
            if s == "t":
                assert "tid" in e, f"{where}: thread-scoped instant needs a tid"
        elif ph == "M":
            assert e["name"] in METADATA, f"{where}: metadata name {e['name']!r}"
            key, kind = METADATA[e["name"]]
            assert isinstance(e.get("args", {}).get(key), kind), f"{where}: {e['name']} needs args.{key}"
            if e["name"].startswith("thread"):
                assert "tid" in e, f"{where}: {e['name']} needs a tid"
        elif ph in ("B", "E"):
            assert "tid" in e, f"{where}: B/E need a tid"
            stack = stacks.setdefault((e["pid"], e["tid"]), [])
            if ph == "B":
                stack.append(e)
            else:
                assert stack and stack[-1]["ts"] <= e["ts"] + EPS, f"{where}: E without its B"
                stack.pop()
    for track, stack in stacks.items():
        assert not stack, f"{path}: {len(stack)} B events never ended on {track}"
    for track, spans in slices.items():
        spans.sort(key=lambda s: (s[0], -s[1]))
        open_ends = []
        for begin, end, k in spans:
            while open_ends and open_ends[-1][0] <= begin + EPS:
                open_ends.pop()
            assert not open_ends or end <= open_ends[-1][0] + EPS, \
                f"{path}: traceEvents[{k}] on {track} overlaps traceEvents[{open_ends[-1][1]}] without nesting"
            open_ends.append((end, k))
    return phases


def main():
    actsim = sys.argv[1]
    folder = tempfile.mkdtemp(prefix="actsim_trace_format_")
    try:
        cases = [("tiny", ["simulate", "--no-fit"], TINY, 0), ("medium", ["simulate", "--no-fit"], MEDIUM, 0),
                 ("medium_max_events", ["simulate", "--no-fit"], MEDIUM, 200),
                 ("plan", ["plan", "--budget", "75MB"], MEDIUM, 0)]
        for label, command, sets, max_events in cases:
            path = os.path.join(folder, f"{label}.json")
            cmd = [actsim] + command + ["--trace", path]
            if max_events:
                cmd += ["--max-events", str(max_events)]
            for kv in sets:
                cmd += ["--set", kv]
            subprocess.run(cmd, check=True, capture_output=True)
            phases = check(path)
            print(f"ok: {label}: {sum(phases.values())} events, phases {dict(sorted(phases.items()))}")
    finally:
        shutil.rmtree(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
