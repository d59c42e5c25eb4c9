#!/usr/bin/env python3
"""The torch-cuda profile against real PyTorch on the same GPU, next to the CUDA replay.

For each configuration: `actsim simulate --json` (profile torch-cuda) gives the simulated saved
bytes and peak; `actsim replay --backend cuda --confirm --json` gives the measured peak (bytes in
use through the backend) and the confirmations; PyTorch 2.x runs ../shared/reference/models.py on
cuda for the same step (AdamW foreach, steady state: one warm-up step first, zero_grad(set_to_none))
and reports autograd's saved bytes (saved_tensors_hooks, deduplicated by storage, CUDA storages
only, parameters left out) and torch.cuda.max_memory_allocated() over the step. Prints one table.

First, before any configuration, it measures each CUDA delta of the torch-cuda profile (kDeltas in
graph/src/profile.cpp: torch-cuda = torch2-cpu + these deltas) with a small probe on the GPU, and
prints the table "delta | expected | measured | confirmed?". The rows go to the JSON output's
"deltas" (written as soon as they are measured, so a later timeout does not lose them).

    python3 tests/cuda/torch_cuda_check.py --actsim build/tools/actsim [--quick] [--deltas-only] [--json F]

Exit status: 0 every target met (every delta confirmed, every configuration in range), 1 a target
missed or a delta refuted or not measurable, 2 usage, 77 no CUDA (skipped).
"""
import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))

# (name, scenario file, --set overrides, reference build_model kwargs, batch, dtype)
CONFIGS = [
    ("gpt2-small bf16 flash b8 s1024", "scenarios/gpt2-small.toml", [],
     dict(family="gpt2", vocab_size=50257, seq_len=1024, d_model=768, n_heads=12, n_layers=12,
          d_ff=3072, dropout=0.0, n_kv_heads=12, attention="flash"), 8, "bf16"),
    ("llama d2048 L8 gqa bf16 flash b8 s1024", "scenarios/llama-2-7b.toml",
     ["model.vocab_size=32000", "model.d_model=2048", "model.n_layers=8", "model.n_heads=16",
      "model.n_kv_heads=4", "model.seq_len=1024", "model.d_ff=5632"],
     dict(family="llama", vocab_size=32000, seq_len=1024, d_model=2048, n_heads=16, n_layers=8,
          d_ff=5632, dropout=0.0, n_kv_heads=4, attention="flash"), 8, "bf16"),
]
QUICK = [(n.replace("b8", "b2"), s, o, dict(m, n_layers=2), 2, d) for (n, s, o, m, b, d) in CONFIGS]


def actsim_json(cmd):
    p = subprocess.run(cmd, capture_output=True, text=True)
    out = p.stdout.strip()
    try:
        return json.loads(out.splitlines()[0] if out else "null"), p
    except (json.JSONDecodeError, IndexError):
        return None, p


def sets(scenario_overrides, batch, dtype):
    args = []
    for kv in scenario_overrides + ["training.batch_size=%d" % batch, "training.dtype=%s" % dtype,
                                    "runtime.profile=torch-cuda", "training.optimizer=adamw"]:
        args += ["--set", kv]
    return args


def torch_measure(torch, models, m, batch, dtype):
    """Saved bytes and the step's peak as PyTorch 2.x on CUDA has them."""
    torch.manual_seed(0)
    dev = torch.device("cuda")
    model = models.build_model(m["family"], m["vocab_size"], m["seq_len"], m["d_model"], m["n_heads"],
                               m["n_layers"], d_ff=m["d_ff"], dropout=m["dropout"],
                               n_kv_heads=m["n_kv_heads"], attention=m["attention"]).to(dev)
    if dtype == "bf16":
        model.to(torch.bfloat16)
    model.train()
    idx = torch.randint(0, m["vocab_size"], (batch, m["seq_len"]), device=dev)
    targets = torch.randint(0, m["vocab_size"], (batch, m["seq_len"]), device=dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)  # foreach on CUDA by default

    def step(hooks=None):
        if hooks:
            with torch.autograd.graph.saved_tensors_hooks(*hooks):
                out = model(idx, targets)
        else:
            out = model(idx, targets)
        loss = out[1] if isinstance(out, tuple) else out
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    step()  # warm-up: optimizer state exists before the measured step (steady state)
    torch.cuda.synchronize()
    param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        if t.is_cuda:
            s = t.untyped_storage()
            if s.data_ptr() not in param_ptrs:
                saved[s.data_ptr()] = s.nbytes()
        return t

    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    step((pack, lambda t: t))
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    # Step time: mean of three steps after the measured one (no hooks).
    t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0.record()
    for _ in range(3):
        step()
    t1.record()
    torch.cuda.synchronize()
    res = dict(saved=sum(saved.values()), peak=peak, start=start, step_s=t0.elapsed_time(t1) / 3e3)
    del model, opt, idx, targets
    torch.cuda.empty_cache()
    return res


