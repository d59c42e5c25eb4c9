#!/usr/bin/python3
"""Measure what real PyTorch does for one training step of a reference model.

This is the ground truth actsim is checked against. It runs the executable spec in
shared/reference/models.py on CPU (Debian's torch 1.13) and reports, as one JSON object on stdout:

  --mode saved   the tensors autograd saves for backward during one forward pass
                 (deduplicated by storage, parameters left out, attributed to blocks);
  --mode memory  the allocator trace of one steady-state training step (forward, backward,
                 optimizer step, zero_grad): live bytes at the phase boundaries and the peak.

Usage:
  /usr/bin/python3 tests/torch/measure.py --mode saved|memory [--trace] [KEY=VALUE ...]
  /usr/bin/python3 tests/torch/measure.py --serve   (requests on stdin: forkserver.py)

Run it with Debian's /usr/bin/python3: the pyenv python3 that may come first on PATH has no torch.
The reference models are found through $ACTSIM_REFERENCE, else <repo root>/../shared/reference.
"""
import argparse
import contextlib
import json
import math
import os
import sys

# Keys mirror actsim's model.* / train.* scenario keys. None means "derived from other keys".
DEFAULTS = {
    "family": "gpt2",
    "vocab_size": 97,
    "seq_len": 16,
    "d_model": 32,
    "n_heads": 4,
    "n_kv_heads": None,    # = n_heads
    "n_layers": 2,
    "d_ff": None,          # = models.default_d_ff(family, d_model)
    "dropout": 0.0,
    "batch_size": 2,
    "dtype": "fp32",
    "optimizer": "adamw",
    "optimizer_impl": "for_loop",
    "attention": "eager",  # flash: F.scaled_dot_product_attention (PyTorch 2.x only)
    # none | full | every:K | selective | ops:KIND,KIND (PyTorch 2.x: torch.utils.checkpoint with
    # use_reentrant=False; selective and ops: with selective activation checkpointing)
    "checkpoint": "none",
    # checkpoint implementation (issue 12, recipe 4): torch.utils.checkpoint's use_reentrant and
    # preserve_rng_state keyword arguments of every checkpoint call (recipes.py)
    "checkpoint_impl": "nonreentrant",
    "preserve_rng_state": "true",
    "seed": 0,
    # gradient accumulation (issue 12, recipe 2): N times `loss = model(idx, targets) / N;
    # loss.backward()` before the optimizer step; 1 = the plain step, no division
    "grad_accum_steps": 1,
    # trainable subsets (issue 12, recipe 3; tests/torch/recipes_lora.py): all | lora |
    # frozen:PATTERNS; LoRA as peft applies it (PyTorch 2.x only)
    "trainable": "all",
    "lora_r": 8,
    "lora_alpha": 8.0,
    "lora_dropout": 0.0,
    "lora_targets": "q_proj,v_proj",
    # autocast (issue 12 recipe 1): none | bf16 | fp16 -- the forward under torch.autocast("cpu"),
    # fp16 with torch.amp.GradScaler (tests/torch/recipes_amp.py)
    "autocast": "none",
    # Not a scenario key: intra-op threads. One thread keeps the trace deterministic and makes sure
    # every allocation happens on the profiled thread (OpenMP workers could allocate scratch).
    "threads": 1,
}
INT_KEYS = {"vocab_size", "seq_len", "d_model", "n_heads", "n_kv_heads", "n_layers", "d_ff",
            "batch_size", "seed", "threads", "grad_accum_steps", "lora_r"}
FLOAT_KEYS = {"dropout", "lora_alpha", "lora_dropout"}
CHOICES = {
    "family": ("gpt2", "llama"),
    "dtype": ("fp32", "bf16", "fp16"),
    "optimizer": ("adamw", "adam", "sgd", "sgd_momentum"),
    "optimizer_impl": ("for_loop", "foreach", "fused"),
    "attention": ("eager", "flash"),
    # checkpoint implementation (issue 12, recipe 4)
    "checkpoint_impl": ("nonreentrant", "reentrant"),
    "preserve_rng_state": ("true", "false"),
    "autocast": ("none", "bf16", "fp16"),  # autocast recipe
}
PHASES = ("forward", "backward", "optimizer", "zero_grad")  # the measured step, in order
LR = 1e-3  # irrelevant to memory; small so that the warm-up step cannot produce inf/nan


