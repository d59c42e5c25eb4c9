#!/usr/bin/env python3
"""Byte-exact cross-check of imported Hugging Face configs against transformers itself.

usage: test_against_hf.py ACTSIM_BINARY [--only SUBSTRING] [--list]

For each configuration below (scaled-down configs of the supported architectures that keep every
architectural flag: GQA, biases, tied embeddings, q/k norm, a head_dim that is not hidden/heads, a
sliding window, use_cache off; odd vocabulary sizes), it writes the config.json, builds the model
with transformers (the pinned version in .venv) from the config alone with random weights
(tests/torch/measure_hf.py: AutoModelForCausalLM.from_config, HF_HUB_OFFLINE=1, model.train(),
`model(input_ids=x, labels=y).loss`, one steady-state AdamW step), and runs
`actsim simulate --json --no-fit --hf CONFIG --set runtime.profile=torch2-cpu ...`. Every figure of
the torch2-cpu cross-check must be equal to the byte: saved bytes (total, per layer, outside the
layers), params, optimizer state, buffers, inputs, live bytes at every boundary, the peak and its
phase. Exits 77 (skipped) when .venv's python cannot import torch and transformers.
"""
import concurrent.futures
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import forkserver  # noqa: E402
from figures import figure_pairs  # noqa: E402
MEASURE = os.path.join(HERE, "measure_hf.py")
ROOT = os.path.dirname(os.path.dirname(HERE))
PYTHON = os.path.join(ROOT, ".venv", "bin", "python")

LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 32,
         "intermediate_size": 56, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "vocab_size": 97, "max_position_embeddings": 64,
         "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": False,
         "hidden_act": "silu"}
MISTRAL = {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": 48,
           "intermediate_size": 72, "num_hidden_layers": 2, "num_attention_heads": 6,
           "num_key_value_heads": 2, "vocab_size": 89, "max_position_embeddings": 128,
           "sliding_window": 64, "rope_theta": 1000000.0, "tie_word_embeddings": False}
QWEN2 = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 40,
         "intermediate_size": 88, "num_hidden_layers": 3, "num_attention_heads": 5,
         "num_key_value_heads": 1, "vocab_size": 101, "max_position_embeddings": 64,
         "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "tie_word_embeddings": True,
         "use_sliding_window": False, "sliding_window": 32}
QWEN3 = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 32,
         "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 83, "max_position_embeddings": 64,
         "rms_norm_eps": 1e-6, "tie_word_embeddings": True, "attention_bias": False}
PHI3 = {"architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "hidden_size": 48,
        "intermediate_size": 80, "num_hidden_layers": 2, "num_attention_heads": 6,
        "num_key_value_heads": 2, "vocab_size": 107, "max_position_embeddings": 64,
        "original_max_position_embeddings": 64, "sliding_window": 63, "rms_norm_eps": 1e-5,
        "resid_pdrop": 0.0, "embd_pdrop": 0.0, "tie_word_embeddings": False, "pad_token_id": 0,
        "bos_token_id": 1, "eos_token_id": 2}
GPT2 = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_embd": 48, "n_layer": 2,
        "n_head": 4, "n_positions": 40, "vocab_size": 103, "resid_pdrop": 0.0, "embd_pdrop": 0.0,
        "attn_pdrop": 0.0, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
        "bos_token_id": 1, "eos_token_id": 2}
NEOX = {"architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox", "hidden_size": 64,
        "intermediate_size": 112, "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 109,
        "max_position_embeddings": 64, "rotary_pct": 0.25, "rotary_emb_base": 10000,
        "use_parallel_residual": True, "hidden_act": "gelu", "layer_norm_eps": 1e-5,
        "tie_word_embeddings": False, "bos_token_id": 0, "eos_token_id": 0}
GEMMA = {"architectures": ["GemmaForCausalLM"], "model_type": "gemma", "hidden_size": 48,
         "intermediate_size": 80, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 1, "head_dim": 16, "vocab_size": 113, "max_position_embeddings": 64,
         "rms_norm_eps": 1e-6, "hidden_act": "gelu", "tie_word_embeddings": True, "pad_token_id": 0,
         "bos_token_id": 2, "eos_token_id": 1}
# issue 11 (hfrest): Gemma2 -- softcapping, query_pre_attn_scalar, the feedforward norms, alternating
# sliding-window layers.
GEMMA2 = {"architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2", "hidden_size": 48,
          "intermediate_size": 80, "num_hidden_layers": 3, "num_attention_heads": 4,
          "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 127, "max_position_embeddings": 64,
          "query_pre_attn_scalar": 24, "sliding_window": 32, "attn_logit_softcapping": 50.0,
          "final_logit_softcapping": 30.0, "rms_norm_eps": 1e-6, "pad_token_id": 0, "bos_token_id": 2,
          "eos_token_id": 1}
