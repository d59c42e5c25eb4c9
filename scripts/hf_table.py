#!/usr/bin/env python3
"""Prints the README's table of the shipped Hugging Face configs (scenarios/hf/*.toml), by running
`actsim simulate --json` on each: parameters, activations saved per sample at the scenario's
sequence length, and the largest batch that fits its 80 GB device without and with full activation
checkpointing (checkpoint.policy=full).

usage: scripts/hf_table.py [ACTSIM_BINARY]     (default build/tools/actsim)
"""
import json
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def simulate(actsim, scen, *sets):
    cmd = [actsim, "simulate", scen, "--json"]
    for s in sets:
        cmd += ["--set", s]
    return json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)


def gib(b):
    return f"{b / 2**30:.2f} GiB"


def main():
    actsim = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "build", "tools", "actsim")
    hf = os.path.join(ROOT, "scenarios", "hf")
    print("| scenario | architecture | params | seq_len | activations per sample | largest batch, no checkpointing | largest batch, checkpoint.policy=full |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for f in sorted(os.listdir(hf)):
        if not f.endswith(".toml"):
            continue
        scen = os.path.join(hf, f)
        text = open(scen).read()
        seq = int(re.search(r"seq_len = (\d+)", text).group(1))
        arch = json.load(open(os.path.join(hf, f[:-5] + ".json")))["architectures"][0]
        one = simulate(actsim, scen, "training.batch_size=1")
        full = simulate(actsim, scen, "training.batch_size=1", "checkpoint.policy=full")
        print(f"| `{f[:-5]}` | {arch} | {one['param_count'] / 1e9:.2f} B | {seq} | "
              f"{gib(one['activations']['saved_bytes'])} | {one['max_batch_size']} | {full['max_batch_size']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
