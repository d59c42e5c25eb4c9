#!/usr/bin/env python3
"""Byte-exact cross-check of actsim's CPU profiles against real PyTorch on the CPU.

usage: test_against_torch.py ACTSIM_BINARY [--oracle torch-cpu|torch2-cpu] [--only SUBSTRING]

  --oracle torch-cpu   (default) Debian's PyTorch 1.13 through /usr/bin/python3, the 25-configuration
                       spread below, actsim with runtime.profile=torch-cpu
  --oracle torch2-cpu  the pinned PyTorch 2.x in the project's .venv (scripts/setup.sh --tests), the
                       wider grid of GRID2, actsim with runtime.profile=torch2-cpu

For each configuration of a spread (both families, fp32 and bf16, dropout 0 and > 0, GQA, odd
sizes, every optimizer), runs the reference model with torch through tests/torch/measure.py
(saved_tensors_hooks for what autograd saves; the CPU profiler's allocation trace for the step) and
`actsim simulate --json` with runtime.profile=torch-cpu, and requires every figure to be equal to
the byte: activations.saved_bytes, per-layer and outside-the-blocks saved bytes, params, optimizer
state, buffers, live bytes at step start / end of forward / end of backward / after the optimizer,
and the step's peak. A mismatch means a save rule or an allocation model is wrong: fix the rule.
Exits 77 (skipped) when the oracle's python cannot import torch.
"""
import concurrent.futures
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import forkserver  # noqa: E402
from figures import figure_pairs  # noqa: E402
MEASURE = os.path.join(HERE, "measure.py")
ROOT = os.path.dirname(os.path.dirname(HERE))
ORACLES = {
    "torch-cpu": "/usr/bin/python3",
    "torch2-cpu": os.path.join(ROOT, ".venv", "bin", "python"),
}

BASE = dict(family="gpt2", vocab_size=97, seq_len=16, d_model=32, n_heads=4, n_layers=2, dropout=0.0,
            batch_size=2, dtype="fp32", optimizer="adamw", optimizer_impl="for_loop")

SPREAD = [
    {},
    {"dropout": 0.1},
    {"dtype": "bf16"},
    {"dtype": "bf16", "dropout": 0.1, "optimizer": "sgd_momentum"},
    {"optimizer": "adam"},
    {"optimizer": "sgd"},
    {"optimizer_impl": "foreach"},
    {"vocab_size": 101, "seq_len": 13, "d_model": 24, "n_heads": 3, "n_layers": 3, "batch_size": 3},
    {"family": "llama"},
    {"family": "llama", "n_kv_heads": 2},
    {"family": "llama", "dtype": "bf16", "n_kv_heads": 1},
    {"family": "llama", "dtype": "bf16", "optimizer_impl": "foreach"},
    {"family": "llama", "vocab_size": 89, "seq_len": 11, "d_model": 40, "n_heads": 10, "n_kv_heads": 5,
     "n_layers": 3, "batch_size": 3, "d_ff": 56},
    {"family": "llama", "vocab_size": 89, "seq_len": 20, "d_model": 48, "n_heads": 6, "n_kv_heads": 2,
     "n_layers": 2, "batch_size": 1, "dtype": "bf16"},
    {"family": "gpt2", "vocab_size": 211, "seq_len": 40, "d_model": 64, "n_heads": 8, "n_layers": 1,
     "batch_size": 4, "dropout": 0.2, "dtype": "bf16"},
    # trainable subsets (issue 12, recipe 3): frozen embeddings and first block, on both oracles
    {"trainable": "frozen:wte,wpe,blocks.{0..0}", "n_layers": 3, "dropout": 0.1},
    {"family": "llama", "trainable": "frozen:tok_embeddings,blocks.0"},
    # gradient accumulation (issue 12, recipe 2): N x (loss / N).backward(), then one step
    {"grad_accum_steps": 2, "dropout": 0.1},
    {"family": "llama", "grad_accum_steps": 3, "dtype": "bf16", "n_kv_heads": 2},
    # checkpoint implementations (issue 12, recipe 4), on both oracles (GRID2 includes SPREAD):
    # reentrant and non-reentrant, with and without preserve_rng_state, both families
    {"n_layers": 3, "checkpoint": "full", "dropout": 0.1, "checkpoint_impl": "reentrant"},
    {"n_layers": 4, "checkpoint": "every:2", "dropout": 0.1, "preserve_rng_state": "false"},
    {"family": "llama", "n_layers": 3, "checkpoint": "full"},
    {"family": "llama", "n_layers": 4, "checkpoint": "every:2", "dtype": "bf16", "n_kv_heads": 2,
     "checkpoint_impl": "reentrant", "preserve_rng_state": "false"},
    # autocast recipe (issue 12): the forward under torch.autocast("cpu", bf16), fp32 parameters
    {"autocast": "bf16"},
    {"family": "llama", "autocast": "bf16", "n_kv_heads": 2},
]

