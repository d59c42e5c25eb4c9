"""Shared helpers of the export checks: run `actsim simulate` with every exporter into a temporary folder."""
import json
import os
import subprocess
import tempfile

TINY = ["model.n_layers=2", "model.d_model=64", "model.n_heads=4", "model.seq_len=32",
        "model.vocab_size=128", "training.batch_size=2"]
# Larger: hundreds of events, several segments, every category visible on the chart.
MEDIUM = ["model.n_layers=4", "model.d_model=256", "model.n_heads=4", "model.seq_len=128",
          "model.vocab_size=1024", "training.batch_size=4"]


def run_exports(actsim, sets, max_events=0):
    """Writes every export of a scenario with `actsim simulate`; returns (folder, summary JSON)."""
    out = tempfile.mkdtemp(prefix="actsim_export_")
    files = {"--trace": "trace.json", "--memviz": "snapshot.pickle", "--csv": "events.csv",
             "--report": "report.html", "--svg": "chart.svg"}
    cmd = [actsim, "simulate", "--no-fit", "--json", "--timeline"]
    for opt, name in files.items():
        cmd += [opt, os.path.join(out, name)]
    if max_events:
        cmd += ["--max-events", str(max_events)]
    for kv in sets:
        cmd += ["--set", kv]
    p = subprocess.run(cmd, check=True, capture_output=True, text=True)
    with open(os.path.join(out, "summary.json"), "w") as f:
        f.write(p.stdout)
    return out, json.loads(p.stdout)
