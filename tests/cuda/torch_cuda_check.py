#!/usr/bin/env python3
"""The torch-cuda profile against real PyTorch on the same GPU, next to the CUDA replay.

For each configuration: `actsim simulate --json` (profile torch-cuda) gives the simulated saved
bytes and peak; `actsim replay --backend cuda --confirm --json` gives the measured peak (bytes in
use through the backend) and the confirmations; PyTorch 2.x runs ../shared/reference/models.py on
cuda for the same step (AdamW foreach, steady state: one warm-up step first, zero_grad(set_to_none))
and reports autograd's saved bytes (saved_tensors_hooks, deduplicated by storage, CUDA storages
only, parameters left out) and torch.cuda.max_memory_allocated() over the step. Prints one table.

    python3 tests/cuda/torch_cuda_check.py --actsim build/tools/actsim [--quick]

Exit status: 0 every target met, 1 a target missed, 2 usage, 77 no CUDA (skipped).
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


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--actsim", default=os.path.join(REPO, "build/tools/actsim"))
    ap.add_argument("--quick", action="store_true", help="batch 2, two layers (a smoke run)")
    ap.add_argument("--no-replay", action="store_true", help="skip actsim replay (PyTorch and simulate only)")
    ap.add_argument("--json", help="also write the rows to this file")
    a = ap.parse_args()
    try:
        import torch
    except ImportError:
        print("torch_cuda_check: no torch; skipped")
        return 77
    if not torch.cuda.is_available():
        print("torch_cuda_check: no CUDA device; skipped")
        return 77
    sys.path.insert(0, os.environ.get("ACTSIM_REFERENCE", os.path.join(REPO, "..", "shared", "reference")))
    if not os.path.isfile(os.path.join(sys.path[0], "models.py")):
        sys.path[0] = os.path.join(REPO, "shared", "reference")  # carried copy on the GPU machine
    import models

    rows, ok = [], True
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
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    print("torch_cuda_check: %s" % ("all targets met" if ok else "a target was missed"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