# PyTorch 2.x on the CPU: at least as wide as SPREAD, plus fp16, MQA, flash (SDPA on the CPU), the
# fused optimizers, and each optimizer in every implementation 2.x offers on the CPU.
G = dict(family="gpt2")
L = dict(family="llama")
GRID2 = SPREAD + [
    {"dtype": "fp16"},
    {"dtype": "fp16", "dropout": 0.1},
    {"family": "llama", "dtype": "fp16", "n_kv_heads": 2},
    {"family": "llama", "n_kv_heads": 1},
    {"attention": "flash"},
    {"attention": "flash", "dtype": "bf16"},
    {"family": "llama", "attention": "flash"},
    {"family": "llama", "attention": "flash", "dtype": "bf16", "n_kv_heads": 2},
    {"family": "llama", "attention": "flash", "dtype": "fp16", "n_kv_heads": 1},
] + [
    dict(fam, optimizer=o, optimizer_impl=i)
    for fam in (G, L)
    for o in ("adamw", "adam", "sgd", "sgd_momentum")
    for i in ("for_loop", "foreach", "fused")
    if not (fam is G and i == "for_loop" and o in ("adamw", "adam", "sgd"))  # already in SPREAD
] + [
    # torch.utils.checkpoint(use_reentrant=False), RNG state preserved (the default); ops:LIST with
    # selective activation checkpointing (create_selective_checkpoint_contexts, MUST_SAVE the list)
    {"n_layers": 4, "checkpoint": "full"},
    {"n_layers": 4, "checkpoint": "every:2"},
    {"family": "llama", "n_layers": 3, "checkpoint": "full", "dtype": "bf16"},
    {"family": "llama", "n_layers": 4, "checkpoint": "every:2", "n_kv_heads": 2},
    {"n_layers": 3, "checkpoint": "full", "dropout": 0.1},
    {"n_layers": 4, "checkpoint": "ops:mm,addmm"},
    {"n_layers": 2, "checkpoint": "ops:mm,addmm,softmax", "dropout": 0.1},
    {"family": "llama", "checkpoint": "ops:mm,silu"},
    {"family": "llama", "checkpoint": "full", "attention": "flash", "optimizer_impl": "foreach"},
    # reentrant checkpoint of the attention core: its arguments are strided views of the QKV output
    # (issue 12, recipe 4)
    {"n_layers": 3, "checkpoint": "selective", "dropout": 0.1, "checkpoint_impl": "reentrant"},
    # selective (Megatron-LM): the attention core alone as one checkpoint call
    {"n_layers": 3, "checkpoint": "selective", "dropout": 0.1},
    {"family": "llama", "checkpoint": "selective", "dtype": "bf16", "n_kv_heads": 2},
    # half-block checkpointing (mlp): each block's MLP sublayer, the segment between its last two
    # cut tensors, as one checkpoint call
    {"n_layers": 3, "checkpoint": "mlp", "dropout": 0.1},
    {"n_layers": 4, "checkpoint": "mlp", "dtype": "bf16"},
    {"family": "llama", "checkpoint": "mlp", "n_kv_heads": 2},
    {"family": "llama", "n_layers": 3, "checkpoint": "mlp", "attention": "flash", "dtype": "fp16"},
    {"dtype": "bf16", "optimizer_impl": "fused"},
    {"family": "llama", "dtype": "bf16", "optimizer": "adam", "optimizer_impl": "fused"},
    {"vocab_size": 101, "seq_len": 13, "d_model": 24, "n_heads": 3, "n_layers": 3, "batch_size": 3,
     "attention": "flash"},
    # LoRA as peft 0.21.2 applies it (issue 12, recipe 3): attention and all linears, both families
    {"trainable": "lora", "lora_targets": "c_attn,attn.c_proj", "lora_r": 4, "lora_alpha": 16},
    {"family": "llama", "trainable": "lora", "lora_targets": "q_proj,k_proj,v_proj,o_proj", "n_kv_heads": 2},
    {"trainable": "lora", "lora_targets": "all-linear", "lora_dropout": 0.1, "dropout": 0.1},
    {"family": "llama", "n_layers": 3, "trainable": "lora", "lora_targets": "all-linear", "checkpoint": "full",
     "dtype": "bf16"},
    # gradient accumulation with checkpointing and the other optimizer implementations
    {"grad_accum_steps": 3, "n_layers": 3, "checkpoint": "full", "dropout": 0.1},
    {"family": "llama", "grad_accum_steps": 2, "checkpoint": "full", "optimizer_impl": "foreach"},
    {"grad_accum_steps": 2, "dtype": "bf16", "optimizer_impl": "fused"},
    # autocast recipe (issue 12): fp16 with torch.amp.GradScaler, checkpointing and dropout under bf16
    {"autocast": "fp16"},
    {"family": "llama", "autocast": "fp16", "attention": "flash"},
    {"n_layers": 3, "checkpoint": "full", "autocast": "bf16"},
    {"autocast": "bf16", "dropout": 0.1},
]