class UsageError(Exception):
    """A bad command line or configuration: reported on stderr with exit status 2."""


EXIT_USAGE = 2
EXIT_UNSUPPORTED = 3  # a valid configuration this torch build cannot run (fp16 on CPU in 1.13)


# ----------------------------------------------------------------------------------------------
# configuration


def parse_config(pairs):
    cfg = dict(DEFAULTS)
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise UsageError("expected KEY=VALUE, got %r" % pair)
        if key not in DEFAULTS:
            raise UsageError("unknown key %r (known keys: %s)" % (key, ", ".join(DEFAULTS)))
        try:
            if key in INT_KEYS:
                cfg[key] = int(value)
            elif key in FLOAT_KEYS:
                cfg[key] = float(value)
            else:
                cfg[key] = value
        except ValueError:
            raise UsageError("bad value for %s: %r" % (key, value))
        if key in CHOICES and value not in CHOICES[key]:
            raise UsageError("bad value for %s: %r (one of %s)"
                             % (key, value, ", ".join(CHOICES[key])))
    for key in INT_KEYS:
        if cfg[key] is not None and cfg[key] < (0 if key == "seed" else 1):
            raise UsageError("%s must be positive, got %d" % (key, cfg[key]))
    if not 0.0 <= cfg["dropout"] < 1.0:
        raise UsageError("dropout must be in [0, 1), got %g" % cfg["dropout"])
    if cfg["n_kv_heads"] is None:
        cfg["n_kv_heads"] = cfg["n_heads"]
    if cfg["d_model"] % cfg["n_heads"]:
        raise UsageError("d_model=%d is not a multiple of n_heads=%d"
                         % (cfg["d_model"], cfg["n_heads"]))
    if cfg["n_heads"] % cfg["n_kv_heads"]:
        raise UsageError("n_heads=%d is not a multiple of n_kv_heads=%d"
                         % (cfg["n_heads"], cfg["n_kv_heads"]))
    return cfg


def load_reference():
    """Import shared/reference/models.py, the executable spec of the model families."""
    ref = os.environ.get("ACTSIM_REFERENCE")
    if not ref:
        repo_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        ref = os.path.join(repo_root, "..", "shared", "reference")
    ref = os.path.normpath(ref)
    if not os.path.isfile(os.path.join(ref, "models.py")):
        raise UsageError("reference models not found: %s/models.py (set ACTSIM_REFERENCE)" % ref)
    sys.path.insert(0, ref)
    import models  # noqa: E402  (path set just above)
    return models


def torch_dtype(torch, name):
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def build(torch, models, cfg):
    """Model and inputs as the reference README prescribes (whole-model cast, train mode)."""
    torch.manual_seed(cfg["seed"])
    try:
        model = models.build_model(
            cfg["family"], cfg["vocab_size"], cfg["seq_len"], cfg["d_model"], cfg["n_heads"],
            cfg["n_layers"], d_ff=cfg["d_ff"], dropout=cfg["dropout"],
            n_kv_heads=cfg["n_kv_heads"], attention=cfg["attention"])
    except (ValueError, AssertionError) as e:
        raise UsageError("build_model rejected the configuration: %s" % (e or type(e).__name__))
    if cfg["trainable"] != "all":  # before the cast and the checkpoint wrappers (model names)
        import recipes_lora
        try:
            recipes_lora.apply(model, cfg)
        except ValueError as e:
            raise UsageError(str(e))
    if cfg["dtype"] != "fp32":
        model.to(torch_dtype(torch, cfg["dtype"]))
    if cfg["checkpoint"] != "none":
        import recipes  # tests/torch/recipes.py (imports torch itself)
        try:
            recipes.wrap_checkpoint(model, cfg["checkpoint"], models, cfg["checkpoint_impl"],
                                    cfg["preserve_rng_state"] == "true")
        except ValueError as e:
            raise UsageError(str(e))
    if cfg["autocast"] != "none":  # autocast recipe
        import recipes_amp
        recipes_amp.wrap_autocast(model, torch_dtype(torch, cfg["autocast"]))
        model.grad_scaler = recipes_amp.make_scaler() if cfg["autocast"] == "fp16" else None
    model.train()
    shape = (cfg["batch_size"], cfg["seq_len"])
    idx = torch.randint(0, cfg["vocab_size"], shape, dtype=torch.int64)
    targets = torch.randint(0, cfg["vocab_size"], shape, dtype=torch.int64)
    return model, idx, targets


