#!/usr/bin/python3
"""End-to-end test of `actsim advise` (README, "Advisor").

Usage: /usr/bin/python3 tests/cli/test_advise.py PATH/TO/actsim

Checks: --help documents every option and axis; the --json contract (keys, types, the ranking, the
tokens/s formula); every ranked candidate's `changes`, pasted into `actsim simulate --set`, gives
its peak and step time; a budget that needs the planner; nothing fitting (one line, exit 0); bad
input (exit 2, one line on stderr naming the option, nothing on stdout).
Prints "N passed, M failed"; exits 1 on any failure.
"""
import json
import os
import subprocess
import sys
import tempfile

TIMEOUT_S = 120

# A llama small enough to simulate in milliseconds (global batch 4).
TINY = ["--set", "model.family=llama", "--set", "model.n_layers=3", "--set", "model.d_model=64",
        "--set", "model.n_heads=4", "--set", "model.seq_len=128", "--set", "model.vocab_size=256",
        "--set", "training.batch_size=4"]

TOP_KEYS = {"scenario", "device", "budget_bytes", "global_batch", "seq_len", "fits", "searched", "search",
            "as_given", "ranked", "least_peak"}
CANDIDATE_KEYS = {"changes", "overrides", "micro_batch", "grad_accum_steps", "checkpoint", "checkpointed", "fits",
                  "peak_bytes", "step_time_ns", "tokens_per_second"}
SEARCH_KEYS = {"candidates", "fitting", "simulations", "plans", "pruned"}


class Runner:
    def __init__(self, actsim):
        self.actsim = actsim
        self.passed = 0
        self.failed = 0

    def run(self, args):
        p = subprocess.run([self.actsim] + args, capture_output=True, text=True, timeout=TIMEOUT_S)
        return p.returncode, p.stdout, p.stderr

    def check(self, name, problems):
        if problems:
            self.failed += 1
            print(f"FAIL {name}")
            for p in problems:
                print(f"     {p}")
        else:
            self.passed += 1
            print(f"ok   {name}")

    def expect_error(self, name, args, must_name):
        rc, out, err = self.run(args)
        problems = []
        if rc != 2:
            problems.append(f"exit code {rc}, expected 2")
        lines = err.splitlines()
        if len(lines) != 1 or not lines[0].startswith("actsim: error:"):
            problems.append(f"stderr is not one 'actsim: error:' line: {err!r}")
        for part in must_name:
            if part not in err:
                problems.append(f"stderr does not name {part!r}: {err!r}")
        if out:
            problems.append(f"stdout is not empty: {out[:200]!r}")
        self.check(name, problems)

    def advise_json(self, extra):
        rc, out, err = self.run(["advise"] + TINY + extra + ["--json"])
        if rc != 0:
            raise RuntimeError(f"advise exited {rc}: {err}")
        return json.loads(out)

    def simulate(self, changes):
        sets = []
        for c in changes:
            sets += ["--set", c]
        rc, out, err = self.run(["simulate"] + TINY + sets + ["--json", "--no-fit"])
        if rc != 0:
            raise RuntimeError(f"simulate exited {rc}: {err}")
        j = json.loads(out)
        return j["peak"]["bytes"], j["step_time_ns"]


def contract_problems(j):
    problems = []
    if set(j) != TOP_KEYS:
        problems.append(f"top-level keys {sorted(j)} != {sorted(TOP_KEYS)}")
        return problems
    if set(j["search"]) != SEARCH_KEYS:
        problems.append(f"search keys {sorted(j['search'])}")
    if not all(set(a) == {"axis", "values"} for a in j["searched"]):
        problems.append(f"searched entries: {j['searched']}")
    if j["fits"] != bool(j["ranked"]):
        problems.append("fits is not 'ranked is not empty'")
    if len(j["ranked"]) > 10:
        problems.append(f"{len(j['ranked'])} ranked, more than 10")
    tokens = j["global_batch"] * j["seq_len"]
    last = None
    for i, c in enumerate(j["ranked"]):
        if set(c) != CANDIDATE_KEYS | {"rank", "speedup"}:
            problems.append(f"ranked[{i}] keys {sorted(c)}")
            continue
        if c["rank"] != i + 1:
            problems.append(f"ranked[{i}] rank {c['rank']}")
        if not c["fits"] or c["peak_bytes"] > j["budget_bytes"]:
            problems.append(f"ranked[{i}] does not fit: {c['peak_bytes']} > {j['budget_bytes']}")
        want = tokens * 1e9 / c["step_time_ns"]
        if abs(c["tokens_per_second"] - want) > 1e-9 * want:
            problems.append(f"ranked[{i}] tokens_per_second {c['tokens_per_second']} != {want}")
        if c["micro_batch"] * c["grad_accum_steps"] != j["global_batch"]:
            problems.append(f"ranked[{i}] micro_batch x grad_accum_steps != global_batch")
        if not set(c["changes"]) <= set(c["overrides"]):
            problems.append(f"ranked[{i}] changes are not overrides")
        if last is not None and c["tokens_per_second"] > last:
            problems.append(f"ranked[{i}] is faster than ranked[{i - 1}]")
        last = c["tokens_per_second"]
    g = j["as_given"]
    if set(g) != CANDIDATE_KEYS - {"changes", "overrides"}:
        problems.append(f"as_given keys {sorted(g)}")
    return problems


