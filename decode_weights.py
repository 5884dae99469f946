"""
Weights laid out for decoding on the CPU: sample.py, serve.py and the engine, never training.

    model = for_decoding(model, dtype="int8", max_batch_size=8)   # or "float32"; any other dtype: left as it is

A decode step at batch 1 multiplies one row by every weight matrix: it reads every weight once per token, and
the CPU's memory bandwidth, not its arithmetic, sets the speed. Two layouts read faster than nn.Linear's:
- float32: each Linear's weight repacked once into oneDNN's blocked layout (the layout PyTorch's own compiler
  prepacks CPU linears into). The same numbers and the same product, to the last bits of the sum's order; a
  (1, C) row reads it 1.1-1.4x faster than nn.Linear's row-major weight, and a batch of 8 rows (engine.py) costs
  little more than one, where nn.Linear's small-M product costs about twice one row (bench.py, AVX2 and
  AVX-512 kernels alike).
- int8: weight-only int8, one scale per output channel (w ~ q * s, q in [-127, 127]): a quarter of fp32's bytes.
  Two of PyTorch's own int8 kernels, each where it reads faster (bench.py, AVX2):
  - aten._weight_int8pack_mm for the matrices in the blocks. FOOTGUN: it is vectorised only for bf16 inputs (fp32
    inputs take a scalar loop, 5-15x slower than fp32 itself), so each product reads its input rounded to bf16,
    multiplies by the int8 weight with unit scales and applies the fp32 scales and bias after.
  - fbgemm's int8 GEMM (x86 builds) for matrices of FBGEMM_MIN_WEIGHTS and more: at 124M the lm_head, a third of
    the weights, which it reads 2-3x faster. fbgemm also rounds its input to 7-bit integers; laid out by
    int8_input_rows, the input loses nothing to that rounding and keeps ~14 bits, so its numbers are the int8 weights'
    product with an fp32 input to ~1e-4 of a row's largest value, and a row's numbers do not depend on its batch.
  Everything else in the model (layer norms, attention, the residual stream) stays fp32. The cost in agreement
  and val loss is measured in bench.py's int8 section.
Both replace the modules in place (the token embedding wte, tied to lm_head, keeps its fp32 matrix for its
lookups). LoRA adapters are merged first. CUDA and MPS models are left as they are (int8 is CPU-only here).
"""

import functools
import warnings

import torch
import torch.nn as nn

import lora
from errors import InputError


class PackedLinear(nn.Module):
    """An nn.Linear whose fp32 weight lives in oneDNN's blocked layout (an opaque tensor: forward only)."""

    def __init__(self, linear, max_batch_size):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # the batch size is oneDNN's hint for the blocking; any number of rows works, the hinted one best
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach().float(), max_batch_size)
        self.bias = None if linear.bias is None else linear.bias.detach().float()

    def forward(self, x):  # (..., in) -> (..., out)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, fp32 oneDNN-packed"


# The int8 kernel's time grows with every row it multiplies (at 3072 x 768: 0.15 ms for 1 row, 0.6 ms for 8, 3.2 ms
# for 32): past a batch of decode rows, dequantizing the matrix once per call and one fp32 product is faster. So
# a decode step of up to 16 rows runs on the int8 kernel, a prompt (prefill) on the dequantized weights.
INT8_KERNEL_MAX_ROWS = 16
# fbgemm's path costs ~10 more small ops a call (~0.1 ms at batch 1 on AVX2), which its faster read of the matrix
# repays from a few million weights up: at 124M the lm_head (38.6M) gains ~3 ms a token, the 2.4M-weight MLP
# matrices would lose a little.
FBGEMM_MIN_WEIGHTS = 4_000_000


def int8_input_rows(x):
    """fbgemm's int8 GEMM rounds its input (M, K) to 7-bit integers on one grid for the whole call, spanning the
    input's min and max. Fed these rows, the rounding is exact and every row keeps ~14 bits, whatever its batch:
    each row x is scaled by s = max|x| / 62 into u = x / s in [-62, 62] and sent as two rows, u itself (the kernel
    rounds it to hi = round(u)) and lo = (u - hi) * 126 (rounded by the kernel too); a last row [-64, 63, 0, ...]
    pins the grid to the integers themselves (min -64, max 63: scale 1, zero point 64), so no other row moves it.
    Then x @ W.t() = s * (y_hi + y_lo / 126) to ~1e-4 of max|x|, with one read of W for the 2M + 1 rows.
    Returns (rows (2M + 1, K), s (M, 1))."""
    s = x.abs().amax(dim=1, keepdim=True).div_(62).clamp_(min=1e-30)  # (M, 1); 62, not 63: u's rounding stays inside
    u = x / s  # (M, K), |u| <= 62
    lo = (u - u.round()).mul_(126)  # (M, K), |lo| <= 63
    grid = x.new_zeros(1, x.size(1))
    grid[0, 0], grid[0, -1] = -64, 63
    return torch.cat([u, lo, grid]), s