def make_optimizer(torch, cfg, params):
    impl = cfg["optimizer_impl"]
    kw = {"foreach": impl == "foreach"}
    if impl == "fused":  # PyTorch 2.x: fused Adam/AdamW/SGD kernels, CPU included
        kw = {"fused": True}
    name = cfg["optimizer"]
    if name == "adamw":
        return torch.optim.AdamW(params, lr=LR, **kw)
    if name == "adam":
        return torch.optim.Adam(params, lr=LR, **kw)
    if name == "sgd":
        return torch.optim.SGD(params, lr=LR, **kw)
    return torch.optim.SGD(params, lr=LR, momentum=0.9, **kw)


# ----------------------------------------------------------------------------------------------
# storage helpers: every byte count in this script is a whole storage, never a view's extent


def storage_key(t):
    """(data_ptr, nbytes) of the whole storage behind t (torch 1.13: t.storage() is a TypedStorage
    over all of it; torch 2.x deprecates that in favour of untyped_storage())."""
    s = t.untyped_storage() if hasattr(t, "untyped_storage") else t.storage()
    return s.data_ptr(), s.nbytes()


def distinct_storage_bytes(tensors):
    seen = {}
    for t in tensors:
        ptr, nbytes = storage_key(t)
        if ptr:
            seen[ptr] = nbytes
    return sum(seen.values()), set(seen)


def optimizer_tensors(torch, opt):
    out = []
    for state in opt.state.values():
        for v in state.values():
            if isinstance(v, torch.Tensor):
                out.append(v)  # includes Adam's 0-dim 'step' tensor
    return out


# ----------------------------------------------------------------------------------------------
# --mode saved


def unpack_identity(t):
    return t


def saved_grad_fn_tensors(torch, node):
    """(attr, tensor) for every tensor a grad_fn node saved; torch exposes them as _saved_*.

    A tensor packed by someone else's hook (torch.utils.checkpoint's) is not read: unpacking it
    would run the recomputation. PyTorch 2.x shows the hook as _raw_saved_*.unpack_hook; 1.13 has
    no _raw_saved_* and no checkpoint runs under it here."""
    out = []
    for attr in dir(node):
        if not attr.startswith("_saved_"):
            continue
        raw = getattr(node, "_raw" + attr, None)
        raws = raw if isinstance(raw, (list, tuple)) else [raw]
        if any(r is not None and hasattr(r, "unpack_hook") and r.unpack_hook not in (None, unpack_identity)
               for r in raws):
            continue
        try:
            value = getattr(node, attr)
        except RuntimeError:  # already freed: cannot happen before backward, but stay robust
            continue
        except Exception as e:  # 1.13's non-reentrant checkpoint hook (recipes.RecomputeInWalk)
            if type(e).__name__ == "RecomputeInWalk":
                continue
            raise
        if isinstance(value, torch.Tensor):
            out.append((attr, value))
        elif isinstance(value, (list, tuple)):
            out.extend(("%s[%d]" % (attr, i), v) for i, v in enumerate(value)
                       if isinstance(v, torch.Tensor))
    return out


