#!/usr/bin/env python3
"""Note [Progress] (tools/actsim/cli.hpp): long commands draw one progress line with an ETA on stderr
when stderr is a terminal, erase it when done, and draw nothing when stderr is a pipe.

    test_progress.py ACTSIM
"""
import os
import pty
import subprocess
import sys

ACTSIM = sys.argv[1]
SMALL = ["--set", "model.n_layers=2", "--set", "model.d_model=32", "--set", "model.n_heads=2",
         "--set", "model.seq_len=16", "--set", "model.vocab_size=97", "--set", "training.batch_size=2",
         "--set", "runtime.profile=torch-cpu"]
failures = 0
checks = 0


def run_tty(args):
    """stdout to a pipe, stderr to a pseudo-terminal; returns (rc, stdout, what the terminal got)."""
    master, slave = pty.openpty()
    p = subprocess.Popen([ACTSIM] + args, stdout=subprocess.PIPE, stderr=slave, stdin=subprocess.DEVNULL)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    out = p.stdout.read()
    rc = p.wait()
    os.close(master)
    return rc, out.decode(), b"".join(chunks).decode(errors="replace")


def check(name, ok, detail=""):
    global failures, checks
    checks += 1
    print(("ok    " if ok else "FAIL  ") + name + ("" if ok else f": {detail}"))
    failures += 0 if ok else 1


def progress_case(name, args, needle):
    rc, out, term = run_tty(args)
    check(f"{name}: exit 0 on a terminal", rc == 0, f"rc {rc}, {term[-300:]!r}")
    check(f"{name}: draws '{needle}' on the terminal", needle in term, repr(term[-300:]))
    # The line is erased at the end: the last thing written before any message is the erase.
    check(f"{name}: erases the line when done", "\r\x1b[K" in term, repr(term[-120:]))
    check(f"{name}: stdout stays clean", "\r" not in out and "ETA" not in out, repr(out[:200]))
    p = subprocess.run([ACTSIM] + args, capture_output=True, text=True)
    check(f"{name}: nothing drawn when stderr is a pipe", p.returncode == 0 and needle not in p.stderr and "\r" not in p.stderr,
          repr(p.stderr[-300:]))
    if not name.startswith("replay"):  # replay's JSON carries measured seconds
        check(f"{name}: same stdout with and without a terminal", p.stdout == out, "outputs differ")


progress_case("sweep", ["sweep"] + SMALL + ["--vary", "training.batch_size=1..6", "--json"], "/6 runs")
progress_case("plan", ["plan"] + SMALL + ["--budget", "1GiB", "--json"], "simulations")
progress_case("replay", ["replay"] + SMALL + ["--confirm", "--json"], "entries")
progress_case("replay --confirm tightness", ["replay"] + SMALL + ["--confirm", "--json"], "tightness probes")

print(f"{checks - failures} passed, {failures} failed")
sys.exit(1 if failures else 0)