# ---------------------------------------------------------------------------------------------
# The CUDA deltas, one probe each. Names as in kDeltas (graph/src/profile.cpp); docs/torch-cuda-rules.md
# has each one's bytes, formula and PyTorch source.

DEV = "cuda"  # the probes' device


def _round512(n):
    """What CUDACachingAllocator's round_size charges for n bytes (no roundup_power2_divisions)."""
    return 512 if n < 512 else (n + 511) // 512 * 512


def _alloc_delta(torch, fn):
    """(result, bytes allocated that stay, peak bytes above the start) of fn() on the current device."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    return out, torch.cuda.memory_allocated() - start, torch.cuda.max_memory_allocated() - start


def _probe_dropout_bool_mask(torch):
    import torch.nn.functional as F
    x = torch.randn(4, 64, 96, device=DEV, requires_grad=True)  # fp32: the CPU noise would be 4 B/element
    n = x.numel()
    packed = {}

    def pack(t):
        if t.untyped_storage().data_ptr() != x.untyped_storage().data_ptr():
            packed[t.untyped_storage().data_ptr()] = (str(t.dtype), t.untyped_storage().nbytes(), t.device.type)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = F.dropout(x, 0.1, training=True)
    saved = list(packed.values())
    measured = "saved %d B (%s)" % (sum(b for _, b, _ in saved), ", ".join("%s %d B %s" % v for v in saved) or "nothing")
    ok = len(saved) == 1 and saved[0][0] == "torch.bool" and saved[0][1] == n and saved[0][2] == DEV
    del y
    return "one bool mask, %d B (torch2-cpu: %d B fp32 noise)" % (n, 4 * n), measured, ok


def _probe_layer_norm_stats_fp32(torch):
    import torch.nn.functional as F
    res = []
    for dt in (torch.bfloat16, torch.float16):
        x = torch.randn(4, 8, 64, device=DEV, dtype=dt, requires_grad=True)
        w = torch.ones(64, device=DEV, dtype=dt, requires_grad=True)
        b = torch.zeros(64, device=DEV, dtype=dt, requires_grad=True)
        g = F.layer_norm(x, (64,), w, b).grad_fn
        m, r = g._saved_result1, g._saved_result2
        name = lambda d: str(d).replace("torch.", "")
        res.append((name(dt), name(m.dtype), tuple(m.shape), name(r.dtype), tuple(r.shape)))
    measured = "; ".join("%s input: mean %s %s, rstd %s %s" % v for v in res)
    ok = all(v[1] == "float32" and v[3] == "float32" and v[2] == (4, 8, 1) and v[4] == (4, 8, 1) for v in res)
    return "mean, rstd float32 (4, 8, 1) for bf16 and fp16", measured, ok


def _probe_host_scalars(torch):
    x = torch.randn(1000, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    res, ok = [], True
    for name, fn in (("x * 0.5", lambda: x * 0.5), ("x / 8.0", lambda: x / 8.0)):
        y, kept, peak = _alloc_delta(torch, fn)
        o = y.grad_fn._saved_other
        res.append("%s: _saved_other %s %s dim %d; device peak +%d B" % (name, o.device.type, str(o.dtype).replace(
            "torch.", ""), o.dim(), peak))
        # The wrapped number stays on the host, and no cast is allocated on the device: the op's
        # device peak is its output alone.
        ok = ok and o.device.type == "cpu" and o.dtype == torch.float64 and o.dim() == 0 \
            and peak == _round512(x.numel() * 2)
        del y
    return "_saved_other cpu float64 0-dim; device peak = output (%d B)" % _round512(1000 * 2), "; ".join(res), ok


def _probe_host_step(torch):
    got = {}
    for label, kw in (("default", {}), ("for_loop", dict(foreach=False)), ("foreach", dict(foreach=True)),
                      ("fused", dict(fused=True))):
        p = torch.nn.Parameter(torch.randn(64, device=DEV))
        opt = torch.optim.AdamW([p], lr=1e-3, **kw)
        p.grad = torch.randn_like(p)
        opt.step()
        st = opt.state[p]["step"]
        got[label] = "%s %s" % (st.device.type, str(st.dtype).replace("torch.", ""))
    ok = all(got[k].startswith("cpu ") for k in ("default", "for_loop", "foreach")) and got["fused"].startswith(DEV + " ")
    return ("step on cpu (default, for_loop, foreach); cuda (fused)",
            ", ".join("%s: %s" % kv for kv in got.items()), ok)


def _probe_foreach_default(torch):
    import torch.optim.adam as adam_mod
    from torch.optim.optimizer import _default_to_fused_or_foreach
    p = torch.nn.Parameter(torch.randn(64, device=DEV))
    fused, foreach = _default_to_fused_or_foreach([p], differentiable=False, use_fused=False)
    # Which implementation AdamW() with foreach=None, fused=None really calls.
    called = []
    names = [n for n in ("_single_tensor_adam", "_multi_tensor_adam", "_fused_adam") if hasattr(adam_mod, n)]
    saved = {n: getattr(adam_mod, n) for n in names}

    def spy(n):
        def f(*args, **kwargs):
            called.append(n)
            return saved[n](*args, **kwargs)
        return f

    try:
        for n in names:
            setattr(adam_mod, n, spy(n))
        opt = torch.optim.AdamW([p], lr=1e-3)
        p.grad = torch.randn_like(p)
        opt.step()
    finally:
        for n in names:
            setattr(adam_mod, n, saved[n])
    impl = {"_single_tensor_adam": "for_loop", "_multi_tensor_adam": "foreach", "_fused_adam": "fused"}
    ran = ",".join(impl[c] for c in called) or "unknown"
    ok = foreach and not fused and (ran == "foreach" or not called)
    return ("_default_to_fused_or_foreach -> (fused False, foreach True); AdamW() runs foreach",
            "(fused %s, foreach %s); AdamW() ran %s" % (fused, foreach, ran), ok)


def _probe_no_onednn(torch):
    m, k, n = 256, 512, 384
    a = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
    a_col = torch.randn(k, m, device=DEV, dtype=torch.bfloat16).t()  # column-major A
    b = torch.randn(k, n, device=DEV, dtype=torch.bfloat16)
    bias = torch.randn(n, device=DEV, dtype=torch.bfloat16)
    a3 = torch.randn(4, m, k, device=DEV, dtype=torch.bfloat16)
    b3 = torch.randn(4, k, n, device=DEV, dtype=torch.bfloat16)
    cases = (("mm", lambda: a @ b, m * n * 2), ("mm col-major A", lambda: a_col @ b, m * n * 2),
             ("addmm (cuBLASLt)", lambda: torch.addmm(bias, a, b), m * n * 2),
             ("bmm", lambda: torch.bmm(a3, b3), 4 * m * n * 2))
    for _, fn, _ in cases:  # warm-up: cuBLAS handles and their workspaces exist before the probe
        fn()
    res, ok = [], True
    for name, fn, out_bytes in cases:
        y, kept, peak = _alloc_delta(torch, fn)
        res.append("%s: peak +%d B, output %d B" % (name, peak, _round512(out_bytes)))
        ok = ok and peak == _round512(out_bytes) and kept == _round512(out_bytes)
        del y
    return ("bf16 matmul peak = its output (no scratchpad; torch2-cpu AVX-512 adds roundup(K,32)*128+768 B)",
            "; ".join(res), ok)


def _probe_block_512(torch):
    cases = ((1, lambda: torch.empty(1, dtype=torch.uint8, device=DEV)),
             (4, lambda: torch.zeros((), dtype=torch.float32, device=DEV)),
             (513, lambda: torch.empty(513, dtype=torch.uint8, device=DEV)),
             (1048577, lambda: torch.empty(1048577, dtype=torch.uint8, device=DEV)))
    res, ok = [], True
    for nbytes, fn in cases:
        t, kept, _ = _alloc_delta(torch, fn)
        res.append("%d B -> %d" % (nbytes, kept))
        ok = ok and kept == _round512(nbytes)
        del t
    return ("memory_allocated: " + ", ".join("%d B -> %d" % (n, _round512(n)) for n, _ in cases),
            ", ".join(res), ok)


def _probe_host_rng_state(torch):
    """A checkpointed block's forward adds no device bytes for its RNG stash (it is a CPU tensor)."""
    import torch.utils.checkpoint as cp
    lin = torch.nn.Linear(64, 64, device=DEV)
    x = torch.randn(8, 64, device=DEV, requires_grad=True)
    state = torch.get_rng_state()
    y, kept, _ = _alloc_delta(torch, lambda: cp.checkpoint(lin, x, use_reentrant=False, preserve_rng_state=True))
    out = _round512(8 * 64 * 4)  # the output; the saved input x already exists
    ok = state.device.type == "cpu" and kept == out
    del y
    return ("torch.get_rng_state() on the CPU (%d B); checkpoint adds only its %d B output on the device"
            % (state.numel(), out), "stash on %s, +%d B on the device" % (state.device.type, kept), ok)