class GraphWalker:
    """Assigns every autograd node to the block whose forward created it.

    A pack hook cannot see which node is packing, so nodes are attributed by walking the graph at
    block boundaries: nodes first reachable from block i's output (and not from its input) were
    created by block i. Post-order gives inputs before consumers, i.e. roughly forward order."""

    def __init__(self):
        self.block_of = {}  # node -> block index (-1: outside any block); holds the nodes alive
        self.order = []

    def claim(self, roots, block):
        visiting = set()  # expanded, children pending
        stack = [(n, False) for n in reversed(roots)]
        while stack:
            node, done = stack.pop()
            if node in self.block_of:
                continue
            if done:
                self.block_of[node] = block
                self.order.append(node)
                continue
            if node in visiting:
                continue
            visiting.add(node)
            stack.append((node, True))
            for child, _ in reversed(node.next_functions):
                if child is not None and child not in self.block_of and child not in visiting:
                    stack.append((child, False))


def grad_fns(torch, values):
    if isinstance(values, torch.Tensor):
        values = (values,)
    return [v.grad_fn for v in values if isinstance(v, torch.Tensor) and v.grad_fn is not None]


def measure_saved(torch, models, cfg, trace):
    model, idx, targets = build(torch, models, cfg)
    blocks = list(model.blocks)
    _, param_ptrs = distinct_storage_bytes(model.parameters())
    _, buffer_ptrs = distinct_storage_bytes(model.buffers())
    _, input_ptrs = distinct_storage_bytes([idx, targets])

    current = {"block": -1}
    walker = GraphWalker()
    packs = []  # one entry per pack call
    first_block = {}  # storage ptr -> block of its first pack
    nbytes_of = {}
    empty = []  # packs of storages without memory (data_ptr 0 / nbytes 0)

    def pre_hook(i):
        def hook(module, inputs):
            walker.claim(grad_fns(torch, inputs), -1)  # anything built since the last block
            current["block"] = i
        return hook

    def post_hook(i):
        def hook(module, inputs, output):
            walker.claim(grad_fns(torch, output), i)
            current["block"] = -1
        return hook

    handles = []
    for i, b in enumerate(blocks):
        handles.append(b.register_forward_pre_hook(pre_hook(i)))
        handles.append(b.register_forward_hook(post_hook(i)))

    def pack(t):
        ptr, nbytes = storage_key(t)
        entry = {"block": current["block"], "shape": list(t.shape), "dtype": str(t.dtype)[6:],
                 "storage_nbytes": nbytes, "is_param": ptr in param_ptrs}
        packs.append((ptr, entry))
        if ptr == 0 or nbytes == 0:
            empty.append(entry)
        elif ptr not in first_block:
            first_block[ptr] = current["block"]
            nbytes_of[ptr] = nbytes
        return t  # keep the tensor itself so that the grad_fn walk sees the same storages

    import recipes

    def closure_args(tensors):  # 1.13 non-reentrant checkpoint: its arguments (recipes.py)
        for t in tensors:
            ptr, nbytes = storage_key(t)
            if ptr and nbytes and ptr not in param_ptrs and ptr not in first_block:
                first_block[ptr] = current["block"]
                nbytes_of[ptr] = nbytes
    recipes.ON_CLOSURE_ARGS["fn"] = closure_args
    recipes.RECORD_SAC["on"] = True
    with torch.autograd.graph.saved_tensors_hooks(pack, unpack_identity):
        loss = model(idx, targets)
        if cfg["grad_accum_steps"] > 1:  # one micro-batch's forward includes the division
            loss = loss / cfg["grad_accum_steps"]
    recipes.RECORD_SAC["on"] = False
    recipes.ON_CLOSURE_ARGS["fn"] = None
    for h in handles:
        h.remove()
    walker.claim([loss.grad_fn], -1)
    # what selective activation checkpointing cached during this forward
    sac_bytes = 0
    for block, mode in recipes.SAC_CACHES:
        for entries in mode.storage.values():
            for entry in entries.values():
                for w in (entry if isinstance(entry, (list, tuple)) else [entry]):
                    t = getattr(w, "val", None)
                    if not isinstance(t, torch.Tensor):
                        continue
                    ptr, nbytes = storage_key(t)
                    if ptr and nbytes and ptr not in param_ptrs and ptr not in first_block:
                        first_block[ptr] = block
                        nbytes_of[ptr] = nbytes
                        sac_bytes += nbytes
    recipes.SAC_CACHES.clear()

    # small ids make storages comparable across entries without printing addresses
    sid = {}
    for ptr, _ in packs:
        sid.setdefault(ptr, len(sid))

    # the graph walk: what the nodes hold after forward. PyTorch 2.x does not run the pack hook
    # for wrapped numbers (SavedVariable skips hooks when is_wrapped_number(): `x * 0.125` keeps
    # a 0-dim float64 the hooks never see), yet the node keeps that storage alive until backward:
    # it is saved memory, so the walk adds what the hooks missed, charged to the node's block.
    walk = []
    walk_bytes = {}
    unhooked = 0
    recipes.WALKING["on"] = True
    for node in walker.order:
        for attr, t in saved_grad_fn_tensors(torch, node):
            ptr, nbytes = storage_key(t)
            sid.setdefault(ptr, len(sid))
            is_param = ptr in param_ptrs
            if ptr and nbytes and not is_param:
                walk_bytes[ptr] = nbytes
                if ptr not in first_block:
                    first_block[ptr] = walker.block_of[node]
                    nbytes_of[ptr] = nbytes
                    unhooked += nbytes
            walk.append({
                "block": walker.block_of[node], "node": type(node).__name__, "attr": attr,
                "shape": list(t.shape), "dtype": str(t.dtype)[6:],
                "view_nbytes": t.numel() * t.element_size(), "storage_nbytes": nbytes,
                "storage_id": sid[ptr], "is_param": is_param,
                "is_input": ptr in input_ptrs, "is_buffer": ptr in buffer_ptrs})
    recipes.WALKING["on"] = False

    per_layer = [0] * len(blocks)
    outside = 0
    counted = [p for p in first_block if p not in param_ptrs]
    for ptr in counted:
        if first_block[ptr] >= 0:
            per_layer[first_block[ptr]] += nbytes_of[ptr]
        else:
            outside += nbytes_of[ptr]

    result = {
        "config": cfg,
        "saved_bytes": sum(nbytes_of[p] for p in counted),
        "saved_bytes_walk": sum(walk_bytes.values()),
        "per_layer_saved_bytes": per_layer,
        "outside_layers_saved_bytes": outside,
        "n_storages": len(counted),
        # saved_bytes counts every non-parameter storage, idx/targets included (embedding and
        # nll_loss save them); actsim may count inputs separately, so say how much they are
        "saved_input_bytes": sum(nbytes_of[p] for p in counted if p in input_ptrs),
        "saved_buffer_bytes": sum(nbytes_of[p] for p in counted if p in buffer_ptrs),
        "n_packs": len(packs),
        "saved_unhooked_bytes": unhooked,  # wrapped numbers the 2.x pack hook skips (0 on 1.13)
        "saved_sac_cache_bytes": sac_bytes,  # selective activation checkpointing's cache
        "empty_storages": empty,
        "loss": loss.item(),
    }
    if trace:
        for ptr, entry in packs:
            entry["storage_id"] = sid[ptr]
        result["packs"] = [entry for _, entry in packs]
        result["tensors"] = walk
    return result


