"""Checks the memory_viz snapshot as PyTorch's viewer reads it: only the opcodes its JavaScript
unpickler accepts; segments well formed; the viewer's backwards replay from the final segments
through device_traces consistent (each alloc freed or live in segments, no overlapping blocks, sizes
summing up); the forward replay reproducing the simulated peak; and, where Debian's torch has
torch.cuda._memory_viz, its text commands run on it.

usage: test_memviz.py ACTSIM_EXPORT_FIXTURE
"""
import os
import pickle
import pickletools
import shutil
import sys

from common import MEDIUM, TINY, run_exports

# The opcodes of pytorch.org/memory_viz's unpickler (the list).
ALLOWED = {"PROTO", "FRAME", "MARK", "STOP", "NONE", "NEWTRUE", "NEWFALSE", "BININT", "BININT1", "BININT2",
           "LONG1", "BINFLOAT", "SHORT_BINUNICODE", "BINUNICODE", "EMPTY_DICT", "DICT", "SETITEM", "SETITEMS",
           "EMPTY_LIST", "LIST", "APPEND", "APPENDS", "TUPLE", "TUPLE1", "TUPLE2", "TUPLE3", "EMPTY_TUPLE",
           "MEMOIZE", "BINPUT", "LONG_BINPUT", "BINGET", "LONG_BINGET"}


def check_segments(segments):
    last_end = 0
    for seg in sorted(segments, key=lambda s: s["address"]):
        assert seg["address"] >= last_end, "segments overlap"
        last_end = seg["address"] + seg["total_size"]
        addr, allocated = seg["address"], 0
        for b in seg["blocks"]:
            assert b["address"] == addr, "blocks must tile their segment"
            assert b["size"] > 0 and b["size"] % 512 == 0
            addr += b["size"]
            if b["state"] == "active_allocated":
                allocated += b["size"]
                assert 0 < b["requested_size"] <= b["size"]
                assert b["frames"] and "category" in b
            else:
                assert b["state"] == "inactive"
        assert addr == seg["address"] + seg["total_size"], "block sizes must sum to the segment size"
        assert seg["allocated_size"] == allocated


def replay_backwards(snap):
    """The viewer's reconstruction: start from the final segments and undo the trace."""
    segs = {s["address"]: s["total_size"] for s in snap["segments"]}
    live = {}
    for s in snap["segments"]:
        for b in s["blocks"]:
            if b["state"] == "active_allocated":
                live[b["address"]] = b["requested_size"]
    trace = snap["device_traces"][0]
    allocs_live_at_end = 0

    def segment_of(addr):
        for base, size in segs.items():
            if base <= addr < base + size:
                return base
        raise AssertionError(f"address {addr:#x} outside every segment")

    freed = set()
    for e in reversed(trace):
        a, size = e["addr"], e["size"]
        act = e["action"]
        if act == "alloc":
            # Either it was freed later (and so re-added by its free), or it is live at the end.
            assert a in live and live[a] == size, f"alloc at {a:#x} neither freed nor live in segments"
            if a not in freed:
                allocs_live_at_end += 1
            freed.discard(a)
            del live[a]
        elif act == "free_completed":
            assert a not in live, f"block at {a:#x} freed while another block is live there"
            segment_of(a)
            live[a] = size
            freed.add(a)
        elif act == "free_requested":
            assert a in live and live[a] == size
        elif act == "segment_free":
            assert a not in segs
            for other, osz in segs.items():
                assert a + size <= other or other + osz <= a, "segment overlaps another"
            segs[a] = size
        elif act == "segment_alloc":
            assert segs.get(a) == size
            assert not any(a <= b < a + size for b in live), "segment allocated with blocks in it"
            del segs[a]
        elif act == "snapshot":
            pass  # the closing entry (Note [Snapshot entry] in export_memviz.cpp): no memory change
        else:
            raise AssertionError(f"unknown action {act}")
        # No block overlaps another (checked on the blocks' requested extents).
    spans = sorted(live.items())
    for (a0, s0), (a1, _) in zip(spans, spans[1:]):
        assert a0 + s0 <= a1, "blocks overlap"
    return live, allocs_live_at_end


