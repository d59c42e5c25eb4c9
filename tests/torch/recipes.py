"""Training recipes of the reference models as PyTorch 2.x runs them, for tests/torch/measure.py.

checkpoint: `full` and `every:K` wrap each block (or K blocks) in one torch.utils.checkpoint call; `selective` wraps the attention core alone, as
Megatron-LM does; `ops:KIND,...` is selective activation checkpointing (create_selective_checkpoint_
contexts) with a policy that saves the outputs of the listed op kinds; `mlp` wraps each block's
MLP sublayer (norm, MLP, residual add: the segment between the block's last two cut tensors) in one
torch.utils.checkpoint call.

Every checkpoint call passes IMPL's use_reentrant and preserve_rng_state (measure.py's keys
checkpoint_impl and preserve_rng_state; both exist as keyword arguments in 1.13 and 2.x).
"""
import torch


# actsim's ops:LIST names -> the aten ops whose outputs selective activation checkpointing keeps
SAC_OPS = {
    "mm": ("mm",), "addmm": ("addmm",), "bmm": ("bmm",), "softmax": ("_softmax",),
    "layer_norm": ("native_layer_norm",), "gelu_tanh": ("gelu",), "silu": ("silu",),
}


# Selective activation checkpointing keeps the listed ops' outputs in its own cache, which the
# saved-tensor hooks never see: (wrapper index, caching mode) of every forward checkpoint call, so
# that --mode saved can count the cache too.
SAC_CACHES = []
RECORD_SAC = {"on": False}  # only --mode saved records: the list would keep the caches alive

# checkpoint.impl and checkpoint.preserve_rng_state: the keyword arguments of every checkpoint call
IMPL = {"use_reentrant": False, "preserve_rng_state": True}


def ckpt_kw():
    return dict(IMPL)


# --mode saved walks grad_fn._saved_* after forward. Under 1.13's non-reentrant checkpoint a saved
# tensor shows no _raw_saved_* hook, and reading it would run the recomputation: while WALKING is
# on, a checkpointed function raises RecomputeInWalk instead, and the walk skips that tensor.
WALKING = {"on": False}


class RecomputeInWalk(Exception):
    pass


def guarded(fn):
    def run(*args, **kwargs):
        if WALKING["on"]:
            raise RecomputeInWalk()
        return fn(*args, **kwargs)
    return run


# 1.13's non-reentrant checkpoint keeps the call's arguments in the closure of its unpack hook,
# which every SavedVariable of the call holds: autograd keeps them until the call's last saved
# tensor is released, yet no pack hook sees them (2.x saves them through _NoopSaveInputs, 1.13 and
# 2.x reentrant through ctx.save_for_backward, both hooked). --mode saved sets ON_CLOSURE_ARGS to
# count them.
ON_CLOSURE_ARGS = {"fn": None}


def checkpoint_call(fn, *args, **extra):
    import torch.utils.checkpoint as cp
    kw = ckpt_kw()
    kw.update(extra)
    closure_keeps_args = not kw["use_reentrant"] and not hasattr(cp, "_checkpoint_without_reentrant_generator")
    if closure_keeps_args and ON_CLOSURE_ARGS["fn"] is not None:
        ON_CLOSURE_ARGS["fn"]([a for a in args if torch.is_tensor(a)])
    return cp.checkpoint(guarded(fn), *args, **kw)


class Checkpointed(torch.nn.Module):
    """Blocks [first, last) run as one torch.utils.checkpoint call (IMPL's keyword arguments)."""

    def __init__(self, blocks, policy_fn=None, index=0):
        super().__init__()
        self.inner = torch.nn.ModuleList(blocks)
        self.policy_fn = policy_fn
        self.index = index

    def run(self, x, *args):
        for b in self.inner:
            x = b(x, *args)
        return x

    def forward(self, x, *args):
        import torch.utils.checkpoint as cp
        kw = {}
        if self.policy_fn is not None:
            def context_fn():
                ctx = cp.create_selective_checkpoint_contexts(self.policy_fn)
                if RECORD_SAC["on"]:
                    SAC_CACHES.append((self.index, ctx[0]))
                return ctx
            kw["context_fn"] = context_fn
        return checkpoint_call(self.run, x, *args, **kw)


