#!/usr/bin/env python3
"""Measure one training step of a Hugging Face transformers model built from a config.json.

The ground truth for `model.hf_config` scenarios. It builds the model with random weights from the
config alone (AutoModelForCausalLM.from_config; no hub, HF_HUB_OFFLINE=1), in train mode, and runs
the step a user runs: `model(input_ids=idx, labels=targets).loss`, backward, optimizer step,
zero_grad(set_to_none=True), after a warm-up step. The measurement machinery (saved-tensor hooks,
the CPU profiler's allocation trace) is measure.py's, unchanged.

usage: .venv/bin/python tests/torch/measure_hf.py --mode saved|memory|both [--trace] CONFIG.json
           [batch_size=2] [seq_len=16] [dtype=fp32] [attn=sdpa|eager] [optimizer=adamw]
           [optimizer_impl=for_loop] [routing=N0,N1,...[;...]]
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
            "optimizer_impl": "for_loop", "seed": 0, "threads": 1, "grad_accum_steps": 1,
            # trainable subsets (issue 12, recipe 3; recipes_lora.py)
            "trainable": "all", "lora_r": 8, "lora_alpha": "8", "lora_dropout": "0.0", "lora_targets": "q_proj,v_proj",
            # issue 11 (hfrest): force a mixture-of-experts router's choice: tokens per expert,
            # "n0,n1,..." for every layer or one list per layer separated by ';' ("" = the router's own)
            "routing": "",
            # issue 12 on transformers models: the forward under torch.autocast (recipes_amp.py), and
            # transformers' own gradient checkpointing, hf.gradient_checkpointing_enable(
            # gradient_checkpointing_kwargs={"use_reentrant": checkpoint_impl == "reentrant"}):
            # checkpoint=full (every decoder layer) or none
            "autocast": "none", "checkpoint": "none", "checkpoint_impl": "nonreentrant"}


def assignment(counts, n_tokens, top_k):
    """(n_tokens, top_k) expert ids in which expert e appears counts[e] times and never twice in a
    row: the experts' runs laid out column by column (a run of at most n_tokens is in distinct rows)."""
    slots = [e for e, c in enumerate(counts) for _ in range(c)]
    assert len(slots) == n_tokens * top_k and max(counts) <= n_tokens, (counts, n_tokens, top_k)
    rows = [[0] * top_k for _ in range(n_tokens)]
    for s, e in enumerate(slots):
        rows[s % n_tokens][s // n_tokens] = e
    return rows


def force_routing(torch, hf, spec, n_tokens):
    """Replace each MixtralTopKRouter.forward by the same code whose topk indices are then
    overwritten (through .data, so autograd's saved indices are the same storage, unversioned) with
    a prescribed assignment. The tensors, their sizes and the autograd graph are the router's own."""
    import types
    from transformers.models.mixtral import modeling_mixtral
    lists = [[int(c) for c in part.split(",")] for part in spec.split(";")]
    routers = [m for m in hf.modules() if isinstance(m, modeling_mixtral.MixtralTopKRouter)]
    F = torch.nn.functional
    for i, router in enumerate(routers):
        rows = assignment(lists[i if len(lists) > 1 else 0], n_tokens, router.top_k)

        def forward(self, hidden_states, rows=rows):
            hidden_states = hidden_states.reshape(-1, self.hidden_dim)
            router_logits = F.linear(hidden_states, self.weight)
            router_probs = torch.nn.functional.softmax(router_logits.float(), dim=-1)
            router_top_value, router_indices = torch.topk(router_probs, self.top_k, dim=-1)
            router_indices.data.copy_(torch.tensor(rows, dtype=router_indices.dtype))  # the forced choice
            router_top_value /= router_top_value.sum(dim=-1, keepdim=True)
            return router_logits, router_top_value, router_indices
        router.forward = types.MethodType(forward, router)


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


def outer_layers(torch, hf):
    """Each decoder layer behind a module that only calls it, so that measure.py's block hooks run
    outside the checkpoint call that the layer's own __call__ makes (GradientCheckpointingLayer), as
    they do around recipes.Checkpointed for the reference models. The wrapper holds no tensor."""
    class Outer(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *args, **kwargs):
            return self.inner(*args, **kwargs)

        def __getattr__(self, name):  # attention_type, ... as the model reads them off its layers
            try:
                return super().__getattr__(name)
            except AttributeError:
                return getattr(super().__getattr__("inner"), name)
    layers = blocks_of(hf)
    for i in range(len(layers)):
        layers[i] = Outer(layers[i])


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
        if cfg["trainable"] != "all":  # peft / frozen patterns on the transformers model itself
            import recipes_lora
            recipes_lora.apply(hf, cfg)
        if cfg["dtype"] != "fp32":
            hf.to(measure.torch_dtype(torch, cfg["dtype"]))
        if cfg["routing"]:
            force_routing(torch, hf, cfg["routing"], cfg["batch_size"] * cfg["seq_len"])
        if cfg["checkpoint"] not in ("none", "full"):
            raise ValueError("checkpoint=%s: transformers checkpoints every decoder layer (full) or none"
                             % cfg["checkpoint"])
        if cfg["checkpoint"] == "full":
            hf.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": cfg["checkpoint_impl"] == "reentrant"})
            outer_layers(torch, hf)
        model = make_wrapper(torch)(hf)
        if cfg["autocast"] != "none":
            import recipes_amp
            recipes_amp.wrap_autocast(model, measure.torch_dtype(torch, cfg["autocast"]))
            model.grad_scaler = recipes_amp.make_scaler() if cfg["autocast"] == "fp16" else None
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
