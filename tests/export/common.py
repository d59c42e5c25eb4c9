"""Shared helpers of the export checks: run the fixture into a temporary folder."""
import json
import os
import subprocess
import tempfile

TINY = ["model.n_layers=2", "model.d_model=64", "model.n_heads=4", "model.seq_len=32",
        "model.vocab_size=128", "training.batch_size=2"]
# Larger: hundreds of events, several segments, every category visible on the chart.
MEDIUM = ["model.n_layers=4", "model.d_model=256", "model.n_heads=4", "model.seq_len=128",
          "model.vocab_size=1024", "training.batch_size=4"]


def run_fixture(fixture, sets, max_events=0):
    """Writes every export of a scenario; returns (folder, summary JSON)."""
    out = tempfile.mkdtemp(prefix="actsim_export_")
    cmd = [fixture, out] + (["--max-events", str(max_events)] if max_events else []) + sets
    subprocess.run(cmd, check=True)
    with open(os.path.join(out, "summary.json")) as f:
        return out, json.load(f)