def core_checkpointed_forward(models, attn):
    """`selective` (Megatron-LM): the attention core of the reference forward, from the scores to
    `@ v`, runs as one torch.utils.checkpoint call (checkpoint_call); the rest is unchanged.
    The lines mirror shared/reference/models.py (eager attention)."""
    import math
    import torch.nn.functional as F

    if isinstance(attn, models.CausalSelfAttention):
        def core(q, k, v, T):
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
            att = att.masked_fill(attn.bias[:, :, :T, :T] == 0, float("-inf"))
            att = F.softmax(att, dim=-1)
            att = attn.attn_dropout(att)
            return att @ v

        def forward(x):
            B, T, C = x.size()
            q, k, v = attn.c_attn(x).split(attn.n_embd, dim=2)
            k = k.view(B, T, attn.n_head, C // attn.n_head).transpose(1, 2)
            q = q.view(B, T, attn.n_head, C // attn.n_head).transpose(1, 2)
            v = v.view(B, T, attn.n_head, C // attn.n_head).transpose(1, 2)
            y = checkpoint_call(core, q, k, v, T)
            y = y.transpose(1, 2).contiguous().view(B, T, C)
            return attn.resid_dropout(attn.c_proj(y))
        return forward

    def core(q, k, v, T, hd, device):
        scores = q @ k.transpose(-2, -1) / math.sqrt(hd)
        mask = torch.triu(torch.ones(T, T, dtype=torch.bool, device=device), diagonal=1)
        scores = scores.masked_fill(mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        return probs @ v

    def forward(x, token_positions):
        B, T, _ = x.shape
        hd = attn.d // attn.h
        q = attn.q_proj(x).view(B, T, attn.h, hd).transpose(1, 2)
        k = attn.k_proj(x).view(B, T, attn.kvh, hd).transpose(1, 2)
        v = attn.v_proj(x).view(B, T, attn.kvh, hd).transpose(1, 2)
        q = attn.rope(q, token_positions)
        k = attn.rope(k, token_positions)
        k = models.repeat_kv(k, attn.h // attn.kvh)
        v = models.repeat_kv(v, attn.h // attn.kvh)
        out = checkpoint_call(core, q, k, v, T, hd, x.device)
        out = out.transpose(1, 2).contiguous().view(B, T, attn.d)
        return attn.o_proj(out)
    return forward


def mlp_checkpointed_forward(models, block):
    """`mlp`: the block's forward with its MLP sublayer (norm, MLP, residual add) as one
    torch.utils.checkpoint call (checkpoint_call), from the residual stream between attention
    and MLP to the block's output. The lines mirror shared/reference/models.py."""

    if isinstance(block, models.GPT2Block):
        def mlp_half(x):
            return x + block.mlp(block.ln_2(x))

        def forward(x):
            x = x + block.attn(block.ln_1(x))
            return checkpoint_call(mlp_half, x)
        return forward

    def mlp_half(x):
        return x + block.ffn(block.ffn_norm(x))

    def forward(x, token_positions):
        x = x + block.attn(block.attn_norm(x), token_positions)
        return checkpoint_call(mlp_half, x)
    return forward


def wrap_checkpoint(model, policy, models, impl="nonreentrant", preserve_rng_state=True):
    IMPL["use_reentrant"] = impl == "reentrant"
    IMPL["preserve_rng_state"] = preserve_rng_state
    if impl == "reentrant" and policy.startswith("ops:"):
        # torch.utils.checkpoint: "Passing context_fn or debug is only supported when use_reentrant=False."
        raise ValueError("checkpoint=%s needs checkpoint_impl=nonreentrant (selective activation checkpointing "
                         "passes context_fn, which use_reentrant=True refuses)" % policy)
    blocks = list(model.blocks)
    if policy == "mlp":
        for b in blocks:
            b.forward = mlp_checkpointed_forward(models, b)
        return
    if policy == "selective":
        for b in blocks:
            if b.attn.attention != "eager":
                raise ValueError("checkpoint=selective is lowered for eager attention")
            b.attn.forward = core_checkpointed_forward(models, b.attn)
        return
    policy_fn = None
    k = 1
    if policy.startswith("every:"):
        k = int(policy.split(":", 1)[1])
    elif policy.startswith("ops:"):
        from torch.utils.checkpoint import CheckpointPolicy
        kinds = policy[4:].split(",")
        unknown = [k for k in kinds if k not in SAC_OPS]
        if unknown:
            raise ValueError("ops:%s: no aten op known for %s (known: %s)" % (policy[4:], unknown, ", ".join(SAC_OPS)))
        keep = {a for kind in kinds for a in SAC_OPS[kind]}

        def policy_fn(ctx, op, *args, **kwargs):
            name = op._schema.name.split("::")[-1]
            return CheckpointPolicy.MUST_SAVE if name in keep else CheckpointPolicy.PREFER_RECOMPUTE
    elif policy != "full":
        raise ValueError("unknown checkpoint policy %r" % policy)
    model.blocks = torch.nn.ModuleList(
        Checkpointed(blocks[i:i + k], policy_fn, i // k) for i in range(0, len(blocks), k))