DELTA_PROBES = [
    ("dropout_bool_mask", _probe_dropout_bool_mask),
    ("layer_norm_stats_fp32", _probe_layer_norm_stats_fp32),
    ("host_scalars", _probe_host_scalars),
    ("host_step", _probe_host_step),
    ("foreach_default", _probe_foreach_default),
    ("no_onednn", _probe_no_onednn),
    ("block_512", _probe_block_512),
    ("host_rng_state", _probe_host_rng_state),
]


def measure_deltas(torch):
    """One row per CUDA delta: {delta, expected, measured, confirmed} (confirmed None: the probe failed)."""
    rows = []
    for name, probe in DELTA_PROBES:
        try:
            expected, measured, ok = probe(torch)
            rows.append(dict(delta=name, expected=expected, measured=measured, confirmed=bool(ok)))
        except Exception as e:  # report and go on: one broken probe must not hide the others
            rows.append(dict(delta=name, expected="", measured="probe failed: %s: %s" % (type(e).__name__, e),
                             confirmed=None))
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    return rows


def print_deltas(rows):
    print()
    print("CUDA deltas of torch-cuda (torch2-cpu + these), measured on %s:" % rows[0].get("device", "the GPU")
          if rows else "CUDA deltas: none measured")
    print("%-22s | %-60s | %-60s | %s" % ("delta", "expected", "measured", "confirmed?"))
    print("-" * 22 + "-+-" + "-" * 60 + "-+-" + "-" * 60 + "-+-----------")
    for r in rows:
        c = {True: "yes", False: "REFUTED", None: "not measured"}[r["confirmed"]]
        print("%-22s | %-60s | %-60s | %s" % (r["delta"], r["expected"], r["measured"], c))