# Recipes combined (issue 12): accumulation with LoRA and checkpointing, with autocast and
# checkpointing, and autocast with LoRA.
GRID2 += [
    {"family": "llama", "trainable": "lora", "lora_targets": "all-linear", "checkpoint": "full",
     "grad_accum_steps": 2, "n_kv_heads": 2},
    {"family": "llama", "autocast": "bf16", "checkpoint": "full", "grad_accum_steps": 2, "n_kv_heads": 2},
    {"autocast": "bf16", "trainable": "lora", "lora_targets": "c_attn,attn.c_proj", "grad_accum_steps": 3,
     "dropout": 0.1},
    # autocast with LoRA and checkpointing (peft's float32 copy of a bf16 input, the recomputation's
    # weight-cast cache and early stop), then all four recipes at once on both families
    {"family": "llama", "autocast": "bf16", "trainable": "lora", "lora_targets": "all-linear", "checkpoint": "full",
     "n_kv_heads": 2},
    {"family": "llama", "autocast": "bf16", "trainable": "lora", "lora_targets": "all-linear", "checkpoint": "full",
     "grad_accum_steps": 2},
    {"n_layers": 3, "autocast": "bf16", "trainable": "lora", "lora_targets": "all-linear", "checkpoint": "full",
     "grad_accum_steps": 2, "dropout": 0.1},
    # fp16 autocast with accumulation: every micro-batch's scaler.scale(loss).backward(), one unscale_
    {"family": "llama", "autocast": "fp16", "grad_accum_steps": 3, "n_kv_heads": 2},
]

MODEL_KEYS = ["family", "vocab_size", "seq_len", "d_model", "n_heads", "n_kv_heads", "n_layers", "d_ff", "dropout",
              "attention"]
