#!/usr/bin/env python3
"""Measure one training step of a Hugging Face transformers model built from a config.json.

The ground truth for `model.hf_config` scenarios. It builds the model with random weights from the
config alone (AutoModelForCausalLM.from_config; no hub, HF_HUB_OFFLINE=1), in train mode, and runs
the step a user runs: `model(input_ids=idx, labels=targets).loss`, backward, optimizer step,
zero_grad(set_to_none=True), after a warm-up step. The measurement machinery (saved-tensor hooks,
the CPU profiler's allocation trace) is measure.py's, unchanged.

usage: .venv/bin/python tests/torch/measure_hf.py --mode saved|memory|both [--trace] CONFIG.json
           [batch_size=2] [seq_len=16] [dtype=fp32] [attn=sdpa|eager] [optimizer=adamw]
           [optimizer_impl=for_loop]
"""
import argparse
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import measure  # noqa: E402

DEFAULTS = {"batch_size": 2, "seq_len": 16, "dtype": "fp32", "attn": "sdpa", "optimizer": "adamw",
            "optimizer_impl": "for_loop", "seed": 0, "threads": 1}


def blocks_of(hf):
    """The decoder layers, whatever the family calls them."""
    for path in ("model.layers", "transformer.h", "gpt_neox.layers"):
        obj = hf
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
            return obj
        except AttributeError:
            continue
    raise RuntimeError("no decoder layers found in %s" % type(hf).__name__)


def make_wrapper(torch):
    class Step(torch.nn.Module):
        """model(idx, targets) -> loss, as measure.py calls the reference models. The outputs
        object (and whatever it holds) is dropped when forward returns, as in
        `loss = model(input_ids=x, labels=y).loss`."""

        def __init__(self, hf):
            super().__init__()
            self.hf = hf
            self.blocks = blocks_of(hf)

        def forward(self, idx, targets):
            return self.hf(input_ids=idx, labels=targets).loss
    return Step


def make_build(config_path):
    def build(torch, models, cfg):
        import transformers
        torch.manual_seed(cfg["seed"])
        conf = transformers.AutoConfig.from_pretrained(config_path)
        hf = transformers.AutoModelForCausalLM.from_config(conf, attn_implementation=cfg["attn"])
        if cfg["dtype"] != "fp32":
            hf.to(measure.torch_dtype(torch, cfg["dtype"]))
        model = make_wrapper(torch)(hf)
        model.train()
        shape = (cfg["batch_size"], cfg["seq_len"])
        vocab = conf.vocab_size
        idx = torch.randint(0, vocab, shape, dtype=torch.int64)
        targets = torch.randint(0, vocab, shape, dtype=torch.int64)
        return model, idx, targets
    return build


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", required=True, choices=("saved", "memory", "both"))
    ap.add_argument("--trace", action="store_true")
    ap.add_argument("config")
    ap.add_argument("settings", nargs="*", metavar="KEY=VALUE")
    args = ap.parse_args(argv)
    cfg = dict(DEFAULTS)
    for pair in args.settings:
        k, _, v = pair.partition("=")
        if k not in cfg:
            ap.error("unknown key %r" % k)
        cfg[k] = int(v) if isinstance(DEFAULTS[k], int) else v
    import torch
    torch.set_num_threads(cfg["threads"])
    measure.build = make_build(args.config)
    if args.mode in ("saved", "both"):
        saved = measure.measure_saved(torch, None, cfg, args.trace)
    if args.mode in ("memory", "both"):
        memory = measure.measure_memory(torch, None, cfg, args.trace)
    if args.mode == "saved":
        result = saved
    elif args.mode == "memory":
        result = memory
    else:
        result = {"saved": saved, "memory": memory, "loss": memory["loss"]}
    json.dump(result, sys.stdout, indent=1 if args.trace else None)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    if sys.argv[1:] == ["--serve"]:  # many runs from one import of torch and transformers
        import forkserver
        forkserver.serve(main, preload=("torch", "transformers", "transformers.models.auto.modeling_auto"))
        sys.exit(0)
    sys.exit(main())
