"""
MeZO: a zeroth-order optimizer step that trains with about the memory of inference (Malladi et al., 2023).

One step, on a batch, for the parameters that require grad (all of them for full fine-tuning, the adapters for
LoRA / XGBLoRA):
    draw a seed; z ~ N(0, I) with the shape of every trainable parameter, regenerated from the seed when needed
    p += eps * z         -> loss+          (eval mode, no autograd graph)
    p -= 2 * eps * z     -> loss-
    restore p
    projected_grad = (loss+ - loss-) / (2 * eps)
    p -= lr * (projected_grad * z + weight_decay * p)       (no decay on biases and norms: dim < 2)
No gradient, no optimizer state, no activations kept for a backward pass, and z is never stored: each pass over
the parameters re-seeds one torch.Generator and redraws z parameter by parameter, in chunks of CHUNK elements
(the chunks keep the temporaries of a pass small next to the forward's own).

Exact restore. Doing the inverse arithmetic (p + eps*z - 2*eps*z + eps*z) does NOT give p back in floating
point: each add rounds, and about half the elements come back one unit-in-the-last-place (ulp) off. Keeping a
copy of every parameter would double the parameter memory, which is what MeZO is meant to avoid. So the first
pass, which still sees the original value x of every element, also computes what the naive restore r would give
and records the difference of their bit patterns, bits(x) - bits(r), as one int8 per element: it is 0 or +-1
ulp for ~99% of elements and fits int8 for all but ~1 in 10,000 (elements much smaller than eps*z, whose low
bits the perturbation wipes out); those few keep their original value in a short list. Restoring then redoes
the naive arithmetic and adds the recorded correction to the bits: bit-for-bit the original, for 1 byte per
trainable element (a quarter of fp32 parameter memory, well inside MeZO's "inference memory" budget).
"""

import math

import torch
import torch.distributed as dist

from errors import InputError
from model import packed_inputs

CHUNK = 1 << 21  # elements per slice of a parameter in each pass: 8 MiB fp32 buffers, few enough op launches
_INT_VIEW = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}  # same-size integer view of a float
_ESCAPE = -128  # int8 correction meaning "too far off for int8: take the saved original value"


def trainable_parameters(model):
    """The parameters MeZO perturbs, in a fixed order (each shared tensor once: wte / lm_head count once)."""
    return [p for p in model.parameters() if p.requires_grad]


def _buffers(params, *dtypes):
    """Work buffers of CHUNK elements, one per dtype given (None = the parameters' dtype), reused by every chunk of
    a pass. Why not fresh temporaries per chunk: thousands of MiB-sized allocations interleaved with the few small
    tensors a pass keeps fragment the C heap, which then grows (measured: +100-200 MiB of RSS over one pass of a
    124M model), and that is exactly the memory MeZO exists to save."""
    dtype, device = params[0].dtype, params[0].device
    if any(p.dtype != dtype or p.device != device for p in params):
        raise ValueError("MeZO needs every trainable parameter in one dtype on one device")
    n = min(CHUNK, max(p.numel() for p in params))
    return [torch.empty(n, dtype=d or dtype, device=device) for d in dtypes]


def _noise(params, seed, z):
    """Yield (index of p, offset, flat slice x of p, z) for every CHUNK-sized slice of every parameter, in order,
    with z (a view of the buffer `z`) drawn from one generator seeded with `seed`: another pass with the same seed
    yields exactly the same z. x is a view into p's own storage: writing x writes p."""
    gen = torch.Generator(device=params[0].device)
    gen.manual_seed(seed)
    for i, p in enumerate(params):
        flat = p.data.view(-1)  # parameters are contiguous
        for start in range(0, flat.numel(), CHUNK):
            x = flat[start:start + CHUNK]
            torch.randn(x.numel(), generator=gen, out=z[:x.numel()])
            yield i, start, x, z[:x.numel()]


@torch.no_grad()
def perturb_first(params, seed, eps):
    """p += eps * z for every trainable parameter, recording what is needed to restore p exactly later.
    Returns the record: int8 corrections (one tensor per parameter) and {(param, offset): original values} for
    the few elements int8 cannot reach."""
    corrections = [torch.empty(p.numel(), dtype=torch.int8, device=p.device) for p in params]
    far = {}
    int_view = _INT_VIEW[params[0].element_size()]
    zb, plus_b, rest_b, diff_b, tmp_b, far_b, hi_b = _buffers(params, None, None, None, torch.int64, torch.int64,
                                                             torch.bool, torch.bool)
    for i, start, x, z in _noise(params, seed, zb):
        n = x.numel()
        plus, rest, diff, tmp, too_far, hi = plus_b[:n], rest_b[:n], diff_b[:n], tmp_b[:n], far_b[:n], hi_b[:n]
        d = z.mul_(eps)  # eps * z, computed by the same expressions in every pass, so every pass rounds alike
        torch.add(x, d, out=plus)
        torch.mul(d, 2, out=rest)  # exact (a power of two)
        torch.sub(plus, rest, out=rest)
        rest.add_(d)  # what the naive inverse arithmetic will give back after loss-
        diff.copy_(x.view(int_view))  # bit patterns as int64: room for their difference
        tmp.copy_(rest.view(int_view))
        diff.sub_(tmp)
        torch.lt(diff, -127, out=too_far)
        torch.gt(diff, 127, out=hi)
        too_far.logical_or_(hi)
        if too_far.any():
            far[(i, start)] = x[too_far].clone()
            diff.masked_fill_(too_far, _ESCAPE)
        corrections[i][start:start + n].copy_(diff)  # int64 -> int8: every value is in [-128, 127]
        x.copy_(plus)
    return corrections, far