OTHER_KEYS = {"checkpoint": "checkpoint.policy", "grad_accum_steps": "training.grad_accum_steps",
              # trainable subsets (issue 12, recipe 3)
              "trainable": "training.trainable", "lora_r": "lora.r", "lora_alpha": "lora.alpha",
              "lora_dropout": "lora.dropout", "lora_targets": "lora.targets",
              # checkpoint implementation (issue 12, recipe 4)
              "checkpoint_impl": "checkpoint.impl", "preserve_rng_state": "checkpoint.preserve_rng_state",
              "autocast": "training.autocast"}  # autocast recipe (issue 12, recipe 1)
TRAIN_KEYS = ["batch_size", "dtype", "optimizer", "optimizer_impl"]


def run_json(cmd):
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}): {p.stderr.strip()}")
    return json.loads(p.stdout)


def measure_json(pool, argv):
    rc, out, err = pool.run(argv)
    if rc != 0:
        raise RuntimeError(f"measure.py {' '.join(argv)} failed ({rc}): {err.strip()[-2000:]}")
    return json.loads(out)


def check(actsim, oracle, pool, overrides):
    cfg = dict(BASE, **overrides)
    kv = [f"{k}={v}" for k, v in cfg.items()]
    sets = ["--set", f"runtime.profile={oracle}"]
    for k in MODEL_KEYS:
        if k in cfg:
            sets += ["--set", f"model.{k}={cfg[k]}"]
    for k in TRAIN_KEYS:
        sets += ["--set", f"training.{k}={cfg[k]}"]
    for k, key in OTHER_KEYS.items():
        if k in cfg:
            sets += ["--set", f"{key}={cfg[k]}"]
    a = run_json([actsim, "simulate", "--json", "--no-fit"] + sets)
    both = measure_json(pool, ["--mode", "both"] + kv)
    s, m = both["saved"], both["memory"]
    per_layer = a["activations"]["per_layer_saved_bytes"]
    ck = cfg.get("checkpoint", "none")
    if ck.startswith("every:"):  # torch sees one module (one checkpoint call) per K blocks
        k = int(ck.split(":")[1])
        per_layer = [sum(per_layer[i:i + k]) for i in range(0, len(per_layer), k)]
    pairs = figure_pairs(a, m, s, per_layer)
    bad = [f"{name}: actsim {x} != torch {y}" for name, x, y in pairs if x != y]
    return label_of(overrides), bad, a["peak"]["bytes"]


def label_of(overrides):
    return " ".join(f"{k}={v}" for k, v in overrides.items()) or "(base)"


def main():
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("actsim")
    ap.add_argument("--oracle", choices=tuple(ORACLES), default="torch-cpu")
    ap.add_argument("--only", default="", help="run the configurations whose label contains this")
    args = ap.parse_args()
    py = ORACLES[args.oracle]
    probe = subprocess.run([py, "-c", "import torch"], capture_output=True) if os.path.exists(py) else None
    if probe is None or probe.returncode != 0:
        print(f"skipped: {py} cannot import torch (scripts/setup.sh --tests installs it)")
        return 77
    grid = SPREAD if args.oracle == "torch-cpu" else GRID2
    grid = [o for o in grid if args.only in label_of(o)]
    passed = failed = 0
    # Two measurement servers: torch is imported once per server, each configuration runs in a
    # fresh forked child (tests/torch/forkserver.py).
    with forkserver.Pool([py, MEASURE, "--serve"], workers=2) as pool, \
            concurrent.futures.ThreadPoolExecutor(max_workers=2) as ex:
        for label, bad, peak in ex.map(lambda o: check(args.actsim, args.oracle, pool, o), grid):
            if bad:
                failed += 1
                print(f"FAIL {label}")
                for b in bad:
                    print(f"     {b}")
            else:
                passed += 1
                print(f"ok   {label}: every figure equal to the byte (peak {peak} B)")
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
