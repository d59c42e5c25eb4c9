#!/usr/bin/env python3
"""Peers, measured side by side: a comparison (not a gate) of memory estimators against PyTorch.

The same 5 reference-model configurations (shared/reference/models.py) are each given to:

  truth      tests/torch/measure.py --mode both: one steady-state training step under PyTorch 2.x's
             CPU profiler (`peak.bytes`) and the tensors autograd saves (`saved_bytes`).
  actsim     ACTSIM_BINARY simulate --json --no-fit --set runtime.profile=torch2-cpu ...
             (`peak.bytes`, `activations.saved_bytes`).
  accelerate `accelerate estimate-memory`'s own code (accelerate/commands/estimate.py), run on the
             reference nn.Module instead of a hub model: `create_empty_model` is swapped for one
             that builds the reference model in fp32 (as the command's meta-device model is; built
             for real so that gpt2's tied embedding stays tied, as tie_weights() keeps it),
             then `gather_data` -> `calculate_maximum_sizes` (parameters + buffers)
             -> `estimate_training_usage`, and the "Training using Adam" column is
             max(dict.values()) exactly as `estimate_command` prints it. fp32 runs use the command's
             `float32` row, bf16 runs its `float16` row (the 16-bit training rule is the same for
             float16 and bfloat16). It sees parameters only: no activations, no batch size.
             Only where the wheel is importable; otherwise "n/a".
  Megatron   Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer
             Models", Sec. 4.1: per layer s*b*h*(34 + 5*a*s/h) bytes for 16-bit activations with
             dropout. Without dropout its dropout terms go: the attention-probability mask a*s^2*b
             and dropout output 2*a*s^2*b (x V then reads the softmax output, already counted), the
             attention-output and MLP-output masks s*b*h each: s*b*h*(32 + 2*a*s/h).
             fp32 runs multiply the activation bytes by 2 (4-byte elements, masks included). Model
             states: 16 bytes per parameter (mixed-precision Adam; equally fp32 params 4 + grads 4 +
             Adam m, v 8). Peak = 16 * P + L * per-layer activations; it ignores embeddings, the
             final norm, the logits and the loss, and every temporary. llama gets the same (GPT)
             formula with h = d_model, a = n_heads (no GQA, SwiGLU or RMSNorm terms): that is how
             the formula is used in practice.

For each configuration the table gives each peer's peak and its signed error relative to the
measured peak, (peer - truth) / truth in %, plus the saved bytes: actsim's and Megatron's
activation term against the measured `saved_bytes`. docs/peers.md describes the peers and shows a
run's table.

Usage (from the repository root; the project's virtual environment has PyTorch 2.x and accelerate):

    .venv/bin/python tests/torch/peers.py ACTSIM_BINARY [--markdown]

Exit status: 0 the table was printed (whatever the errors: this is a comparison, not a gate);
1 a peer's run failed (its cells read "failed", the table is still printed); 2 bad command line
or ACTSIM_BINARY not executable; 77 this python has no torch (skip). About 40 s on one CPU core.
The reference models are found through $ACTSIM_REFERENCE, else <repo root>/../shared/reference
(as measure.py does).
"""
import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
MEASURE = os.path.join(HERE, "measure.py")
EXIT_SKIP = 77
ACTSIM_TRIES = 3  # a binary being rebuilt may be missing for a moment: retry 30 s apart

# name, KEY=VALUE settings in measure.py's keys (the rest are measure.py's defaults: adamw,
# for_loop, threads=1, seed=0). Small enough that each measure.py run takes a few seconds on one
# CPU core.
CONFIGS = [
    ("gpt2 fp32", dict(family="gpt2", vocab_size=512, seq_len=128, d_model=128, n_heads=4,
                       n_layers=2, dropout=0.0, batch_size=2, dtype="fp32")),
    ("gpt2 bf16 dropout 0.1", dict(family="gpt2", vocab_size=512, seq_len=128, d_model=128,
                                   n_heads=4, n_layers=2, dropout=0.1, batch_size=2, dtype="bf16")),
    ("llama fp32", dict(family="llama", vocab_size=512, seq_len=128, d_model=128, n_heads=4,
                        n_layers=2, batch_size=2, dtype="fp32")),
    ("llama bf16 GQA 8/2", dict(family="llama", vocab_size=512, seq_len=128, d_model=128,
                                n_heads=8, n_kv_heads=2, n_layers=2, batch_size=2, dtype="bf16")),
    ("gpt2 fp32 dropout 0.1, bigger", dict(family="gpt2", vocab_size=1024, seq_len=256,
                                           d_model=256, n_heads=8, n_layers=4, dropout=0.1,
                                           batch_size=4, dtype="fp32")),
]
DEFAULTS = dict(optimizer="adamw", optimizer_impl="for_loop")
ELEMENT_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}