# ----------------------------------------------------------------------------------------------
# --mode memory


def train_step(model, opt, idx, targets, record_function=None, n=1):
    """One step of the spec. With record_function, each phase is a named profiler range.

    n > 1: gradient accumulation, n micro-batches; the last one's ranges are forward and backward,
    micro-batch k's before it forward@k and backward@k. autocast=fp16: GradScaler's
    scaler.scale(loss).backward(), scaler.step and scaler.update (tests/torch/recipes_amp.py)."""
    scaler = getattr(model, "grad_scaler", None)
    if scaler is not None:
        import recipes_amp

    def backward(loss):
        if scaler is None:
            loss.backward()
        else:
            recipes_amp.scaled_backward(scaler, loss)
    if record_function is None:
        for _ in range(n):
            loss = model(idx, targets) if n == 1 else model(idx, targets) / n
            backward(loss)
        if scaler is None:
            opt.step()
        elif not recipes_amp.scaled_step(scaler, opt):
            raise RuntimeError("GradScaler skipped the warm-up step (inf/nan gradients)")
        opt.zero_grad(set_to_none=True)
        return loss
    for k in range(n):
        tag = "" if k == n - 1 else "@%d" % k
        with record_function("actsim::forward" + tag):
            loss = model(idx, targets) if n == 1 else model(idx, targets) / n
        with record_function("actsim::backward" + tag):
            backward(loss)
    with record_function("actsim::optimizer"):
        if scaler is None:
            opt.step()
        elif not recipes_amp.scaled_step(scaler, opt):
            raise RuntimeError("GradScaler skipped the measured step (inf/nan gradients)")
    with record_function("actsim::zero_grad"):
        opt.zero_grad(set_to_none=True)
    return loss  # the caller holds it past zero_grad, as a training loop's local would be


