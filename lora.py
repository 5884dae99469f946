"""
LoRA: low-rank adapters on the Linear layers of a GPT, the base weights frozen.

A LoRALinear IS an nn.Linear (a subclass) holding the same weight and bias tensors as the layer it replaces, so
the base keeps its state-dict keys (h.0.attn.c_attn.weight, .bias) and a checkpoint of the base loads into it
unchanged. Each adapter adds two small matrices next to them:
    y = x @ W.T + b + scaling * (dropout(x) @ A.T @ B.T)       A: (r, in), B: (out, r), scaling = alpha / r
B starts at zero, so a freshly adapted model computes exactly what the base computed.

An adapter may cover only a slice of the output features: q, k and v are the rows [0:C], [C:2C], [2C:3C] of the
fused c_attn. A slice adapter is named after its slice (c_attn.lora_A_q, c_attn.lora_B_q); an adapter over the
whole layer is plain c_attn.lora_A / c_attn.lora_B. The kwargs of apply_lora are stored in checkpoints as
ckpt["lora"] and replayed by checkpoint.build_model, so they must stay plain data.
"""

import math

import torch
import torch.nn as nn
from torch.nn import functional as F

from errors import InputError

# target name -> (module path inside a Block, which output rows: None = all, else the index of the C-wide slice)
TARGETS = {
    "q": ("attn.c_attn", 0),
    "k": ("attn.c_attn", 1),
    "v": ("attn.c_attn", 2),
    "c_attn": ("attn.c_attn", None),
    "attn.c_proj": ("attn.c_proj", None),
    "c_fc": ("mlp.c_fc", None),
    "mlp.c_proj": ("mlp.c_proj", None),
}
ALL_TARGETS = ["c_attn", "attn.c_proj", "c_fc", "mlp.c_proj"]  # what targets="all" means


