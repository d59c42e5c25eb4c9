"""Run a measurement script's main() many times without importing torch each time.

Importing torch 2.x (and transformers) costs more than measuring one tiny configuration. A cross-check
starts a few servers (`measure.py --serve`, `measure_hf.py --serve`); each imports the heavy modules
once, then forks a fresh child per request, so every measurement still starts from a clean process
state (its own RNG, allocator, profiler and module globals), exactly as a separate run would.

    with Pool([python, script, "--serve"], workers=2, env=env) as pool:
        rc, out, err = pool.run(["--mode", "both", "family=llama"])

Protocol: one JSON line per request on the server's stdin ({"argv": [...]}), one JSON line per
reply on its stdout ({"rc": int, "stdout": str, "stderr": str}).
"""
import json
import os
import queue
import subprocess
import sys
import tempfile


def serve(main, preload=()):
    """The server loop: import `preload`, then answer each request with main(argv) in a forked child."""
    for name in preload:
        __import__(name)
    out = sys.stdout
    for line in sys.stdin:
        if not line.strip():
            continue
        argv = json.loads(line)["argv"]
        with tempfile.TemporaryFile("w+") as fo, tempfile.TemporaryFile("w+") as fe:
            out.flush()
            pid = os.fork()
            if pid == 0:  # the child: a fresh process state that shares the imported modules
                rc = 1
                try:
                    os.dup2(fo.fileno(), 1)
                    os.dup2(fe.fileno(), 2)
                    sys.stdout = os.fdopen(1, "w", closefd=False)
                    sys.stderr = os.fdopen(2, "w", closefd=False)
                    rc = main(argv)
                    rc = 0 if rc is None else rc
                except SystemExit as e:
                    rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
                except BaseException:  # noqa: B902 - a traceback on stderr, like a separate run
                    import traceback
                    traceback.print_exc()
                    rc = 1
                finally:
                    try:
                        sys.stdout.flush()
                        sys.stderr.flush()
                    finally:
                        os._exit(rc)
            _, status = os.waitpid(pid, 0)
            rc = os.waitstatus_to_exitcode(status)
            fo.seek(0)
            fe.seek(0)
            reply = {"rc": rc, "stdout": fo.read(), "stderr": fe.read()}
        out.write(json.dumps(reply) + "\n")
        out.flush()


class Pool:
    """`workers` servers started with `cmd`; run() sends a request to a free one (thread-safe)."""

    def __init__(self, cmd, workers=2, env=None):
        self.cmd = cmd
        self.idle = queue.Queue()
        self.procs = []
        for _ in range(workers):
            p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
            self.procs.append(p)
            self.idle.put(p)

    def run(self, argv):
        p = self.idle.get()
        try:
            p.stdin.write(json.dumps({"argv": list(argv)}) + "\n")
            p.stdin.flush()
            line = p.stdout.readline()
            if not line:
                raise RuntimeError(f"{' '.join(self.cmd)} exited ({p.wait()})")
            reply = json.loads(line)
            return reply["rc"], reply["stdout"], reply["stderr"]
        finally:
            self.idle.put(p)

    def close(self):
        for p in self.procs:
            p.stdin.close()
        for p in self.procs:
            p.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