@torch.no_grad()
def perturb_second(params, seed, eps):
    """p -= 2 * eps * z (from p + eps * z to p - eps * z), with exactly the operations perturb_first predicted."""
    zb, = _buffers(params, None)
    for _, _, x, z in _noise(params, seed, zb):
        x.sub_(z.mul_(eps).mul_(2))


@torch.no_grad()
def restore_and_update(params, seed, eps, record, lr=0.0, projected_grad=0.0, weight_decay=0.0):
    """Undo the perturbation bit-for-bit, then (unless lr is 0) take the step
    p -= lr * (projected_grad * z + weight_decay * p), with weight decay only on dim >= 2 tensors."""
    corrections, far = record
    int_view = _INT_VIEW[params[0].element_size()]
    zb, d_b, bits_b = _buffers(params, None, None, torch.int64)
    for i, start, x, z in _noise(params, seed, zb):
        n = x.numel()
        d, bits = d_b[:n], bits_b[:n]
        x.add_(torch.mul(z, eps, out=d))  # the naive restore: within a few ulps of the original
        corr = corrections[i][start:start + n]
        bits.copy_(x.view(int_view)).add_(corr)  # exact: bits(original), inside the float's integer range
        x.view(int_view).copy_(bits)
        if (i, start) in far:
            x[corr == _ESCAPE] = far[(i, start)]
        if lr != 0.0:
            step = z.mul_(projected_grad)  # the formula's operations, in the formula's order
            if weight_decay and params[i].dim() >= 2:  # no decay on biases and norms, as the AdamW groups
                step.add_(torch.mul(x, weight_decay, out=d))
            x.sub_(step.mul_(lr))


def _weights_changed():
    """Call after changing weights in place. Inside an autocast region (train.py runs the whole step in one) torch
    caches the bf16/fp16 copy of every weight at its first use and serves that copy until the region ends: without
    this, the loss- forward would silently reuse the +eps*z weights' copies (and the caller the -eps*z ones)."""
    torch.clear_autocast_cache()


def _loss(model, batch, use_loss_mask):
    """(sum of per-target losses, number of counted targets) on the batch, as floats."""
    X, Y = batch[0], batch[1]
    M = batch[2] if use_loss_mask else None
    _, loss_sum = model(X, Y, M, loss_reduction="sum", **packed_inputs(batch))
    count = M.sum() if M is not None else (Y != -1).sum()  # padding of packed rows has target -1
    return torch.stack([loss_sum.detach().float(), count.float().to(loss_sum.device)])


@torch.no_grad()
def zo_step(model, batch, lr, eps, weight_decay=0.0, seed=0, use_loss_mask=False):
    """One MeZO step on `batch` ((X, Y), (X, Y, M), or data.PackedLoader's (X, Y, M, P, D)). Returns the loss (mean
    of loss+ and loss-, an estimate of the loss at p) as a float; a non-finite loss leaves the parameters exactly
    as they were (no update).
    Under torch.distributed every rank uses the same seed (so the same z) and the losses are summed over ranks
    before the update, so all ranks take the same step and stay identical."""
    if eps <= 0:
        raise InputError(f"MeZO needs eps > 0 (zo_eps), got {eps}")
    if use_loss_mask and len(batch) < 3:
        raise InputError("use_loss_mask is on but the batch has no mask: the loader must be built with use_mask")
    params = trainable_parameters(model)
    if not params:
        raise InputError("MeZO found no trainable parameters (requires_grad is off everywhere)")
    was_training = model.training
    model.eval()  # no dropout: loss+ and loss- must see the same network apart from the perturbation
    record = perturb_first(params, seed, eps)
    at_minus = False
    try:
        _weights_changed()
        plus = _loss(model, batch, use_loss_mask)
        perturb_second(params, seed, eps)
        at_minus = True
        _weights_changed()
        minus = _loss(model, batch, use_loss_mask)
    except BaseException:  # (Ctrl-C included) never leave the weights perturbed
        if not at_minus:
            perturb_second(params, seed, eps)
        restore_and_update(params, seed, eps, record)
        _weights_changed()
        model.train(was_training)
        raise
    stats = torch.stack([plus[0], minus[0], plus[1]])  # (3,) sum+, sum-, target count
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(stats)
    sum_plus, sum_minus, count = stats.tolist()
    loss_plus, loss_minus = sum_plus / max(count, 1.0), sum_minus / max(count, 1.0)
    ok = math.isfinite(loss_plus) and math.isfinite(loss_minus)
    projected_grad = (loss_plus - loss_minus) / (2 * eps) if ok else 0.0
    restore_and_update(params, seed, eps, record, lr=lr if ok else 0.0, projected_grad=projected_grad,
                       weight_decay=weight_decay)
    _weights_changed()
    model.train(was_training)
    return 0.5 * (loss_plus + loss_minus)
