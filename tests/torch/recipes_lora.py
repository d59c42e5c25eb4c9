"""Trainable subsets of the reference models, for tests/torch/measure.py (issue 12, recipe 3).

lora: peft.get_peft_model(model, LoraConfig(r, lora_alpha, lora_dropout, target_modules)) on the
reference classes (peft injects its lora.Linear layers into the model in place, so the model itself
is run, as the reference README says); every other parameter is frozen (bias="none").
frozen:PATTERNS: the parameters whose names match a pattern get requires_grad_(False). Patterns
mirror actsim's (graph/include/actsim/graph/trainable.hpp): comma-separated; `*` and `?` as in
fnmatch; a pattern matches a name whole, or a module prefix of it ("wte" matches wte.weight);
"{A..B}" stands for the integers A to B.
Either way the optimizer gets only the parameters that require grad (measure.py).
"""
import fnmatch
import re


def expand(pattern):
    m = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
    if not m:
        return [pattern]
    a, z = int(m.group(1)), int(m.group(2))
    return [pattern[:m.start()] + str(i) + pattern[m.end():] for i in range(a, z + 1)]


def matches(pattern, name):
    parts = name.split(".")
    prefixes = [".".join(parts[:k]) for k in range(1, len(parts) + 1)]
    return any(fnmatch.fnmatchcase(p, pattern) for p in prefixes)


def freeze(model, spec):
    """spec: 'PATTERN,PATTERN,...' (without the 'frozen:' prefix)."""
    patterns = [q for p in spec.split(",") for q in expand(p.strip())]
    for p in patterns:
        if not any(matches(p, n) for n, _ in model.named_parameters()):
            raise ValueError("frozen pattern %r names no parameter" % p)
    for n, param in model.named_parameters():
        if any(matches(p, n) for p in patterns):
            param.requires_grad_(False)


def apply_lora(model, r, alpha, dropout, targets):
    """targets: 'all-linear' or 'name,name,...' (peft's target_modules)."""
    import peft
    target_modules = targets if targets == "all-linear" else targets.split(",")
    peft.get_peft_model(model, peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout,
                                               target_modules=target_modules))


def apply(model, cfg):
    """The trainable subset of cfg['trainable'] ('all', 'lora', 'frozen:PATTERNS') on model."""
    t = cfg["trainable"]
    if t == "all":
        return
    if t == "lora":
        alpha = float(cfg["lora_alpha"])
        apply_lora(model, int(cfg["lora_r"]), int(alpha) if alpha.is_integer() else alpha,
                   float(cfg["lora_dropout"]), cfg["lora_targets"])
        return
    if t.startswith("frozen:"):
        freeze(model, t[len("frozen:"):])
        return
    raise ValueError("unknown trainable %r" % t)
