"""Mixed precision recipe (training.autocast) for tests/torch/measure.py.

autocast=bf16|fp16: the whole `model(idx, targets)` call, loss included, runs inside
torch.autocast("cpu", dtype=D); the parameters stay in the model's dtype. fp16 adds
torch.amp.GradScaler("cpu") (PyTorch 2.x; 1.13's CPU autocast accepts bf16 only):

    with torch.autocast("cpu", dtype=D):
        loss = model(idx, targets)
    scaler.scale(loss).backward()     # the backward range: loss * scale, then backward
    scaler.step(optimizer)            # the optimizer range: unscale_, the inf check, step, update
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
"""
import functools

import torch


def wrap_autocast(model, dtype):
    """Runs model.forward under torch.autocast(device_type="cpu", dtype=dtype)."""
    inner = model.forward

    @functools.wraps(inner)
    def forward(*args, **kwargs):
        with torch.autocast("cpu", dtype=dtype):
            return inner(*args, **kwargs)
    model.forward = forward


def make_scaler():
    """torch.amp.GradScaler for the CPU with its defaults (init_scale 2**16, growth_interval 2000)."""
    return torch.amp.GradScaler("cpu")


def scaled_backward(scaler, loss):
    scaler.scale(loss).backward()


def scaled_step(scaler, opt):
    """scaler.step + scaler.update; returns whether optimizer.step ran (False: an inf was found
    and the step was skipped, which the simulator does not model: the oracle fails then)."""
    before = scaler._scale.item()
    scaler.step(opt)
    scaler.update()
    return scaler._scale.item() >= before
