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
  The kernel is PyTorch's own (aten._weight_int8pack_mm). FOOTGUN: it is vectorised only for bf16 inputs (fp32
  inputs take a scalar loop, 5-15x slower than fp32 itself), so each product reads its input rounded to bf16,
  multiplies by the int8 weight with unit scales and applies the fp32 scales and bias after: everything else in
  the model (layer norms, attention, the residual stream) stays fp32. The cost in agreement and val loss is
  measured in bench.py's sample section.
Both replace the modules in place (the token embedding wte, tied to lm_head, keeps its fp32 matrix for its
lookups). LoRA adapters are merged first. CUDA and MPS models are left as they are (int8 is CPU-only here).
"""

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


class Int8Linear(nn.Module):
    """An nn.Linear with a weight-only int8 weight: q (out, in) int8 and one fp32 scale per output row."""

    def __init__(self, linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach().float()  # (out, in)
        self.scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127  # (out,): each row's largest |w| maps to 127
        self.q = torch.round(w / self.scale[:, None]).clamp(-127, 127).to(torch.int8)  # (out, in)
        self.ones = torch.ones(self.out_features, dtype=torch.bfloat16)  # the kernel's scales: applied after, in fp32
        self.bias = None if linear.bias is None else linear.bias.detach().float()

    def forward(self, x):  # (..., in) -> (..., out), in x's dtype
        x2 = x.reshape(-1, self.in_features)  # (N, in)
        if x2.size(0) <= INT8_KERNEL_MAX_ROWS:  # decoding: the int8 kernel, on bf16 inputs (its fast path, see top)
            y = torch.ops.aten._weight_int8pack_mm(x2.to(torch.bfloat16), self.q, self.ones)  # (N, out) bf16
            # scales and bias in one fp32 kernel (bias + y * scale): a decode step runs 49 of these at 124M, and
            # each op saved is ~1 ms a token of the ~24 spent on AVX2
            y = (torch.addcmul(self.bias, y, self.scale) if self.bias is not None else y * self.scale).to(x.dtype)
        else:  # a prompt or a wide batch: the matrix dequantized once for the call, then one fp32 product
            y = x2 @ (self.q.to(x.dtype) * self.scale.to(x.dtype)[:, None]).t()  # (N, out)
            if self.bias is not None:
                y = y + self.bias.to(x.dtype)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weight-only"


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