# issue 11 (hfrest): a mixture of experts; `routing` forces the router's choice in the reference
# run (measure_hf.py) and is given to actsim as model.moe_routing.
MIXTRAL = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": 32,
           "intermediate_size": 40, "num_hidden_layers": 2, "num_attention_heads": 4,
           "num_key_value_heads": 2, "vocab_size": 97, "max_position_embeddings": 64,
           "num_local_experts": 4, "num_experts_per_tok": 2, "rms_norm_eps": 1e-5,
           "tie_word_embeddings": False}

# (label, config, run settings)
CONFIGS = [
    ("llama sdpa", LLAMA, {}),
    ("llama eager", LLAMA, {"attn": "eager"}),
    ("llama mha biases tied", dict(LLAMA, num_key_value_heads=4, attention_bias=True, mlp_bias=True,
                                   tie_word_embeddings=True), {"batch_size": 3, "seq_len": 13}),
    ("llama no cache", dict(LLAMA, use_cache=False), {}),
    ("llama no cache eager", dict(LLAMA, use_cache=False), {"attn": "eager", "batch_size": 1}),
    ("llama bf16", LLAMA, {"dtype": "bf16"}),
    ("llama bf16 eager", LLAMA, {"dtype": "bf16", "attn": "eager"}),
    ("mistral sdpa", MISTRAL, {"seq_len": 20}),
    ("mistral eager", MISTRAL, {"attn": "eager"}),
    ("qwen2 sdpa", QWEN2, {}),
    ("qwen2 eager bf16", QWEN2, {"attn": "eager", "dtype": "bf16"}),
    ("qwen3 sdpa", QWEN3, {}),
    ("qwen3 eager", QWEN3, {"attn": "eager", "seq_len": 11}),
    ("gpt2 sdpa", GPT2, {}),
    ("gpt2 eager dropout", dict(GPT2, resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1), {"attn": "eager"}),
    ("gpt2 sdpa resid dropout bf16 n_inner", dict(GPT2, resid_pdrop=0.1, embd_pdrop=0.1, n_inner=80),
     {"dtype": "bf16", "seq_len": 13, "batch_size": 3}),
    ("gpt2 untied no cache eager", dict(GPT2, tie_word_embeddings=False, use_cache=False), {"attn": "eager"}),
    ("phi3 sdpa", PHI3, {}),
    ("phi3 eager", PHI3, {"attn": "eager"}),
    ("phi3 partial rotary mha", dict(PHI3, num_key_value_heads=6, partial_rotary_factor=0.5), {"batch_size": 3}),
    ("phi3 resid dropout eager bf16", dict(PHI3, resid_pdrop=0.1), {"attn": "eager", "dtype": "bf16"}),
    ("phi3 longrope", dict(PHI3, max_position_embeddings=256, sliding_window=None,
                           rope_scaling={"type": "longrope", "long_factor": [1.0, 1.5, 2.0, 4.0],
                                         "short_factor": [1.0, 1.0, 1.2, 1.5]}), {}),
    ("neox sdpa", NEOX, {}),
    ("neox eager", NEOX, {"attn": "eager"}),
    ("neox sequential full rotary no bias bf16", dict(NEOX, use_parallel_residual=False, rotary_pct=1.0,
                                                      attention_bias=False), {"dtype": "bf16", "seq_len": 13}),
    ("neox dropout eager no cache", dict(NEOX, hidden_dropout=0.1, attention_dropout=0.1, use_cache=False,
                                         rotary_pct=0.5), {"attn": "eager", "batch_size": 3}),
    ("neox hidden dropout sdpa bf16", dict(NEOX, hidden_dropout=0.1), {"dtype": "bf16"}),
    # LoRA as peft 0.21.2 applies it on a transformers model (issue 12, recipe 3)
    ("llama lora all-linear", LLAMA, {"trainable": "lora", "lora_targets": "all-linear", "lora_r": 4}),
    ("gemma sdpa", GEMMA, {}),
    ("gemma eager bf16", GEMMA, {"attn": "eager", "dtype": "bf16"}),
    ("gemma mha untied bf16", dict(GEMMA, num_key_value_heads=4, tie_word_embeddings=False,
                                   hidden_act="gelu_pytorch_tanh"), {"dtype": "bf16", "seq_len": 13}),
    # issue 11 (hfrest)
    ("gemma2 sdpa", GEMMA2, {}),
    ("gemma2 eager bf16", GEMMA2, {"attn": "eager", "dtype": "bf16"}),
    ("gemma2 eager window untied biases no final softcap", dict(
        GEMMA2, sliding_window=8, final_logit_softcapping=None, tie_word_embeddings=False, attention_bias=True,
        layer_types=["full_attention", "sliding_attention", "sliding_attention"]), {"attn": "eager", "seq_len": 20}),
    ("mixtral sdpa", MIXTRAL, {}),
    ("mixtral eager balanced routing", MIXTRAL, {"attn": "eager", "routing": "16,16,16,16"}),
    ("mixtral skewed routing per layer", dict(MIXTRAL, num_local_experts=5, num_experts_per_tok=3),
     {"batch_size": 3, "seq_len": 11, "routing": "33,0,33,31,2;1,32,33,33,0"}),
    ("mixtral bf16 eager", MIXTRAL, {"attn": "eager", "dtype": "bf16"}),
    # issue 12 on transformers models: the forward under torch.autocast("cpu", bf16); transformers'
    # gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True}) on every
    # decoder layer (checkpoint.policy=full, checkpoint.impl=reentrant); LoRA with its dropout (peft)
    ("llama autocast bf16", LLAMA, {"autocast": "bf16"}),
    ("gpt2 gradient checkpointing reentrant", GPT2, {"checkpoint": "full", "checkpoint_impl": "reentrant"}),
    ("llama lora dropout", LLAMA, {"trainable": "lora", "lora_targets": "q_proj,v_proj,down_proj",
                                   "lora_dropout": "0.1"}),
]