def replay_forwards(snap, initial):
    live = dict(initial)
    cur = sum(live.values())
    best = cur
    for e in snap["device_traces"][0]:
        if e["action"] == "alloc":
            assert e["addr"] not in live
            for a, s in live.items():
                assert e["addr"] + e["size"] <= a or a + s <= e["addr"], "blocks overlap"
            live[e["addr"]] = e["size"]
            cur += e["size"]
            best = max(best, cur)
        elif e["action"] == "free_completed":
            cur -= live.pop(e["addr"])
    return best, cur


def check_torch_memory_viz(snap):
    try:
        import torch.cuda._memory_viz as mv  # Debian's python3-torch
    except Exception as e:  # noqa: BLE001: any import failure means "not available"
        print(f"note: torch.cuda._memory_viz not available ({e}); skipped its text commands")
        return
    # torch 1.13's commands take the list of segments; newer ones take the whole snapshot.
    segs = snap["segments"]
    stats = mv.stats(segs)
    assert stats["segments"] == len(segs)
    assert stats["total_size"].value == sum(s["total_size"] for s in segs)
    active = stats["active_allocated"].value if "active_allocated" in stats else 0
    assert active == sum(s["allocated_size"] for s in segs)
    identity = lambda lines: lines  # the flamegraph lines themselves (no download of flamegraph.pl)
    seg_lines = mv.segments(segs, format_flamegraph=identity)
    mem_lines = mv.memory(segs, format_flamegraph=identity)
    assert seg_lines.count("\n") >= sum(len(s["blocks"]) for s in segs)
    total = sum(int(line.rsplit(" ", 1)[1]) for line in mem_lines.splitlines())
    assert total == stats["total_size"].value, (total, stats["total_size"])
    assert "before the step" in mem_lines
    print(f"torch {mv.__name__}: stats {stats}")


def main():
    actsim = sys.argv[1]
    for sets, max_events in ((TINY, 0), (MEDIUM, 0), (MEDIUM, 200)):
        folder, summary = run_exports(actsim, sets, max_events)
        try:
            path = os.path.join(folder, "snapshot.pickle")
            with open(path, "rb") as f:
                data = f.read()
            used = {op.name for op, _, _ in pickletools.genops(data)}
            assert used <= ALLOWED, f"opcodes outside the viewer's unpickler: {used - ALLOWED}"
            assert data[:2] == b"\x80\x02", "protocol 2"
            snap = pickle.loads(data)
            assert set(snap) >= {"segments", "device_traces"}
            trace = snap["device_traces"][0]
            for e in trace:
                assert {"action", "addr", "size", "stream", "time_us", "frames"} <= set(e)
                if e["action"] in ("alloc", "free_requested", "free_completed"):
                    assert "category" in e and e["frames"], e
                    assert any(f["name"] for f in e["frames"])
            # The closing "snapshot" entry carries the category "unknown" that MemoryViz.js needs.
            assert trace[-1]["action"] == "snapshot" and trace[-1]["category"] == "unknown", trace[-1]
            assert sum(e["action"] == "snapshot" for e in trace) == 1
            actions = {e["action"] for e in trace}
            assert {"alloc", "free_requested", "free_completed", "segment_alloc", "segment_free"} <= actions, actions
            check_segments(snap["segments"])
            initial, live_at_end = replay_backwards(snap)
            best, end = replay_forwards(snap, initial)
            assert sum(initial.values()) == summary["live_bytes"]["step_start"]
            # The placement holds exactly the simulated bytes; with --max-events the small allocations
            # are one merged block, resized before each kept event (Note [Merged block]).
            assert best == summary["peak"]["bytes"], (best, summary["peak"]["bytes"])
            assert end == summary["live_bytes"]["end_step"]
            if max_events == 0:
                assert len(trace) > summary["memory_events"]
                assert snap["actsim"]["merged_allocations"] == 0
            else:
                assert snap["actsim"]["merged_allocations"] > 0
                assert any(e.get("category") == "merged" for e in trace)
                allocs = sum(e["action"] == "alloc" for e in trace)
                assert allocs < summary["memory_events"] / 2, (allocs, summary["memory_events"])
            check_torch_memory_viz(snap)
            print(f"ok: {len(trace)} trace entries, {len(snap['segments'])} segments at the end, "
                  f"{live_at_end} allocations live at the end, max_events {max_events}")
        finally:
            shutil.rmtree(folder)


if __name__ == "__main__":
    main()
