#!/usr/bin/env python3
"""model.hf_config / `simulate --hf`: bad config.json files give one line naming the file and the
field with exit 2; every shipped config in scenarios/hf simulates; --set applies on top.

usage: test_hf_config.py ACTSIM_BINARY SCENARIOS_DIR
"""
import json
import os
import subprocess
import sys
import tempfile

GOOD = {"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 101}
NEOX = {"architectures": ["GPTNeoXForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 101, "rotary_pct": 0.25}
GEMMA = {"architectures": ["GemmaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 1, "vocab_size": 101}
# issue 11 (hfrest)
GEMMA2 = {"architectures": ["Gemma2ForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
          "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
          "vocab_size": 101, "sliding_window": 64}
MIXTRAL = {"architectures": ["MixtralForCausalLM"], "hidden_size": 64, "intermediate_size": 96,
           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 101,
           "num_local_experts": 4, "num_experts_per_tok": 2}

passed = failed = 0


def check(name, ok, detail=""):
    global passed, failed
    if ok:
        passed += 1
        print(f"ok   {name}")
    else:
        failed += 1
        print(f"FAIL {name}: {detail}")


def run(actsim, args):
    return subprocess.run([actsim] + args, capture_output=True, text=True)


def main():
    actsim, sdir = sys.argv[1], sys.argv[2]
    with tempfile.TemporaryDirectory() as tmp:
        def write(name, content):
            path = os.path.join(tmp, name)
            with open(path, "w") as f:
                f.write(content if isinstance(content, str) else json.dumps(content))
            return path

        bad = [
            ("missing field", dict((k, v) for k, v in GOOD.items() if k != "hidden_size"), "hidden_size"),
            ("wrong type", dict(GOOD, num_attention_heads="4"), "num_attention_heads"),
            ("wrong type (bool)", dict(GOOD, tie_word_embeddings="yes"), "tie_word_embeddings"),
            ("negative size", dict(GOOD, num_hidden_layers=-2), "num_hidden_layers"),
            ("heads do not divide hidden", dict(GOOD, hidden_size=66), "num_attention_heads"),
            ("kv heads do not divide heads", dict(GOOD, num_key_value_heads=3), "num_key_value_heads"),
            ("unsupported architecture", dict(GOOD, architectures=["FalconForCausalLM"]), "architectures"),
            ("gpt-neox: unsupported activation", dict(NEOX, hidden_act="relu"), "hidden_act"),
            ("gpt-neox: odd rotary dim", dict(NEOX, rotary_pct=0.2), "rotary_pct"),
            ("gemma: unsupported activation", dict(GEMMA, hidden_act="silu"), "hidden_act"),
            ("unsupported activation", dict(GOOD, hidden_act="gelu"), "hidden_act"),
            ("gemma2: softcapping of the wrong type", dict(GEMMA2, attn_logit_softcapping="50"),
             "attn_logit_softcapping"),
            ("gemma2: negative final softcapping", dict(GEMMA2, final_logit_softcapping=-1.0),
             "final_logit_softcapping"),
            ("gemma2: layer_types of the wrong length", dict(GEMMA2, layer_types=["full_attention"]), "layer_types"),
            ("gemma2: unknown layer type", dict(GEMMA2, layer_types=["full_attention", "chunked", "full_attention"]),
             "layer_types"),
            ("gemma2: null sliding_window", dict(GEMMA2, sliding_window=None), "sliding_window"),
            ("gemma2: exact gelu", dict(GEMMA2, hidden_activation="gelu"), "hidden_activation"),
            ("mixtral: top-k above the experts", dict(MIXTRAL, num_experts_per_tok=5), "num_experts_per_tok"),
            ("mixtral: experts of the wrong type", dict(MIXTRAL, num_local_experts=4.0), "num_local_experts"),
            ("mixtral: load-balancing loss", dict(MIXTRAL, output_router_logits=True), "output_router_logits"),
            ("mixtral: router jitter", dict(MIXTRAL, router_jitter_noise=0.01), "router_jitter_noise"),
            ("not JSON", "{ hidden_size: 64", ""),
            ("not an object", "[1, 2]", ""),
        ]
        for name, content, field in bad:
            path = write(name.replace(" ", "_") + ".json", content)
            p = run(actsim, ["simulate", "--hf", path, "--no-fit", "--json"])
            err = p.stderr.strip()
            ok = (p.returncode == 2 and p.stdout == "" and len(err.splitlines()) == 1 and path in err
                  and (field == "" or f": {field}:" in err))
            check(f"bad config: {name} -> exit 2, one line naming the file and field", ok,
                  f"exit {p.returncode}: {err!r}")
        # the same through model.hf_config in a scenario file (the path relative to the scenario)
        write("bad.json", dict(GOOD, num_key_value_heads=3))
        scen = write("s.toml", '[model]\nhf_config = "bad.json"\n')
        p = run(actsim, ["simulate", scen, "--no-fit"])
        check("model.hf_config: relative path, error names the config and field",
              p.returncode == 2 and os.path.join(tmp, "bad.json") in p.stderr and "num_key_value_heads" in p.stderr,
              p.stderr.strip())
        # --set on top of --hf; explicit keys win in a file whatever their order
        good = write("good.json", GOOD)
        p = run(actsim, ["simulate", "--hf", good, "--no-fit", "--json", "--set", "model.n_layers=5",
                         "--set", "model.seq_len=64", "--set", "runtime.profile=torch2-cpu"])
        ok = p.returncode == 0
        if ok:
            j = json.loads(p.stdout)
            ok = len(j["activations"]["per_layer_saved_bytes"]) == 5
        check("--hf with --set model.n_layers=5 on top", ok, p.stderr.strip())
        scen = write("order.toml", '[model]\nd_ff = 96\nhf_config = "good.json"\nseq_len = 32\n')
        p1 = run(actsim, ["simulate", scen, "--no-fit", "--json"])
        p2 = run(actsim, ["simulate", "--hf", good, "--no-fit", "--json", "--set", "model.d_ff=96",
                          "--set", "model.seq_len=32"])
        check("explicit model.d_ff wins over the config whatever the key order",
              p1.returncode == 0 and p2.returncode == 0 and json.loads(p1.stdout)["params_bytes"] ==
              json.loads(p2.stdout)["params_bytes"], p1.stderr + p2.stderr)
        # model.moe_routing (issue 11: hfrest): 2 x 16 tokens, top-2 of 4 experts: 64 rows
        moe = write("moe.json", MIXTRAL)
        base = ["simulate", "--hf", moe, "--no-fit", "--json", "--set", "model.seq_len=16",
                "--set", "training.batch_size=2", "--set", "runtime.profile=torch2-cpu"]
        p0 = run(actsim, base)
        for routing in ("16,16,16,16", "32,0,30,2;1,31,32,0"):
            p = run(actsim, base + ["--set", f"model.moe_routing={routing}"])
            check(f"model.moe_routing={routing} simulates, the same bytes as balanced routing (grouped_mm)",
                  p.returncode == 0 and p0.returncode == 0 and json.loads(p.stdout)["peak"] ==
                  json.loads(p0.stdout)["peak"], p.stderr.strip() + p0.stderr.strip())
        for routing, what in (("16,16,16", "counts for 4 experts"), ("16,16,16,15", "sum to 63"),
                              ("33,31,0,0", "33 tokens for one expert"), ("16,16,x,16", "comma-separated"),
                              ("16,16,16,16;16,16,16,16;16,16,16,16", "3 lists")):
            p = run(actsim, base + ["--set", f"model.moe_routing={routing}"])
            err = p.stderr.strip()
            check(f"bad model.moe_routing={routing} -> exit 2, one line naming the key",
                  p.returncode == 2 and p.stdout == "" and len(err.splitlines()) == 1 and "model.moe_routing" in err
                  and what in err, f"exit {p.returncode}: {err!r}")
        p = run(actsim, ["simulate", "--hf", good, "--no-fit", "--set", "model.moe_routing=1,1"])
        check("model.moe_routing on a dense model is refused", p.returncode == 2 and "model.moe_routing" in p.stderr,
              p.stderr.strip())
        p = run(actsim, ["simulate", "--hf", good, "--no-fit", "--set", "model.family=gpt2"])
        check("model.family with model.hf_config is refused", p.returncode == 2, p.stderr.strip())
        p = run(actsim, ["simulate", "--hf", good, "--no-fit", "--set", "runtime.profile=torch-cpu"])
        check("torch-cpu (PyTorch 1.13) is refused for Hugging Face models", p.returncode == 2, p.stderr.strip())

    # every shipped config simulates, as is, with its scenario
    hf = os.path.join(sdir, "hf")
    names = sorted(f[:-5] for f in os.listdir(hf) if f.endswith(".toml"))
    check("at least ten shipped Hugging Face configs", len(names) >= 10, str(names))
    for n in names:
        check(f"scenarios/hf/{n}.json has a scenario", os.path.exists(os.path.join(hf, n + ".json")))
        p = run(actsim, ["simulate", os.path.join(hf, n + ".toml"), "--json"])
        ok = p.returncode == 0
        if ok:
            j = json.loads(p.stdout)
            ok = j["param_count"] > 0 and j["peak"]["bytes"] > j["params_bytes"] and "max_batch_size" in j
        check(f"scenarios/hf/{n}.toml simulates", ok, p.stderr.strip())
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