# measure.py keys -> actsim scenario keys
ACTSIM_KEYS = {
    "family": "model.family", "vocab_size": "model.vocab_size", "seq_len": "model.seq_len",
    "d_model": "model.d_model", "n_heads": "model.n_heads", "n_kv_heads": "model.n_kv_heads",
    "n_layers": "model.n_layers", "d_ff": "model.d_ff", "dropout": "model.dropout",
    "batch_size": "training.batch_size", "dtype": "training.dtype",
    "optimizer": "training.optimizer", "optimizer_impl": "training.optimizer_impl",
}


class PeerFailed(Exception):
    """A peer's run failed; its cells read "failed"."""


def reference_models():
    ref = os.environ.get("ACTSIM_REFERENCE") or os.path.join(REPO, "..", "shared", "reference")
    spec = importlib.util.spec_from_file_location("actsim_reference_models",
                                                  os.path.join(ref, "models.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def build(models, cfg):
    return models.build_model(cfg["family"], cfg["vocab_size"], cfg["seq_len"], cfg["d_model"],
                              cfg["n_heads"], cfg["n_layers"], cfg.get("d_ff"),
                              cfg.get("dropout", 0.0), cfg.get("n_kv_heads"))


def run_json(argv, what, tries=1, wait_s=0):
    """Run argv, parse its stdout as one JSON object. Retries when the program could not start or
    died of a signal (a binary being rebuilt), not when it exited with an error status."""
    last = ""
    for attempt in range(tries):
        if attempt:
            time.sleep(wait_s)
        try:
            p = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        except OSError as e:
            last = str(e)
            continue
        if p.returncode == 0:
            try:
                return json.loads(p.stdout)
            except ValueError as e:
                last = "bad JSON: %s" % e
                continue
        tail = p.stderr.strip().splitlines()
        last = "exit %d: %s" % (p.returncode, tail[-1] if tail else "")
        if p.returncode > 0:
            break  # a real answer (bad or unsupported configuration...): retrying will not help
    raise PeerFailed("%s failed (%s)" % (what, last))


def truth(cfg):
    settings = ["%s=%s" % kv for kv in cfg.items()]
    d = run_json([sys.executable, MEASURE, "--mode", "both"] + settings, "measure.py")
    return {"peak": d["memory"]["peak"]["bytes"], "saved": d["saved"]["saved_bytes"],
            "params_bytes": d["memory"]["params_bytes"]}


def actsim(binary, cfg):
    argv = [binary, "simulate", "--json", "--no-fit", "--set", "runtime.profile=torch2-cpu"]
    for k, v in cfg.items():
        argv += ["--set", "%s=%s" % (ACTSIM_KEYS[k], v)]
    global ACTSIM_TRIES
    try:
        d = run_json(argv, "actsim", tries=ACTSIM_TRIES, wait_s=30)
    except PeerFailed:
        ACTSIM_TRIES = 1  # it stayed down for a minute: do not wait again for the next ones
        raise
    return {"peak": d["peak"]["bytes"], "saved": d["activations"]["saved_bytes"]}


def accelerate_estimate(models, cfg):
    """accelerate estimate-memory's "Training using Adam" figure, from its own functions."""
    try:
        from accelerate.commands import estimate
    except ImportError:
        return None

    def create_empty_model(model_name, library_name, trust_remote_code=False, access_token=None):
        # The command builds a hub model under init_empty_weights() (meta device, fp32) and
        # transformers then re-ties shared weights. Here the reference model is built for real, in
        # fp32: the sizes are the same numel * 4, and gpt2's tied wte/lm_head stays tied
        # (init_empty_weights re-registers lm_head.weight as a new meta Parameter, so the tie
        # models.py makes by assignment would be lost and the matrix counted twice).
        return build(models, cfg)

    saved = estimate.create_empty_model
    estimate.create_empty_model = create_empty_model
    try:
        row_dtype = "float32" if cfg["dtype"] == "fp32" else "float16"
        args = argparse.Namespace(model_name="actsim-reference-" + cfg["family"],
                                  library_name="transformers", trust_remote_code=False,
                                  access_token=None, dtypes=[row_dtype])
        (row,) = estimate.gather_data(args)
    finally:
        estimate.create_empty_model = saved
    dtype, largest_layer, total_size, training = row
    return {"peak": max(training.values()), "model_bytes": total_size, "breakdown": training}


def megatron(models, cfg):
    """Korthikanti et al. 2022, eq. (1) per layer; 16 bytes/param model states; no logits."""
    s, b, h = cfg["seq_len"], cfg["batch_size"], cfg["d_model"]
    a, L = cfg["n_heads"], cfg["n_layers"]
    if cfg.get("dropout", 0.0) > 0:
        per_layer = s * b * h * 34 + 5 * a * s * s * b    # = sbh(34 + 5as/h), 16-bit
    else:
        per_layer = s * b * h * 32 + 2 * a * s * s * b    # the dropout masks and output gone
    per_layer = per_layer * ELEMENT_BYTES[cfg["dtype"]] // 2  # fp32: x2
    n_params = sum(p.numel() for p in build(models, cfg).parameters())  # tied weights once
    return {"peak": 16 * n_params + L * per_layer, "saved": L * per_layer, "params": n_params}


def err(value, ref):
    if value is None or ref is None:
        return None
    return 100.0 * (value - ref) / ref


def fmt_bytes(n):
    if n is None:
        return "n/a"
    if isinstance(n, str):
        return n
    return "%.2f MiB" % (n / 2**20)


def fmt_err(e):
    return "" if e is None else "%+.1f%%" % e


def cell(peer, key, ref):
    if isinstance(peer, str):  # "failed" / "n/a"
        return peer
    v = peer[key]
    e = err(v, ref)
    if e is None:
        return fmt_bytes(v)
    if v == ref:
        return "%s (exact)" % fmt_bytes(v)
    return "%s (%s)" % (fmt_bytes(v), "%+.3f%%" % e if abs(e) < 0.05 else fmt_err(e))


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Compare accelerate estimate-memory, the Megatron formula and actsim "
                    "against PyTorch's measured peak (a comparison, not a gate).")
    parser.add_argument("actsim", metavar="ACTSIM_BINARY")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    args = parser.parse_args(argv)
    try:
        import torch  # noqa: F401
    except ImportError:
        print("peers.py: %s has no torch; skipping (run it with .venv/bin/python)" % sys.executable,
              file=sys.stderr)
        return EXIT_SKIP
    if not os.access(args.actsim, os.X_OK):
        parser.error("%s is not an executable (build actsim first)" % args.actsim)
    models = reference_models()

    rows, failed = [], False
    for name, base in CONFIGS:
        cfg = dict(DEFAULTS, **base)
        print("peers.py: %s ..." % name, file=sys.stderr, flush=True)
        r = {"name": name, "cfg": cfg}
        for key, fn in (("truth", lambda: truth(cfg)), ("actsim", lambda: actsim(args.actsim, cfg)),
                        ("accelerate", lambda: accelerate_estimate(models, cfg)),
                        ("megatron", lambda: megatron(models, cfg))):
            try:
                r[key] = fn()
                if r[key] is None:
                    r[key] = "n/a"
            except PeerFailed as e:
                print("peers.py: %s: %s" % (name, e), file=sys.stderr)
                r[key], failed = "failed", True
        rows.append(r)

    headers = ["configuration", "PyTorch peak", "actsim peak", "accelerate", "Megatron peak",
               "PyTorch saved", "actsim saved", "Megatron act."]
    table = []
    for r in rows:
        t = r["truth"] if isinstance(r["truth"], dict) else None
        peak = t["peak"] if t else None
        saved = t["saved"] if t else None
        table.append([r["name"], fmt_bytes(peak) if t else r["truth"],
                      cell(r["actsim"], "peak", peak), cell(r["accelerate"], "peak", peak),
                      cell(r["megatron"], "peak", peak), fmt_bytes(saved) if t else r["truth"],
                      cell(r["actsim"], "saved", saved), cell(r["megatron"], "saved", saved)])

    if args.markdown:
        print("| " + " | ".join(headers) + " |")
        print("|" + "|".join("---" if i == 0 else "---:" for i in range(len(headers))) + "|")
        for row in table:
            print("| " + " | ".join(row) + " |")
    else:
        widths = [max(len(x) for x in col) for col in zip(headers, *table)]
        for row in [headers] + table:
            print("  ".join(x.ljust(w) if i == 0 else x.rjust(w)
                            for i, (x, w) in enumerate(zip(row, widths))))
    print()
    print("configurations (measure.py keys; optimizer=adamw optimizer_impl=for_loop threads=1):")
    for r in rows:
        keys = " ".join("%s=%s" % kv for kv in r["cfg"].items()
                        if kv[0] not in ("optimizer", "optimizer_impl"))
        extra = ""
        if isinstance(r["megatron"], dict):
            extra = "  (P=%d)" % r["megatron"]["params"]
        print("- %s: %s%s" % (r["name"], keys, extra))
    print("error = (peer - PyTorch) / PyTorch; 'Megatron act.' is L * per-layer activations "
          "against PyTorch's saved bytes")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