RUN_DEFAULTS = {"batch_size": 2, "seq_len": 16, "dtype": "fp32", "attn": "sdpa",
                "optimizer": "adamw", "optimizer_impl": "for_loop"}


def run_json(cmd, env=None):
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}): {p.stderr.strip()[-2000:]}")
    return json.loads(p.stdout)


def check(actsim, pool, tmp, label, config, settings):
    run = dict(RUN_DEFAULTS, **settings)
    path = os.path.join(tmp, label.replace(" ", "_") + ".json")
    with open(path, "w") as f:
        json.dump(config, f)
    sets = ["runtime.profile=torch2-cpu", f"model.seq_len={run['seq_len']}",
            f"training.batch_size={run['batch_size']}", f"training.dtype={run['dtype']}",
            f"training.optimizer={run['optimizer']}", f"training.optimizer_impl={run['optimizer_impl']}",
            "model.attention=" + ("flash" if run["attn"] == "sdpa" else "eager")]
    # trainable subsets (issue 12, recipe 3)
    for k, key in (("trainable", "training.trainable"), ("lora_r", "lora.r"), ("lora_alpha", "lora.alpha"),
                   ("lora_dropout", "lora.dropout"), ("lora_targets", "lora.targets")):
        if k in run:
            sets.append(f"{key}={run[k]}")
    if run.get("routing"):
        sets.append(f"model.moe_routing={run['routing']}")
    # issue 12 on transformers models: autocast, and gradient_checkpointing_enable() as checkpoint.policy=full
    for k, key in (("autocast", "training.autocast"), ("checkpoint", "checkpoint.policy"),
                   ("checkpoint_impl", "checkpoint.impl")):
        if k in run:
            sets.append(f"{key}={run[k]}")
    cmd = [actsim, "simulate", "--json", "--no-fit", "--hf", path]
    for s in sets:
        cmd += ["--set", s]
    a = run_json(cmd)
    argv = ["--mode", "both", path] + [f"{k}={v}" for k, v in run.items()]
    rc, out, err = pool.run(argv)
    if rc != 0:
        raise RuntimeError(f"measure_hf.py {' '.join(argv)} failed ({rc}): {err.strip()[-2000:]}")
    both = json.loads(out)
    s, m = both["saved"], both["memory"]
    pairs = figure_pairs(a, m, s)
    bad = [f"{name}: actsim {x} != transformers {y}" for name, x, y in pairs if x != y]
    return label, bad, a["peak"]["bytes"]


def main():
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("actsim")
    ap.add_argument("--only", default="", help="run the configurations whose label contains this")
    args = ap.parse_args()
    probe = subprocess.run([PYTHON, "-c", "import torch, transformers"], capture_output=True) \
        if os.path.exists(PYTHON) else None
    if probe is None or probe.returncode != 0:
        print(f"skipped: {PYTHON} cannot import torch and transformers (scripts/setup.sh --tests installs them)")
        return 77
    grid = [c for c in CONFIGS if args.only in c[0]]
    passed = failed = 0
    # Two measurement servers: torch and transformers are imported once per server, each
    # configuration runs in a fresh forked child (tests/torch/forkserver.py).
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    with tempfile.TemporaryDirectory() as tmp, \
            forkserver.Pool([PYTHON, MEASURE, "--serve"], workers=2, env=env) as pool, \
            concurrent.futures.ThreadPoolExecutor(max_workers=2) as ex:
        for label, bad, peak in ex.map(lambda c: check(args.actsim, pool, tmp, *c), grid):
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