def profiler_range(torch):
    """A record_function that allocates nothing.

    Debian's torch 1.13 record_function still uses the legacy _record_function_enter, which returns
    its handle as a small tensor: every range would add a 4-byte allocation (aten::zeros) just
    before it starts and free it after it ends, i.e. inside the neighbouring phases. The newer op
    returns a ScriptObject instead; use it when present."""
    ops = torch.ops.profiler
    try:
        enter, leave = ops._record_function_enter_new, ops._record_function_exit._RecordFunction
    except (AttributeError, RuntimeError):
        from torch.profiler import record_function
        return record_function

    @contextlib.contextmanager
    def record_function(name):
        handle = enter(name, None)
        try:
            yield
        finally:
            leave(handle)
    return record_function


def flatten(tree):
    stack = list(reversed(tree))
    while stack:
        node = stack.pop()
        yield node
        stack.extend(reversed(node.children))


def op_chain(node):
    chain = []
    p = node.parent
    while p is not None:
        chain.append(p.name)
        p = p.parent
    return chain


ALLOCATING_PRIMITIVES = {"aten::empty", "aten::empty_like", "aten::empty_strided", "aten::resize_"}


def producer(ops):
    """The op that asked for an allocation: the innermost one that is not a mere allocator call."""
    for name in ops:
        if name not in ALLOCATING_PRIMITIVES:
            return name
    return ops[0] if ops else None