class FrozenLinear(torch.autograd.Function):
    """F.linear(x, weight, bias) for a frozen weight and bias, computed in x's dtype, that keeps no copy of the
    weight for backward. Under bf16 autocast the stock F.linear casts the fp32 weight to bf16 and saves that copy
    until backward (autocast caches casts only of weights that require grad): one per adapted layer, 160 MB at
    GPT-2 124M. This saves the fp32 weight itself (already in memory) and casts it again in backward, where only
    the input's gradient is needed."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(weight)
        return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad_y):
        (weight,) = ctx.saved_tensors
        return grad_y @ weight.to(grad_y.dtype), None, None  # (B, T, out) @ (out, in) -> (B, T, in)


class LoRALinear(nn.Linear):
    def __init__(self, base, rank, alpha, dropout=0.0, slices=None):
        """Wrap `base` (an nn.Linear): its weight and bias tensors are shared, not copied.
        slices: {name: (start, end)} output rows to adapt, one adapter each; None = one adapter over all rows."""
        # nn.Linear.__init__ allocates (and initialises) a weight of its own: do that on the meta device (free)
        # and then put the base's own Parameters in its place
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        self.weight = base.weight
        self.bias = base.bias
        self.rank = rank
        self.scaling = alpha / rank
        self.lora_dropout = nn.Dropout(dropout)
        self.slices = dict(slices) if slices else {"": (0, base.out_features)}
        for name, (start, end) in self.slices.items():
            suffix = f"_{name}" if name else ""
            setattr(self, f"lora_A{suffix}", nn.Parameter(torch.empty(rank, self.in_features, dtype=base.weight.dtype,
                                                                      device=base.weight.device)))
            setattr(self, f"lora_B{suffix}", nn.Parameter(torch.empty(end - start, rank, dtype=base.weight.dtype,
                                                                      device=base.weight.device)))
        self.reset_lora()

    def adapters(self):
        """[(A, B, start, end), ...]: every adapter with the output rows it writes."""
        out = []
        for name, (start, end) in self.slices.items():
            suffix = f"_{name}" if name else ""
            out.append((getattr(self, f"lora_A{suffix}"), getattr(self, f"lora_B{suffix}"), start, end))
        return out

    def reset_lora(self):
        """Fresh adapters: A as nn.Linear initialises its weight (kaiming-uniform, a=sqrt(5); peft does the same),
        B zero, so the adapter starts as an exact no-op but with a non-zero gradient for B. A merged adapter stays
        folded into the weight for good (XGBLoRA's merge-then-reinit): the fresh one is live, so merged = False."""
        with torch.no_grad():
            for A, B, _, _ in self.adapters():
                nn.init.kaiming_uniform_(A, a=math.sqrt(5))
                nn.init.zeros_(B)
        self.merged = False  # True while the adapters are folded into self.weight (forward then skips them)

    def delta_weight(self, A, B):
        """scaling * B @ A: the (rows, in) change this adapter makes to its slice of the weight."""
        return (B.float() @ A.float()) * self.scaling

    def forward(self, x):
        device = x.device.type
        if torch.is_autocast_enabled(device):  # cast once, here: the base and the adapters share the copy (else
            x = x.to(torch.get_autocast_dtype(device))  # autocast casts x for each matmul and saves every copy)
        if self.weight.requires_grad or (self.bias is not None and self.bias.requires_grad):
            y = F.linear(x, self.weight, self.bias)  # (B, T, out)
        else:
            y = FrozenLinear.apply(x, self.weight, self.bias)  # (B, T, out), the usual case: the base is frozen
        if self.merged:
            return y
        h = self.lora_dropout(x)
        for A, B, start, end in self.adapters():
            delta = (h @ A.t()) @ B.t() * self.scaling  # (B, T, r) -> (B, T, end - start): never builds B @ A
            if end - start != self.out_features:
                # zero-pad into the slice rather than write y[..., start:end] in place: out-of-place is always
                # safe for autograd
                delta = F.pad(delta, (start, self.out_features - end))  # (B, T, out)
            y = y + delta
        return y

    @torch.no_grad()
    def merge(self):
        """Fold the adapters into the weight (W[slice] += scaling * B @ A): inference at plain-Linear speed.
        Footgun: the weight is the base model's own tensor (shared, not copied), so merging changes the base."""
        if self.merged:
            return
        for A, B, start, end in self.adapters():
            self.weight[start:end] += self.delta_weight(A, B).to(self.weight.dtype)
        self.merged = True

    @torch.no_grad()
    def unmerge(self):
        """Subtract the adapters back out of the weight (exact up to float rounding)."""
        if not self.merged:
            return
        for A, B, start, end in self.adapters():
            self.weight[start:end] -= self.delta_weight(A, B).to(self.weight.dtype)
        self.merged = False

    def to_linear(self):
        """A plain nn.Linear with this layer's current weight and bias (merge first to keep the adapters)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight = self.weight
        linear.bias = self.bias
        return linear

    def extra_repr(self):
        return f"{super().extra_repr()}, rank={self.rank}, scaling={self.scaling}, slices={self.slices}"


def _is_lora_key(name):
    return name.rsplit(".", 1)[-1].startswith(("lora_A", "lora_B"))


def _check_targets(targets):
    """targets as given (a list, "all", or a comma-separated string) -> a list of valid target names."""
    if isinstance(targets, str):
        targets = ALL_TARGETS if targets == "all" else [t.strip() for t in targets.split(",") if t.strip()]
    targets = list(targets)
    if not targets:
        raise InputError(f"lora targets are empty: name some of {', '.join(TARGETS)} (or 'all')")
    for t in targets:
        if t not in TARGETS:
            hint = " ('c_proj' is ambiguous: say attn.c_proj or mlp.c_proj)" if t == "c_proj" else ""
            raise InputError(f"unknown lora target '{t}'{hint}: valid targets are {', '.join(TARGETS)} or 'all'")
    if "c_attn" in targets and any(t in targets for t in ("q", "k", "v")):
        raise InputError("lora targets name both c_attn and q/k/v, which are slices of c_attn: use one or the other")
    return targets


def apply_lora(model, rank, alpha, dropout=0.0, targets="all", layers=None):
    """Replace the target Linears of model.transformer.h[i] (every layer, or the indices in `layers`) by LoRALinear
    and freeze every other parameter. Returns the names of the adapted modules (h.0.attn.c_attn, ...)."""
    targets = _check_targets(targets)
    if rank < 1 or alpha <= 0 or not 0 <= dropout < 1:
        raise InputError(f"lora needs rank >= 1, alpha > 0 and dropout in [0, 1): got rank={rank}, alpha={alpha}, "
                         f"dropout={dropout}")
    blocks = model.transformer.h
    layers = list(range(len(blocks))) if layers is None else sorted(set(layers))
    if not layers:
        raise InputError("lora layers is an empty list: give layer indices, or None for every layer")
    for i in layers:
        if not 0 <= i < len(blocks):
            raise InputError(f"lora layer {i} does not exist: the model has layers 0..{len(blocks) - 1}")
    # group the targets by module: q and v both land on attn.c_attn, as two slices of one LoRALinear
    wanted = {}
    for t in targets:
        path, piece = TARGETS[t]
        wanted.setdefault(path, {})
        if piece is not None:
            wanted[path][t] = piece
    plan = []  # (parent module, attribute, the Linear, slices, name): all checked before anything changes
    for i in layers:
        for path, pieces in wanted.items():
            parent_name, attr = path.split(".")
            parent = getattr(blocks[i], parent_name)
            base = getattr(parent, attr)
            if isinstance(base, LoRALinear):
                raise ValueError(f"h.{i}.{path} already has LoRA adapters: call remove_lora(model) first")
            C = base.out_features // 3  # q, k, v slices of c_attn (only used when pieces names some)
            slices = {name: (k * C, (k + 1) * C) for name, k in pieces.items()} or None
            plan.append((parent, attr, base, slices, f"h.{i}.{path}"))
    for name, p in model.named_parameters():
        if not _is_lora_key(name):
            p.requires_grad = False  # the base is frozen: only adapters (these, and any placed before) train
    for parent, attr, base, slices, _ in plan:
        setattr(parent, attr, LoRALinear(base, rank, alpha, dropout, slices))
    adapted = [name for *_, name in plan]
    return adapted


def lora_layers(model):
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def lora_state_dict(model):
    """Only the adapter tensors ({'transformer.h.0.attn.c_attn.lora_A': ..., ...}): what an adapters-only
    checkpoint stores."""
    return {k: v for k, v in model.state_dict().items() if _is_lora_key(k)}


def count_parameters(model):
    """(trainable, total) parameter counts, each tensor counted once (the tied wte/lm_head matrix once)."""
    params = list(model.parameters())  # parameters() already skips repeats of a shared tensor
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def parameter_summary(model):
    """One printable line: 'trainable params: 294,912 of 124,734,720 (0.24%)'."""
    trainable, total = count_parameters(model)
    return f"trainable params: {trainable:,} of {total:,} ({100.0 * trainable / max(total, 1):.2f}%)"


def merge_lora(model):
    for m in lora_layers(model):
        m.merge()


def unmerge_lora(model):
    for m in lora_layers(model):
        m.unmerge()


def reinit_lora(model):
    """Fresh adapters everywhere (A kaiming-uniform, B zero). XGBLoRA calls merge_lora then reinit_lora to fold
    one booster into the base and start the next one. The optimizer's state (AdamW moments) for the adapters
    still describes the old ones: the caller should reset it too."""
    for m in lora_layers(model):
        m.reset_lora()


def remove_lora(model):
    """Merge every adapter and turn each LoRALinear back into a plain nn.Linear, in place: the model is then a
    plain GPT, state dict and all (for export, --merge_lora, or a new run on a LoRA model's effective weights).
    Like a fresh GPT, every parameter requires grad again: apply_lora froze the base, and a full fine-tune
    started from the merged model must not silently train nothing."""
    for module in list(model.modules()):
        for attr, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                child.merge()
                setattr(module, attr, child.to_linear())
    for p in model.parameters():
        p.requires_grad = True
    return model
