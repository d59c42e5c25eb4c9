#!/usr/bin/python3
"""End-to-end test of actsim's handling of bad input (STYLE.md, "Three kinds of failure").

Usage: /usr/bin/python3 tests/cli/test_bad_input.py PATH/TO/actsim

For every malformed scenario file and every bad option: exit code 2, exactly one line on stderr
starting with "actsim: error:" that names the file:line and key (or the option), nothing on
stdout, and no --out file left behind. Also: `actsim simulate --help` documents every option and
every scenario key that `actsim keys` lists. Prints "N passed, M failed"; exits 1 on any failure.
"""
import json
import os
import subprocess
import sys
import tempfile

TIMEOUT_S = 60


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

    def expect_error(self, name, args, must_name, out_path):
        """Runs actsim with `args` (which write to out_path) and checks the bad-input contract."""
        problems = []
        try:
            rc, out, err = self.run(args)
        except subprocess.TimeoutExpired:
            self.check(name, [f"timed out after {TIMEOUT_S} s"])
            return
        if rc != 2:
            problems.append(f"exit code {rc}, expected 2")
        lines = err.splitlines()
        if len(lines) != 1 or not err.endswith("\n"):
            problems.append(f"stderr is not exactly one line: {err!r}")
        elif not lines[0].startswith("actsim: error:"):
            problems.append(f"stderr does not start with 'actsim: error:': {err!r}")
        for part in must_name:
            if part not in err:
                problems.append(f"stderr does not name {part!r}: {err!r}")
        if out:
            problems.append(f"stdout is not empty: {out[:200]!r}")
        if out_path and os.path.exists(out_path):
            problems.append(f"--out file {out_path} was created")
            os.remove(out_path)
        if out_path and os.path.isdir(os.path.dirname(out_path) or "."):
            leftovers = [f for f in os.listdir(os.path.dirname(out_path) or ".")
                         if f.startswith(os.path.basename(out_path) + ".tmp")]
            if leftovers:
                problems.append(f"temporary output left behind: {leftovers}")
        self.check(name, problems)