def write_json(path, deltas, rows):
    if not path:
        return
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(dict(deltas=deltas, configs=rows), f, indent=1)
    os.replace(tmp, path)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--actsim", default=os.path.join(REPO, "build/tools/actsim"))
    ap.add_argument("--quick", action="store_true", help="batch 2, two layers (a smoke run)")
    ap.add_argument("--no-replay", action="store_true", help="skip actsim replay (PyTorch and simulate only)")
    ap.add_argument("--deltas-only", action="store_true", help="measure the CUDA deltas only (seconds)")
    ap.add_argument("--json", help="also write the delta rows and the configuration rows to this file")
    a = ap.parse_args()
    try:
        import torch
    except ImportError:
        print("torch_cuda_check: no torch; skipped")
        return 77
    if not torch.cuda.is_available():
        print("torch_cuda_check: no CUDA device; skipped")
        return 77
    deltas = measure_deltas(torch)
    dev_name = torch.cuda.get_device_name()
    for d in deltas:
        d["device"] = dev_name
        d["torch"] = torch.__version__
    print_deltas(deltas)
    write_json(a.json, deltas, [])
    ok = all(d["confirmed"] is True for d in deltas)
    print("deltas: %d of %d confirmed" % (sum(d["confirmed"] is True for d in deltas), len(deltas)))
    if a.deltas_only:
        print("torch_cuda_check: %s" % ("every delta confirmed" if ok else "a delta was refuted or not measured"))
        return 0 if ok else 1

    sys.path.insert(0, os.environ.get("ACTSIM_REFERENCE", os.path.join(REPO, "..", "shared", "reference")))
    if not os.path.isfile(os.path.join(sys.path[0], "models.py")):
        sys.path[0] = os.path.join(REPO, "shared", "reference")  # carried copy on the GPU machine
    import models

    rows = []
    for name, scen, over, m, batch, dtype in (QUICK if a.quick else CONFIGS):
        t = time.time()
        args = [os.path.join(REPO, scen)] + sets(over, batch, dtype) + ["--json"]
        sim, p = actsim_json([a.actsim, "simulate"] + args)
        if sim is None:
            print("simulate failed for %s:\n%s" % (name, p.stderr))
            ok = False
            continue
        rep = None
        if not a.no_replay:
            rep, p = actsim_json([a.actsim, "replay"] + args[:-1] + ["--backend", "cuda", "--confirm", "--json"])
            if rep is None:
                print("replay failed for %s:\n%s" % (name, p.stderr[-4000:]))
        tm = torch_measure(torch, models, m, batch, dtype)
        row = dict(name=name, sim_saved=sim["activations"]["saved_bytes"], sim_peak=sim["peak"]["bytes"],
                   sim_step_s=sim.get("step_time_ns", 0) / 1e9,
                   rep_peak=rep.get("measured_peak_bytes") if rep else None,
                   rep_sim_peak=rep.get("simulated_peak_bytes") if rep else None,
                   rep_confirm=rep.get("confirm") if rep else None,
                   rep_step_s=(rep.get("measured_step_seconds") or rep.get("step_seconds")) if rep else None,
                   torch_saved=tm["saved"], torch_peak=tm["peak"], torch_step_s=tm["step_s"],
                   seconds=time.time() - t)
        row["saved_equal"] = row["sim_saved"] == row["torch_saved"]
        row["peak_rel"] = (row["sim_peak"] - row["torch_peak"]) / row["torch_peak"]
        row["replay_equal"] = rep is not None and row["rep_peak"] == row["rep_sim_peak"]
        ok = ok and row["saved_equal"] and abs(row["peak_rel"]) <= 0.01 and (a.no_replay or row["replay_equal"])
        rows.append(row)

    mib = lambda b: "-" if b is None else "%.1f" % (b / 2**20)
    print()
    print("%-40s %12s %12s %12s | %12s %12s %12s %8s | %s" % (
        "configuration", "sim saved", "torch saved", "", "sim peak", "replay peak", "torch peak",
        "peak err", "confirm / step time (s) sim, replay, torch"))
    print("%-40s %12s %12s %12s | %12s %12s %12s %8s |" % ("", "MiB", "MiB", "", "MiB", "MiB", "MiB", ""))
    for r in rows:
        conf = r["rep_confirm"] or {}
        c = "safety=%s memory=%s tight=%s" % (conf.get("safety"), conf.get("memory"),
                                               (conf.get("tightness") or {}).get("confirmed"))
        print("%-40s %12s %12s %12s | %12s %12s %12s %7.2f%% | %s; %.3f, %s, %.3f" % (
            r["name"], mib(r["sim_saved"]), mib(r["torch_saved"]), "equal" if r["saved_equal"] else "DIFFER",
            mib(r["sim_peak"]), mib(r["rep_peak"]), mib(r["torch_peak"]), 100 * r["peak_rel"], c,
            r["sim_step_s"], r["rep_step_s"], r["torch_step_s"]))
    print()
    print("exact bytes:", json.dumps([{k: r[k] for k in ("name", "sim_saved", "torch_saved", "sim_peak",
                                                         "rep_peak", "torch_peak")} for r in rows]))
    write_json(a.json, deltas, rows)
    print_deltas(deltas)  # again, next to the configurations' table
    print("torch_cuda_check: %s" % ("all targets met" if ok else "a target was missed"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