def measure_memory(torch, models, cfg, trace):
    from torch.profiler import profile, ProfilerActivity
    record_function = profiler_range(torch)

    # The CPU allocator only accounts for bytes allocated while profiling is on, so everything
    # (model, optimizer, inputs) is created inside the profiler: the running total then equals
    # the bytes actually live.
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                 with_stack=False) as prof:
        with record_function("actsim::setup"):
            model, idx, targets = build(torch, models, cfg)
            opt = make_optimizer(torch, cfg, [p for p in model.parameters() if p.requires_grad])
        with record_function("actsim::warmup"):
            # steady state: the optimizer state exists before the measured step
            loss = train_step(model, opt, idx, targets, n=cfg["grad_accum_steps"])
            del loss
        loss = train_step(model, opt, idx, targets, record_function, n=cfg["grad_accum_steps"])
    loss_value = loss.item()

    nodes = list(flatten(prof.profiler.kineto_results.experimental_event_tree()))
    ranges = {}
    for n in nodes:
        if n.name.startswith("actsim::") and "Allocation" not in str(n.tag):
            ranges[n.name[len("actsim::"):]] = (n.start_time_ns, n.end_time_ns)
    micro = tuple("%s@%d" % (p, k) for k in range(cfg["grad_accum_steps"] - 1) for p in PHASES[:2])
    missing = [p for p in ("setup", "warmup") + PHASES + micro if p not in ranges]
    if missing:
        raise RuntimeError("profiler lost the ranges %s" % missing)
    step_t0 = ranges[micro[0] if micro else "forward"][0]  # the first micro-batch's forward

    mem = [n for n in nodes if "Allocation" in str(n.tag)]
    mem.sort(key=lambda n: n.start_time_ns)  # sort is stable: same-time events keep tree order

    def phase_of(t):
        for name in ("setup", "warmup") + PHASES + micro:
            start, end = ranges[name]
            if start <= t <= end:
                return name.partition("@")[0]  # an earlier micro-batch's forward or backward
        if t < ranges["setup"][0]:
            return "before"
        return "between"  # outside every range: would be a surprise, so it gets its own name

    # total_allocated is the allocator's running total; in a fresh process it starts at 0, but
    # report it relative to the first event anyway so that totals always mean "bytes allocated
    # since profiling began and still live".
    base = mem[0].extra_fields.total_allocated - mem[0].extra_fields.alloc_size if mem else 0
    events = []
    inconsistent = 0  # steps where total != previous total + size: an ordering tie or a
    total = 0         # foreign thread; 0 means the sorted order is the allocator's order
    for n in mem:
        f = n.extra_fields
        if f.total_allocated - base != total + f.alloc_size:
            inconsistent += 1
        total = f.total_allocated - base
        events.append({"t": n.start_time_ns, "phase": phase_of(n.start_time_ns),
                       "bytes": f.alloc_size, "total": total, "ptr": f.ptr, "ops": op_chain(n)})

    def total_at(t, inclusive):
        """Live bytes after the last event before time t (at t too if inclusive)."""
        value = 0
        for e in events:
            if e["t"] > t or (e["t"] == t and not inclusive):
                break
            value = e["total"]
        return value

    live = {
        "step_start": total_at(step_t0, False),
        "end_forward": total_at(ranges["forward"][1], True),
        "end_backward": total_at(ranges["backward"][1], True),
        "end_optimizer": total_at(ranges["optimizer"][1], True),
        "after_zero_grad": total_at(ranges["zero_grad"][1], True),
    }

    step = [e for e in events if step_t0 <= e["t"] <= ranges["zero_grad"][1]]
    for i, e in enumerate(step):
        e["i"] = i
    peak = None
    phase_peaks = {}
    for e in step:
        pp = phase_peaks.get(e["phase"])
        if pp is None or e["total"] > pp["bytes"]:
            phase_peaks[e["phase"]] = {"bytes": e["total"], "op": e["ops"][0] if e["ops"] else None,
                                       "index": e["i"]}
        if e["phase"] in ("forward", "backward", "optimizer") and (
                peak is None or e["total"] > peak["bytes"]):
            peak = {"bytes": e["total"], "phase": e["phase"],
                    "op": e["ops"][0] if e["ops"] else None, "index": e["i"]}

    # What the live bytes at step start are made of: replay allocations by pointer and match the
    # survivors against the storages we know about.
    params_bytes, param_ptrs = distinct_storage_bytes(model.parameters())
    buffers_bytes, buffer_ptrs = distinct_storage_bytes(model.buffers())
    opt_bytes, opt_ptrs = distinct_storage_bytes(optimizer_tensors(torch, opt))
    inputs_bytes, input_ptrs = distinct_storage_bytes([idx, targets])
    known = param_ptrs | buffer_ptrs | opt_ptrs | input_ptrs

    # Replay: pair every free with its allocation (by pointer, which the allocator reuses, so in
    # order) and snapshot what is alive when the step starts and after it ends.
    alive = {}
    at_start = at_end = None
    for e in events:
        if at_start is None and e["t"] >= step_t0:
            at_start = dict(alive)
        if at_end is None and e["t"] > ranges["zero_grad"][1]:
            at_end = dict(alive)
        if e["bytes"] >= 0:
            alive[e["ptr"]] = e
        else:
            e["alloc"] = alive.pop(e["ptr"], None)
    at_start = alive if at_start is None else at_start
    at_end = alive if at_end is None else at_end

    def describe(allocs):
        return [{"bytes": e["bytes"], "phase": e["phase"], "ops": e["ops"]}
                for e in sorted(allocs, key=lambda e: e["t"])]

    unexplained = describe(e for p, e in at_start.items() if p not in known)
    # compare allocation events, not pointers: a freed pointer is often handed out again
    start_events = set(id(e) for e in at_start.values())
    new_at_end = describe(e for e in at_end.values() if id(e) not in start_events)

    result = {
        "config": cfg,
        "live_bytes": live,
        "peak": peak,
        "phase_peaks": phase_peaks,
        "params_bytes": params_bytes,
        "buffers_bytes": buffers_bytes,
        "optimizer_bytes": opt_bytes,
        "inputs_bytes": inputs_bytes,
        # step_start - (params + buffers + optimizer + inputs), itemised below
        "step_start_other_bytes": live["step_start"] - params_bytes - buffers_bytes - opt_bytes
                                  - inputs_bytes,
        "step_start_other": unexplained,
        # allocations alive after zero_grad that were not alive at step start (the loss, ...)
        "after_zero_grad_extra": new_at_end,
        "baseline_bytes": base,
        "n_events": len(events),
        "n_step_events": len(step),
        "inconsistent_totals": inconsistent,
        "loss": loss_value,
    }
    if trace:
        def traced(e):
            out = {"i": e.get("i"), "phase": e["phase"], "bytes": e["bytes"], "total": e["total"],
                   "ops": e["ops"]}
            a = e.get("alloc")
            if a is not None:  # a free: which allocation it ends
                out["alloc_i"] = a.get("i", -1)  # -1: allocated before the step
                out["alloc_phase"] = a["phase"]
                out["alloc_op"] = producer(a["ops"])
            return out
        result["events"] = [traced(e) for e in step]
        # between the end of the warm-up and the start of forward; expected to be empty
        result["events_before_forward"] = [
            traced(e) for e in events if ranges["warmup"][1] < e["t"] < step_t0]
    return result