# (name, file text, line, key, other fragments the message must contain)
BAD_SCENARIOS = [
    ("unknown key with a suggestion", "[model]\nn_head = 12\n", 2, "model.n_head",
     ['did you mean "model.n_heads"']),
    ("unknown table", "[training]\nbatch_size = 2\n[modle]\nd_model = 64\n", 3, "modle", ["[model]"]),
    ("string where an integer is expected", "[model]\nn_heads = \"12\"\n", 2, "model.n_heads",
     ["expected an integer"]),
    ("zero size", "[model]\nd_model = 0\n", 2, "model.d_model", ["positive"]),
    ("negative size", "[training]\nbatch_size = -4\n", 2, "training.batch_size", ["positive"]),
    ("heads do not divide d_model", "[model]\nd_model = 768\nn_heads = 7\n", 3, "model.n_heads",
     ["does not divide"]),
    ("d_model not divisible by the default heads", "[model]\nd_model = 100\n", 2, "model.d_model",
     ["does not divide"]),
    ("kv heads do not divide heads", "[model]\nfamily = \"llama\"\nn_kv_heads = 5\n", 3,
     "model.n_kv_heads", ["does not divide"]),
    ("gpt2 with grouped-query attention", "[model]\nfamily = \"gpt2\"\nn_kv_heads = 4\n", 3,
     "model.n_kv_heads", ["grouped-query"]),
    ("llama with dropout", "[model]\nfamily = \"llama\"\ndropout = 0.1\n", 3, "model.dropout",
     ["no dropout"]),
    ("flash attention on torch-cpu", "[model]\nattention = \"flash\"\n[runtime]\nprofile = \"torch-cpu\"\n",
     2, "model.attention", ["torch-cuda"]),
    ("flash attention with dropout on torch2-cpu",
     "[model]\nattention = \"flash\"\ndropout = 0.1\n[runtime]\nprofile = \"torch2-cpu\"\n",
     2, "model.attention", ["math fallback"]),
    ("unknown CPU ISA", "[runtime]\ncpu_isa = \"avx9\"\n", 2, "runtime.cpu_isa", ["one of: native, avx512, avx2"]),
    ("byte counts overflowing int64", "[model]\nvocab_size = 4000000000000000000\n", 2, "model.vocab_size",
     ["overflows int64"]),
    ("unknown family", "[model]\nfamily = \"lama\"\n", 2, "model.family", ['did you mean "llama"']),
    ("unknown device", "[device]\nname = \"H100-SXM-80G\"\n", 2, "device.name",
     ['did you mean "H100-SXM-80GB"']),
    ("unknown profile", "[runtime]\nprofile = \"torch_cpu\"\n", 2, "runtime.profile",
     ['did you mean "torch-cpu"']),
    ("array value", "[model]\nd_model = [1, 2]\n", 2, "model.d_model", []),
    # trainable subsets (issue 12, recipe 3)
    ("unknown trainable subset", "[training]\ntrainable = \"some\"\n", 2, "training.trainable",
     ["all, lora, frozen:PATTERNS"]),
    ("frozen pattern naming no parameter", "[training]\ntrainable = \"frozen:wte,blocks.0.attn.q_proj\"\n", 2,
     "training.trainable", ['"blocks.0.attn.q_proj" names no parameter']),
    ("frozen with a bad range", "[training]\ntrainable = \"frozen:blocks.{3..1}\"\n", 2, "training.trainable",
     ["bad range"]),
    ("frozen everything", "[training]\ntrainable = \"frozen:*\"\n", 2, "training.trainable", ["nothing would train"]),
    ("LoRA target naming no module", "[training]\ntrainable = \"lora\"\n[lora]\ntargets = [\"c_attn\", \"q_proj\"]\n",
     4, "lora.targets", ['"q_proj" names no Linear module']),
    ("LoRA target naming no module (llama)",
     "[model]\nfamily = \"llama\"\n[training]\ntrainable = \"lora\"\n[lora]\ntargets = \"q_proj,gate_proj\"\n",
     6, "lora.targets", ['"gate_proj" names no Linear module', "w1"]),
    ("LoRA rank zero", "[lora]\nr = 0\n", 2, "lora.r", ["positive"]),
    ("LoRA dropout of 1", "[lora]\ndropout = 1.0\n", 2, "lora.dropout", ["[0, 1)"]),
    ("LoRA all-linear with others", "[lora]\ntargets = \"all-linear,c_attn\"\n", 2, "lora.targets", ["stands alone"]),
    ("LoRA targets not strings", "[lora]\ntargets = [1, 2]\n", 2, "lora.targets", ["list of module names"]),
    # gradient accumulation (issue 12, recipe 2)
    ("zero micro-batches", "[training]\ngrad_accum_steps = 0\n", 2, "training.grad_accum_steps", ["positive"]),
    ("negative micro-batches", "[training]\nbatch_size = 2\ngrad_accum_steps = -3\n", 3,
     "training.grad_accum_steps", ["positive"]),
    ("fractional micro-batches", "[training]\ngrad_accum_steps = 2.5\n", 2, "training.grad_accum_steps",
     ["expected an integer"]),
    ("micro-batches as a string", "[training]\ngrad_accum_steps = \"4\"\n", 2, "training.grad_accum_steps",
     ["expected an integer"]),
    # checkpoint implementation (issue 12, recipe 4)
    ("unknown checkpoint implementation", "[checkpoint]\nimpl = \"reentrent\"\n", 2, "checkpoint.impl",
     ['did you mean "reentrant"', "one of: nonreentrant, reentrant"]),
    ("preserve_rng_state not a boolean", "[checkpoint]\npreserve_rng_state = \"yes\"\n", 2,
     "checkpoint.preserve_rng_state", ["expected true or false"]),
    ("reentrant checkpointing with frozen embeddings (LoRA)",
     "[training]\ntrainable = \"lora\"\n[checkpoint]\npolicy = \"full\"\nimpl = \"reentrant\"\n", 5, "checkpoint.impl",
     ["None of the inputs have requires_grad=True"]),
    ("reentrant with selective activation checkpointing",
     "[checkpoint]\npolicy = \"ops:mm\"\nimpl = \"reentrant\"\n", 3, "checkpoint.impl", ["use_reentrant=False"]),
    # autocast recipe (issue 12)
    ("unknown autocast dtype", "[training]\nautocast = \"fp8\"\n", 2, "training.autocast",
     ["one of: none, bf16, fp16"]),
    ("fp16 autocast on torch-cpu", "[training]\nautocast = \"fp16\"\n[runtime]\nprofile = \"torch-cpu\"\n",
     2, "training.autocast", ["bf16 only"]),
    # data parallelism (issue 13, dp2)
    ("no_sync without accumulation", "[parallel]\ndp = 2\nno_sync = false\n", 3, "parallel.no_sync",
     ["grad_accum_steps > 1"]),
    ("ZeRO-3 with tensor parallelism", "[parallel]\ndp = 4\nsharding = \"zero3\"\ntp = 2\n", 4, "parallel.tp",
     ["not lowered"]),
    ("FSDP2 not lowered", "[parallel]\ndp = 4\nsharding = \"fsdp2\"\n", 3, "parallel.sharding",
     ["not lowered yet"]),
    # pipeline stages (issue 13; tensor parallelism inside them is lowered since pprank)
    ("autocast inside pipeline stages", "[training]\nautocast = \"bf16\"\n[parallel]\npp = 2\n", 2, "training.autocast",
     ["not lowered yet"]),
    # zero_redundancy (issue 13): torch's ZeroRedundancyOptimizer
    ("zero_impl without zero1", "[parallel]\ndp = 2\nzero_impl = \"torch\"\n", 3, "parallel.zero_impl",
     ["sharding = \"zero1\""]),
    ("unknown ZeRO implementation", "[parallel]\ndp = 2\nsharding = \"zero1\"\nzero_impl = \"torch2\"\n", 4,
     "parallel.zero_impl", ['did you mean "torch"', "one of: deepspeed, torch"]),
    ("torch's ZeRO with fp32 master weights",
     "[training]\ndtype = \"bf16\"\nmaster_weights = \"fp32\"\n[parallel]\ndp = 2\nsharding = \"zero1\"\n"
     "zero_impl = \"torch\"\n", 3, "training.master_weights", ["parameters' dtype"]),
]