class Int8Linear(nn.Module):
    """An nn.Linear with a weight-only int8 weight: q (out, in) int8 and one fp32 scale per output row, multiplied
    by kernel "int8pack" (aten._weight_int8pack_mm) or "fbgemm" (fbgemm's int8 GEMM); None picks by the matrix's
    size (FBGEMM_MIN_WEIGHTS)."""

    def __init__(self, linear, kernel=None):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach().float()  # (out, in)
        self.scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127  # (out,): each row's largest |w| maps to 127
        self.q = torch.round(w / self.scale[:, None]).clamp(-127, 127).to(torch.int8)  # (out, in)
        self.ones = torch.ones(self.out_features, dtype=torch.bfloat16)  # the kernel's scales: applied after, in fp32
        self.bias = None if linear.bias is None else linear.bias.detach().float()
        if kernel is None:
            big = self.q.numel() >= FBGEMM_MIN_WEIGHTS
            kernel = "fbgemm" if big and fbgemm_available() else "int8pack"
        self.fbgemm = fbgemm_pack(self.q, self.scale) if kernel == "fbgemm" else None
        if self.fbgemm is not None:  # fbgemm packs its own copy of q: keeping q too would hold it twice (38.6 MB)
            self.q = self.ones = None

    @property
    def kernel(self):
        return "int8pack" if self.fbgemm is None else "fbgemm"

    def forward(self, x):  # (..., in) -> (..., out), in x's dtype
        x2 = x.reshape(-1, self.in_features).float()  # (N, in)
        if self.fbgemm is not None:
            rows, s = int8_input_rows(x2)  # (2N + 1, in), (N, 1)
            y = torch.ops.quantized.linear_dynamic(rows, self.fbgemm, True)  # (2N + 1, out), scales applied
            n = x2.size(0)
            y = torch.add(y[:n], y[n:2 * n], alpha=1 / 126)  # (N, out): the input's product, over s
            y = torch.addcmul(self.bias, y, s) if self.bias is not None else y * s
        elif x2.size(0) <= INT8_KERNEL_MAX_ROWS:  # decoding: the int8 kernel, on bf16 inputs (its fast path, see top)
            y = torch.ops.aten._weight_int8pack_mm(x2.to(torch.bfloat16), self.q, self.ones)  # (N, out) bf16
            # scales and bias in one fp32 kernel (bias + y * scale): a decode step runs 49 of these at 124M, and
            # each op saved is ~1 ms a token of the ~24 spent on AVX2
            y = torch.addcmul(self.bias, y, self.scale) if self.bias is not None else y * self.scale
        else:  # a prompt or a wide batch: the matrix dequantized once for the call, then one fp32 product
            y = x2 @ (self.q.float() * self.scale[:, None]).t()  # (N, out)
            if self.bias is not None:
                y = y + self.bias
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weight-only ({self.kernel})"


def fbgemm_pack(q, scale):
    """q (out, in) int8 with per-row scales, packed for fbgemm's int8 GEMM (bias None: added after, in fp32)."""
    # FOOTGUN: PyTorch deprecates its quantized tensors (a UserWarning on creating one); this one lives only as
    # long as the packing, and fbgemm_available() turns the kernel off where the API is gone
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        zero = torch.zeros(q.size(0), dtype=torch.long)
        qw = torch._make_per_channel_quantized_tensor(q, scale.double(), zero, 0)
    return torch.ops.quantized.linear_prepack(qw, None)


@functools.cache
def fbgemm_available():
    """fbgemm's int8 GEMM exists in this torch build (x86 wheels) and reads int8_input_rows exactly: checked on
    integer inputs once a process. ARM builds (qnnpack ignores the 7-bit range) and builds without the
    quantized API use aten._weight_int8pack_mm for every matrix."""
    if not {"x86", "fbgemm"} & set(torch.backends.quantized.supported_engines):
        return False
    try:
        g = torch.Generator().manual_seed(0)
        q = torch.randint(-127, 128, (24, 40), generator=g, dtype=torch.int8)
        x = torch.randint(-62, 63, (3, 40), generator=g).float()
        x[:, 0] = 62  # s = 1: the rows are sent as they are, and the product is exact in fp32
        y = torch.ops.quantized.linear_dynamic(int8_input_rows(x)[0], fbgemm_pack(q, torch.ones(24)), True)
        return torch.equal(y[:3], x @ q.float().t()) and not y[3:6].any()
    except (RuntimeError, AttributeError):
        return False


def packing_available():
    """oneDNN's packed fp32 linear exists in this torch build (x86 and most aarch64 builds)."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        PackedLinear(nn.Linear(8, 8), 1)(torch.zeros(1, 8))
        return True
    except RuntimeError:
        return False


def for_decoding(model, dtype, max_batch_size=1):
    """The model (changed in place) with its Linears in the decode layout for `dtype` on the CPU: float32 packed,
    int8 quantized; any other dtype or device: unchanged. An inference model from then on (no gradients, no
    state_dict of the replaced weights)."""
    device_type = next(model.parameters()).device.type
    if dtype == "int8" and device_type != "cpu":
        raise InputError(f"--dtype int8 runs on the CPU only (the model is on {device_type}): use bfloat16 there")
    if device_type != "cpu" or dtype not in ("float32", "int8") or (dtype == "float32" and not packing_available()):
        return model
    if lora.lora_layers(model):
        model = lora.remove_lora(model)  # W + B @ A merged: one matrix to pack
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, Int8Linear(child) if dtype == "int8" else PackedLinear(child, max_batch_size))
    return model.eval()