# ----------------------------------------------------------------------------------------------


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Measure saved tensors or the allocation trace of one training step.",
        epilog="keys: " + " ".join("%s=%s" % (k, v) for k, v in DEFAULTS.items()))
    parser.add_argument("--mode", required=True, choices=("saved", "memory", "both"),
                        help="both: {\"saved\": ..., \"memory\": ...} from one process")
    parser.add_argument("--trace", action="store_true",
                        help="add per-tensor (saved) or per-event (memory) detail")
    parser.add_argument("settings", nargs="*", metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    try:
        cfg = parse_config(args.settings)
        try:
            import torch
        except ImportError:
            raise UsageError("%s has no torch; run Debian's /usr/bin/python3" % sys.executable)
        models = load_reference()
        if cfg["d_ff"] is None:
            cfg["d_ff"] = models.default_d_ff(cfg["family"], cfg["d_model"])
        torch.set_num_threads(cfg["threads"])
        if args.mode == "saved":
            result = measure_saved(torch, models, cfg, args.trace)
        elif args.mode == "memory":
            result = measure_memory(torch, models, cfg, args.trace)
        else:
            result = {"saved": measure_saved(torch, models, cfg, args.trace),
                      "memory": measure_memory(torch, models, cfg, args.trace)}
            result["loss"] = result["memory"]["loss"]
    except UsageError as e:
        parser.print_usage(sys.stderr)
        print("%s: error: %s" % (parser.prog, e), file=sys.stderr)
        return EXIT_USAGE
    except RuntimeError as e:
        if "not implemented for" not in str(e):
            raise
        # e.g. torch 1.13 has no Half LayerNorm / rsqrt / addmm kernels on CPU
        print("%s: error: this torch cannot run the configuration on CPU (dtype=%s): %s"
              % (parser.prog, cfg["dtype"], str(e).splitlines()[0]), file=sys.stderr)
        return EXIT_UNSUPPORTED
    if isinstance(result.get("loss"), float) and not math.isfinite(result["loss"]):
        result["loss"] = str(result["loss"])  # keep the output valid JSON
    json.dump(result, sys.stdout, indent=1 if args.trace else None)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    if sys.argv[1:] == ["--serve"]:  # many runs from one import of torch (forkserver.py)
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import forkserver
        forkserver.serve(main, preload=("torch",))
        sys.exit(0)
    sys.exit(main())