def main():
    if len(sys.argv) != 2:
        print("usage: test_advise.py PATH/TO/actsim", file=sys.stderr)
        return 2
    r = Runner(os.path.abspath(sys.argv[1]))
    rc, keys_text, _ = r.run(["keys"])
    keys = set(line.strip() for line in keys_text.splitlines())

    # --help documents every option and every axis; the program's usage lists the command.
    rc, out, err = r.run(["advise", "--help"])
    r.check("advise --help documents its options and axes",
            [f"exit code {rc}"] * (rc != 0) +
            [f"--help does not mention {w}" for w in
             ["--budget", "--allow", "--json", "--threads", "--force", "--set", "training.trainable",
              "training.autocast", "model.attention", "training.grad_accum_steps", "checkpoint.policy",
              "tokens/s", "exit code 0"] if w not in out])
    rc, out, err = r.run(["--help"])
    r.check("actsim --help lists advise", [] if "advise [SCENARIO]" in out else ["advise is not listed"])

    # The JSON contract, and every ranked candidate reproduced by simulate --set.
    j = r.advise_json([])
    problems = contract_problems(j)
    if not j["fits"] or j["search"]["plans"] != 0:
        problems.append(f"the device's memory should fit without a plan: {j['search']}")
    for c in j["ranked"][:4]:
        peak, time = r.simulate(c["changes"])
        if (peak, time) != (c["peak_bytes"], c["step_time_ns"]):
            problems.append(f"--set {c['changes']}: simulate gives {(peak, time)}, advise {(c['peak_bytes'], c['step_time_ns'])}")
    axes = [a["axis"] for a in j["searched"]]
    for key, axis in [("training.autocast", "training.autocast"), ("model.attention", "model.attention")]:
        if (key in keys) != (axis in axes):
            problems.append(f"axis {axis} searched: {axis in axes}, key exists: {key in keys}")
    r.check("advise --json: the contract; the changes reproduce in simulate", problems)

    # A budget under the un-checkpointed peak of the scenario as given: the planner's budget policy.
    budget = j["as_given"]["peak_bytes"] - 1
    jb = r.advise_json(["--budget", str(budget)])
    problems = contract_problems(jb)
    planned = [c for c in jb["ranked"] if c["checkpointed"]]
    if jb["budget_bytes"] != budget:
        problems.append(f"budget_bytes {jb['budget_bytes']}")
    if not planned:
        problems.append("no planned candidate")
    for c in planned[:2]:
        if f"checkpoint.policy=budget:{budget}" not in c["changes"]:
            problems.append(f"planned candidate without its budget policy: {c['changes']}")
        peak, time = r.simulate(c["changes"])
        if (peak, time) != (c["peak_bytes"], c["step_time_ns"]):
            problems.append(f"--set {c['changes']}: simulate gives {(peak, time)}, advise {(c['peak_bytes'], c['step_time_ns'])}")
    r.check("advise --budget: planned candidates reproduce", problems)

    # The text form: the table and the command of the fastest.
    rc, out, err = r.run(["advise"] + TINY)
    r.check("advise: the table and the fastest's command",
            [f"exit code {rc}: {err}"] * (rc != 0) +
            [f"no {w!r} in the output" for w in ["rank", "tokens/s", "the fastest: actsim simulate --set model.family=llama"]
             if w not in out])

    # Nothing fits: exit 0, one line saying so; the JSON says fits false with the least peak.
    rc, out, err = r.run(["advise"] + TINY + ["--budget", "1KiB"])
    lines = [l for l in out.splitlines() if "no candidate fits" in l]
    r.check("advise: nothing fits is one line, exit 0",
            [f"exit code {rc}: {err}"] * (rc != 0) + [f"{len(lines)} 'no candidate fits' lines"] * (len(lines) != 1))
    jn = r.advise_json(["--budget", "1KiB"])
    problems = contract_problems(jn)
    if jn["fits"] or jn["ranked"] or not isinstance(jn["least_peak"], dict) or jn["least_peak"]["peak_bytes"] <= 1024:
        problems.append(f"fits {jn['fits']}, ranked {len(jn['ranked'])}, least_peak {jn['least_peak']}")
    r.check("advise --json: nothing fits", problems)

    # Bad input.
    with tempfile.TemporaryDirectory(prefix="actsim_advise_") as tmp:
        bad = os.path.join(tmp, "bad.toml")
        with open(bad, "w") as f:
            f.write("[model]\nn_head = 12\n")
        r.expect_error("advise: unknown option", ["advise", "--bogus"], ["bogus"])
        r.expect_error("advise: a budget that is not a size", ["advise", "--budget", "lots"], ["--budget lots"])
        r.expect_error("advise: a zero budget", ["advise", "--budget", "0"], ["--budget 0"])
        r.expect_error("advise: --allow with an unknown value", ["advise", "--allow", "lorra"],
                       ["--allow lorra", 'did you mean "lora"'])
        r.expect_error("advise: --threads 0", ["advise", "--threads", "0"], ["--threads 0"])
        r.expect_error("advise: long work needs --force", ["advise", "--threads", "1", "--set", "model.n_layers=20000"],
                       ["--force"])
        r.expect_error("advise: two scenario files", ["advise", bad, bad], ["advise takes one SCENARIO"])
        r.expect_error("advise: a bad --set", ["advise", "--set", "model.n_heads=7"], ["model.n_heads"])
        r.expect_error("advise: a bad scenario file", ["advise", bad], [f"{bad}:2: model.n_head"])
        if "training.trainable" not in keys:
            r.expect_error("advise: --allow lora without training.trainable", ["advise", "--allow", "lora"],
                           ["--allow lora", "training.trainable"])
        else:
            jl = r.advise_json(["--allow", "lora"])
            problems = contract_problems(jl)
            if not any("training.trainable=lora" in c["overrides"] for c in jl["ranked"]):
                problems.append("no LoRA candidate ranked")
            r.check("advise --allow lora: LoRA candidates", problems)

    print(f"{r.passed} passed, {r.failed} failed")
    return 1 if r.failed else 0


if __name__ == "__main__":
    sys.exit(main())
