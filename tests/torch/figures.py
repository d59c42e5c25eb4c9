"""The figures a cross-check compares, actsim's `simulate --json` against a measured PyTorch run.

One list for every driver (test_against_torch.py, test_against_hf.py, test_parallel.py): `a` is
actsim's figures, `m` the measured memory ("memory" of measure*.py), `s` the measured saved bytes
("saved"; None where the driver does not hook saved tensors), `per_layer` actsim's per-layer saved
bytes as the oracle groups them (default: as actsim reports them).
"""

LIVE = ("step_start", "end_forward", "end_backward", "end_optimizer")


def figure_pairs(a, m, s=None, per_layer=None, inputs=True):
    pairs = []
    if s is not None:
        act = a["activations"]
        pairs += [
            ("activations.saved_bytes", act["saved_bytes"], s["saved_bytes"]),
            ("activations.per_layer_saved_bytes",
             act["per_layer_saved_bytes"] if per_layer is None else per_layer, s["per_layer_saved_bytes"]),
            ("activations.outside_layers_saved_bytes", act["outside_layers_saved_bytes"],
             s["outside_layers_saved_bytes"]),
        ]
    keys = ["params_bytes", "optimizer_bytes", "buffers_bytes"] + (["inputs_bytes"] if inputs else [])
    pairs += [(k, a[k], m[k]) for k in keys]
    pairs += [(f"live_bytes.{k}", a["live_bytes"][k], m["live_bytes"][k]) for k in LIVE]
    pairs += [
        ("live_bytes.end_step", a["live_bytes"]["end_step"], m["live_bytes"]["after_zero_grad"]),
        ("peak.bytes", a["peak"]["bytes"], m["peak"]["bytes"]),
        ("peak.phase", a["peak"]["phase"], m["peak"]["phase"]),
    ]
    return pairs