# (name, file text, line) -- TOML syntax errors name the line only.
SYNTAX_ERRORS = [
    ("TOML syntax error", "[model]\nd_model = 64\nn_heads = = 3\n", 3),
    ("duplicate key", "[model]\nd_model = 64\nd_model = 128\n", 3),
    ("unterminated string", "[model]\nfamily = \"llama\n", 2),
]

SMALL = ["--set", "model.vocab_size=97", "--set", "model.seq_len=16", "--set", "model.d_model=32",
         "--set", "model.n_heads=4", "--set", "model.n_layers=2", "--set", "training.batch_size=2"]


def main():
    if len(sys.argv) != 2:
        print("usage: test_bad_input.py PATH/TO/actsim", file=sys.stderr)
        return 2
    r = Runner(os.path.abspath(sys.argv[1]))
    with tempfile.TemporaryDirectory(prefix="actsim_cli_") as tmp:
        out_path = os.path.join(tmp, "out.json")

        for i, (name, text, line, key, more) in enumerate(BAD_SCENARIOS):
            path = os.path.join(tmp, f"bad{i}.toml")
            with open(path, "w") as f:
                f.write(text)
            r.expect_error(f"scenario: {name}", ["simulate", path, "--no-fit", "--out", out_path],
                           [f"{path}:{line}: {key}"] + more, out_path)

        for i, (name, text, line) in enumerate(SYNTAX_ERRORS):
            path = os.path.join(tmp, f"syntax{i}.toml")
            with open(path, "w") as f:
                f.write(text)
            r.expect_error(f"scenario: {name}", ["simulate", path, "--no-fit", "--out", out_path],
                           [f"{path}:{line}:"], out_path)

        missing = os.path.join(tmp, "missing.toml")
        r.expect_error("scenario: unreadable file", ["simulate", missing, "--no-fit", "--out", out_path],
                       [missing], out_path)
        r.expect_error("scenario: a directory", ["simulate", tmp, "--no-fit", "--out", out_path],
                       [tmp, "directory"], out_path)

        # --set: the location is "--set".
        r.expect_error("--set: bad value", ["simulate", "--no-fit", "--set", "model.d_model=0", "--out", out_path],
                       ["--set: model.d_model"], out_path)
        r.expect_error("--set: unknown key", ["simulate", "--no-fit", "--set", "model.n_head=4", "--out", out_path],
                       ["--set: model.n_head", 'did you mean "model.n_heads"'], out_path)
        good = os.path.join(tmp, "llama.toml")
        with open(good, "w") as f:
            f.write("[model]\nfamily = \"llama\"\n")
        r.expect_error("--set: llama with dropout over a file",
                       ["simulate", good, "--no-fit", "--set", "model.dropout=0.1", "--out", out_path],
                       ["--set: model.dropout"], out_path)

        r.expect_error("--set: LoRA target naming no module",
                       ["simulate", "--no-fit", "--set", "training.trainable=lora", "--set", "lora.targets=c_atn",
                        "--out", out_path],
                       ["--set: lora.targets", '"c_atn" names no Linear module'], out_path)
        # autocast recipe (issue 12): replay has no GradScaler kernels
        r.expect_error("--set: replay under fp16 autocast (GradScaler)",
                       ["replay", "--set", "training.autocast=fp16", "--set", "runtime.profile=torch2-cpu"] + SMALL,
                       ["--set: training.autocast", "replay"], None)

        # Bad options.
        r.expect_error("option: unknown option", ["simulate", "--bogus", "--out", out_path], ["--bogus"], out_path)
        r.expect_error("option: --set without '='", ["simulate", "--set", "model.d_model", "--out", out_path],
                       ["--set model.d_model", "KEY=VALUE"], out_path)
        r.expect_error("option: --set without a value", ["simulate", "--out", out_path, "--set"], ["--set"],
                       out_path)
        r.expect_error("option: --out without a value", ["simulate", "--out"], ["--out"], None)
        r.expect_error("option: unknown command", ["frobnicate", "--out", out_path], ["frobnicate"], out_path)
        r.expect_error("option: two scenarios", ["simulate", good, good, "--out", out_path], [], out_path)

        # An output file that cannot be written is bad input too, and leaves nothing behind.
        unwritable = os.path.join(tmp, "no-such-dir", "out.json")
        r.expect_error("option: --out into a missing directory", ["simulate", "--no-fit", "--out", unwritable] + SMALL,
                       [unwritable], unwritable)

        # Contrast: a good run writes the file (atomically: no temporary left) and exits 0.
        problems = []
        rc, out, err = r.run(["simulate", "--no-fit", "--json", "--out", out_path] + SMALL)
        if rc != 0:
            problems.append(f"exit code {rc}: {err!r}")
        elif not os.path.exists(out_path):
            problems.append("--out file not written")
        else:
            with open(out_path) as f:
                written = json.load(f)
            if json.loads(out) != written:
                problems.append("--json output differs from the --out file")
            if [f for f in os.listdir(tmp) if ".tmp" in f]:
                problems.append("temporary file left behind")
        if err:
            problems.append(f"stderr not empty: {err!r}")
        r.check("good run: --out written, exit 0", problems)

        # Help documents every option and every key.
        problems = []
        rc_help, help_text, _ = r.run(["simulate", "--help"])
        rc_keys, keys_text, _ = r.run(["keys"])
        if rc_help != 0 or rc_keys != 0:
            problems.append(f"exit codes: simulate --help {rc_help}, keys {rc_keys}")
        for opt in ("--set", "--json", "--out", "--no-fit", "--help"):
            if opt not in help_text:
                problems.append(f"simulate --help does not list {opt}")
        keys = [line.strip() for line in keys_text.splitlines() if line.startswith("  ") and line.strip()]
        if len(keys) < 20:
            problems.append(f"actsim keys lists only {len(keys)} keys: {keys_text!r}")
        help_lines = {line.strip() for line in help_text.splitlines()}
        for k in keys:
            if k not in help_lines:
                problems.append(f"simulate --help does not list key {k}")
        for k in ("model.n_heads", "training.batch_size", "runtime.profile", "device.name"):
            if k not in keys:
                problems.append(f"actsim keys does not list {k}")
        r.check("help: simulate --help lists every option and every key", problems)

    print(f"{r.passed} passed, {r.failed} failed")
    return 1 if r.failed else 0


if __name__ == "__main__":
    sys.exit(main())
