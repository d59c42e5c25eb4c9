#!/usr/bin/python3
"""Cross-check a replay against real PyTorch: same weights, same data, loss and gradients.

Usage: /usr/bin/python3 python/torch_check.py DUMP

DUMP is written by `actsim replay --torch` (kernels::torch_dump): one JSON header line, then raw
little-endian arrays. The header names the model (actsim's model.* keys), the replay's loss, and
each array: name (the graph's name, which is the module's parameter/buffer name), role (param,
buffer, input, grad), dtype (float32 or int64), shape, offset and nbytes into the data after the
header line.

The script builds the reference model (../shared/reference/models.py beside the checkout, or $ACTSIM_REFERENCE),
loads the replay's parameters and buffers into it, runs forward and backward on the replay's
idx/targets, and compares: loss within rtol 1e-4, gradients with torch.allclose(rtol=1e-4,
atol=1e-5) (fp32). Prints one JSON line {"ok", "detail", "loss_torch", "loss_actsim",
"max_abs_diff", "worst"}; exit 0 when equal within tolerance, 1 when not, 2 on a bad dump,
77 when torch is not installed.
"""
import json
import os
import sys


def fail(msg, code=2):
    print(json.dumps({"ok": False, "detail": msg}))
    sys.exit(code)


def main():
    if len(sys.argv) != 2:
        fail("usage: torch_check.py DUMP")
    try:
        import torch
    except ImportError:
        print(json.dumps({"ok": None, "detail": "python3-torch is not installed"}))
        sys.exit(77)
    here = os.path.dirname(os.path.abspath(__file__))
    ref = os.environ.get("ACTSIM_REFERENCE") or os.path.join(here, "..", "..", "shared", "reference")
    sys.path.insert(0, ref)
    try:
        import models
    except ImportError as e:
        fail("cannot import the reference models from %s: %s" % (ref, e))

    with open(sys.argv[1], "rb") as f:
        data = f.read()
    nl = data.find(b"\n")
    if nl < 0:
        fail("%s: no header line" % sys.argv[1])
    header = json.loads(data[:nl])
    blob = data[nl + 1:]
    if header.get("format") != "actsim-torch-dump":
        fail("%s: not an actsim torch dump" % sys.argv[1])

    def tensor(a):
        dt = torch.float32 if a["dtype"] == "float32" else torch.int64
        raw = blob[a["offset"]:a["offset"] + a["nbytes"]]
        if len(raw) != a["nbytes"]:
            fail("%s: array %s is truncated" % (sys.argv[1], a["name"]))
        return torch.frombuffer(bytearray(raw), dtype=dt).reshape(a["shape"]).clone()

    torch.manual_seed(0)
    torch.set_num_threads(1)
    m = header["model"]
    model = models.build_model(m["family"], m["vocab_size"], m["seq_len"], m["d_model"], m["n_heads"],
                               m["n_layers"], d_ff=m["d_ff"], dropout=m["dropout"],
                               n_kv_heads=m["n_kv_heads"], attention=m["attention"])
    if m["family"] == "llama" and m.get("rope_theta", 10000.0) != 10000.0:
        fail("rope_theta other than 10000 is not supported by build_model")
    dtype = torch.float64 if header.get("dtype") == "float64" else torch.float32
    model = model.to(dtype)
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    inputs, grads = {}, {}
    with torch.no_grad():
        for a in header["arrays"]:
            t = tensor(a)
            if a["role"] == "param":
                if a["name"] not in params:
                    fail("parameter %s is not in the reference model" % a["name"])
                params[a["name"]].copy_(t)
            elif a["role"] == "buffer":
                # A shared module's buffer appears under every module path that holds it.
                hits = [k for k in buffers if k == a["name"] or k.endswith("." + a["name"])]
                if not hits:
                    fail("buffer %s is not in the reference model" % a["name"])
                for k in hits:
                    buffers[k].copy_(t)
            elif a["role"] == "input":
                inputs[a["name"]] = t
            elif a["role"] == "grad":
                grads[a["name"]] = t
    model.train()
    loss = model(inputs["idx"], inputs["targets"])
    loss.backward()

    lt, la = float(loss), float(header["loss"])
    worst, worst_name, bad = 0.0, "", []
    for name, p in params.items():
        if name not in grads:
            if p.grad is not None:
                bad.append(name + " (no gradient from the replay)")
            continue
        g = p.grad.to(torch.float32)
        d = float((g - grads[name]).abs().max())
        if d > worst:
            worst, worst_name = d, name
        if not torch.allclose(grads[name], g, rtol=1e-4, atol=1e-5):
            bad.append(name)
            if os.environ.get("ACTSIM_TORCH_VERBOSE"):
                print("%s: max |diff| %.3g, max |grad| %.3g" % (name, d, float(g.abs().max())), file=sys.stderr)
    loss_ok = abs(lt - la) <= 1e-4 * abs(lt) + 1e-6
    ok = loss_ok and not bad
    detail = "loss %.7g vs torch %.7g; %d gradients, max |diff| %.3g (%s)" % (la, lt, len(grads), worst, worst_name)
    if not loss_ok:
        detail = "loss differs: " + detail
    if bad:
        detail = "gradients differ beyond rtol 1e-4 / atol 1e-5: %s; %s" % (", ".join(bad[:5]), detail)
    print(json.dumps({"ok": ok, "detail": detail, "loss_torch": lt, "loss_actsim": la, "max_abs_diff": worst,
                      "worst": worst_name}))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
