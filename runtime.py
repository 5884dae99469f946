"""
What every entry point shares at run time: the device, the distributed setup under torchrun, precision (autocast,
and what this CPU runs natively: cpu_facts), the CPU malloc setting, gradient sync and the FSDP helpers, the
learning-rate schedule, catching SIGINT/SIGTERM, and the metrics log. train.py, scaffold.py, sample.py, serve.py,
evaluate.py and bench.py import it; it imports no project module but errors.py, so every one of them can.
"""

import ctypes
import json
import math
import os
import signal
import sys
from contextlib import contextmanager, nullcontext

import torch
import torch.distributed as dist

from errors import InputError


# ---------------------------------------------------------------------------------------------------------------
# devices, distributed, precision

def pick_device(name="auto"):
    """auto: CUDA if there is a GPU, else Apple's MPS, else the CPU; any other name is taken as given, once it is
    known to exist here (a missing GPU is a one-line error, not torch's traceback at the first tensor)."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else ("mps" if torch.backends.mps.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"device '{name}': this machine has no CUDA GPU that torch {torch.__version__} can use: "
                         f"use cpu (or auto)")
    if name == "mps" and not torch.backends.mps.is_available():
        raise InputError("device 'mps': Apple's MPS backend is not available here: use cpu (or auto)")
    return name


def add_model_arguments(p, dtype=True):
    """The flags every command that loads a trained model shares (sample.py, serve.py, evaluate.py): which model,
    which of its checkpoints, on what device and in what precision."""
    p.add_argument("--model_name", default=None, help="model in checkpoints/ (default: the one trained last)")
    p.add_argument("--out_dir", default="checkpoints")
    p.add_argument("--checkpoint", choices=["latest", "best"], default="latest", help="ckpt.pt or best.pt")
    p.add_argument("--device", default="auto")
    if dtype:
        p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16", "int8"],
                       help="auto: bf16 autocast where train.py uses it (CUDA, CPUs with native bf16 matmuls), else "
                            "fp32; int8: weight-only int8 on the CPU (decode_weights.py), about 1.6x fp32's speed at batch 1")


def device_type_of(device):
    return "cuda" if device.startswith("cuda") else device


def setup_distributed(device="auto", backend="auto"):
    """(ddp, rank, world, device). Under torchrun (RANK set) this joins the process group: NCCL on CUDA, gloo on
    CPU, and each rank drives one device. Otherwise one process on pick_device(device)."""
    ddp = int(os.environ.get("RANK", -1)) != -1
    if ddp:
        if backend == "auto":
            backend = "nccl" if torch.cuda.is_available() and device != "cpu" else "gloo"
        dist.init_process_group(backend=backend)
        rank, world, local = dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))
        device = f"cuda:{local}" if backend == "nccl" else "cpu"
        if device.startswith("cuda"):
            torch.cuda.set_device(device)
        return ddp, rank, world, device
    return ddp, 0, 1, pick_device(device)


def pick_dtype(dtype, device_type):
    """The dtype to run in for a requested one (auto | float32 | bfloat16 | float16). auto: bf16 autocast on CUDA
    GPUs that have it (else fp16 with a grad scaler) and on CPUs with native bf16 matmuls (AVX512-BF16 / AMX:
    measured faster there at every shape we train; cpu_facts); fp32 elsewhere, where bf16 is emulated: a 1024x768x3072
    matmul on AVX2 kernels here runs at 0.8 GFLOP/s in bf16 against 136 in fp32."""
    if dtype != "auto":
        return dtype
    if device_type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    if device_type == "cpu" and cpu_facts()["native_bf16"]:
        return "bfloat16"
    return "float32"


# ---------------------------------------------------------------------------------------------------------------
# what this CPU can do: its vector flags, native bf16, its peak FLOP/s (bench.py prints them; pick_dtype's rule)

CPU_FLAGS_ENV = "GPTLAB_CPU_FLAGS"  # space-separated flags that replace /proc/cpuinfo's: act as another CPU (tests)
CPUFREQ_MAX = "/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq"  # kHz, where the kernel exposes it
FMA_UNITS = 2  # per core, assumed: modern x86 cores have 2 vector FMA pipes (a few Xeon Bronze/Silver have 1)
AMX_BF16_FLOPS_PER_CYCLE = 1024  # per core, Intel's figure: one TDPBF16PS (16x16x32 multiply-adds) per 16 cycles
ZEN_256_FAMILY = 0x19  # AMD Zen 3 / Zen 4: AVX-512 (Zen 4) runs as two halves on 256-bit FMA pipes


def _read(path):
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def parse_cpuinfo(text):
    """The first processor's model name, vendor, family, flags and "cpu MHz" from /proc/cpuinfo's text, and the
    physical cores: distinct (physical id, core id) pairs, since SMT siblings share one core's FMA pipes."""
    procs, cur = [], {}
    for line in (text or "").splitlines() + [""]:
        key, sep, value = line.partition(":")
        if sep:
            cur[key.strip()] = value.strip()
        elif cur:  # a blank line ends one processor's block
            procs.append(cur)
            cur = {}
    first = procs[0] if procs else {}
    cores = {(p.get("physical id"), p.get("core id")) for p in procs}
    has_ids = all("core id" in p for p in procs)
    try:
        mhz = float(first.get("cpu MHz", ""))
    except ValueError:
        mhz = None
    return {"model": first.get("model name", ""), "vendor": first.get("vendor_id", ""),
            "family": int(first["cpu family"]) if first.get("cpu family", "").isdigit() else None,
            "flags": set(first.get("flags", "").split()), "mhz": mhz,
            "physical_cores": (len(cores) if has_ids else len(procs)) or None}


def kernel_flags(flags, capability, onednn_isa):
    """The flags PyTorch's kernels may use: ATEN_CPU_CAPABILITY (torch's capability) and ONEDNN_MAX_CPU_ISA cap
    them below the hardware's, e.g. to run as an AVX2-only CPU on an AVX-512 one (then bf16 is emulated there
    too). An AVX2 or lower cap drops every AVX-512 and AMX flag; an AVX-512 cap without BF16 in its name drops
    avx512_bf16 and AMX; one without AMX drops AMX."""
    isa = (onednn_isa or "").upper()
    wide = {f for f in flags if f.startswith(("avx512", "amx"))}
    if capability in ("AVX2", "DEFAULT", "NO AVX") or (isa not in ("", "DEFAULT", "ALL")
                                                       and not isa.startswith(("AVX512", "AVX10", "AMX"))):
        return flags - wide
    if isa.startswith(("AVX512", "AVX10")) and "AMX" not in isa:
        flags = flags - {f for f in flags if f.startswith("amx")}
        if not any(s in isa for s in ("BF16", "FP16", "AVX10")):
            flags = flags - {"avx512_bf16"}
    return flags


def fp32_lanes(flags, vendor, family):
    """fp32 lanes of one FMA pipe, from the flags: 16 with AVX-512, 8 with AVX2 + FMA, None below (no estimate).
    The rule: AMD family 0x19 (Zen 3, Zen 4) counts 8 even with avx512f, because Zen 4 splits each 512-bit op
    over its 256-bit pipes (measured here: a 1024x768x3072 fp32 matmul reaches 71-82% of the 8-lane peak, which
    16 lanes would put at 36-41%). Other CPUs get their flags' width, an upper bound where the datapath is narrower
    (Zen 1's 128-bit pipes, Zen 5 laptops)."""
    if "avx512f" in flags and not (vendor == "AuthenticAMD" and family == ZEN_256_FAMILY):
        return 16
    if "avx2" in flags and "fma" in flags:
        return 8
    return None


def cpu_facts(cpuinfo_text=None, max_freq_text=None, env=None, capability=None, threads=None):
    """This CPU's model, vector flags, native bf16 (avx512_bf16 or amx_bf16, after kernel_flags' caps), the cores
    torch uses and the peak FLOP/s of fp32 and bf16 matmuls on them:
        fp32: cores x FMA_UNITS x fp32 lanes x 2 FLOPs (multiply + add) x clock
        bf16: with AMX-BF16, cores x AMX_BF16_FLOPS_PER_CYCLE x clock; with AVX512-BF16, twice fp32's (VDPBF16PS
              multiplies and adds two bf16 pairs into each fp32 lane); without either, none (bf16 is emulated)
    The clock is cpufreq's cpuinfo_max_freq where the kernel has it (the top boost clock: sustained all-core
    vector clocks are lower), else /proc/cpuinfo's "cpu MHz" (the clock when read; in a VM, the host's nominal
    clock, which boost can exceed). Each is an upper bound no real step reaches. Defaults read this machine
    (GPTLAB_CPU_FLAGS replaces the flags); tests give cpuinfo_text (then max_freq_text stands for the cpufreq file,
    None: absent), env, capability and threads."""
    env = os.environ if env is None else env
    if cpuinfo_text is None:
        cpuinfo_text, max_freq_text = _read("/proc/cpuinfo"), _read(CPUFREQ_MAX)
    capability = torch.backends.cpu.get_cpu_capability() if capability is None else capability
    threads = torch.get_num_threads() if threads is None else threads
    info = parse_cpuinfo(cpuinfo_text)
    flags = set(env[CPU_FLAGS_ENV].split()) if env.get(CPU_FLAGS_ENV) is not None else info["flags"]
    flags = kernel_flags(flags, capability, env.get("ONEDNN_MAX_CPU_ISA"))
    if flags or env.get(CPU_FLAGS_ENV) is not None:
        native_bf16 = bool(flags & {"avx512_bf16", "amx_bf16"})
    else:  # no /proc/cpuinfo (macOS, Windows): torch's own check
        native_bf16 = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    if max_freq_text and max_freq_text.strip().isdigit():
        ghz, clock_source = int(max_freq_text) / 1e6, "cpufreq cpuinfo_max_freq (top boost clock)"
    elif info["mhz"]:
        ghz, clock_source = info["mhz"] / 1e3, "/proc/cpuinfo 'cpu MHz' (clock when read; in a VM the host's nominal)"
    else:
        ghz, clock_source = None, "unknown"
    cores = min(threads, info["physical_cores"] or threads)
    lanes = fp32_lanes(flags, info["vendor"], info["family"])
    peak = {"float32": None, "bfloat16": None}
    if lanes and ghz:
        peak["float32"] = cores * FMA_UNITS * lanes * 2 * ghz * 1e9
        if "amx_bf16" in flags:
            peak["bfloat16"] = cores * AMX_BF16_FLOPS_PER_CYCLE * ghz * 1e9
        elif "avx512_bf16" in flags:
            peak["bfloat16"] = 2 * peak["float32"]
    return {"model": info["model"] or "unknown CPU", "vendor": info["vendor"], "family": info["family"],
            "capability": capability, "threads": threads, "cores": cores, "native_bf16": native_bf16,
            "flags": sorted(f for f in flags if f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")),
            "fma_units": FMA_UNITS, "lanes": lanes, "clock_ghz": ghz, "clock_source": clock_source, "peak_flops": peak}


def autocast_context(device_type, dtype):
    if dtype in ("float32", "int8") or device_type == "mps":  # int8: the int8 Linears cast for themselves
        return nullcontext()
    return torch.autocast(device_type=device_type, dtype={"bfloat16": torch.bfloat16, "float16": torch.float16}[dtype])


LARGE_BLOCK_MB = 8  # keep_freed_memory(map_large_blocks=True): a (B, T, C) fp32 activation from 2 x 1024 x 1024 up


def keep_freed_memory(map_large_blocks=False):
    """CPU training: ask glibc's malloc to keep the memory a step frees for the next step. Footgun: by default it
    hands every block over 32 MB (activations, logits) back to the kernel with munmap and asks for it again with
    mmap, and the kernel zero-fills each page on its first touch, every step: 15-20% of a GPT-2 124M step on this
    CPU (1.61 -> 1.37 s at batch 4 x 256, bf16). Taking all memory from the heap and never trimming it keeps the
    process at its peak size, which a training process reaches every step anyway. No-op where glibc is absent.

    map_large_blocks (activation checkpointing): every block of LARGE_BLOCK_MB or more gets a mapping of its own
    again, handed back when freed; smaller ones still come from the kept heap. Footgun: from the heap, a
    checkpointed GPT-2 124M step at batch 8 x 1024 (fp32) peaked at 3.3-4.8 GB of RSS for about 1 GB of live
    tensors: the (B, T, C) block inputs it keeps sit scattered through the heap between the freed temporaries of
    the forward, and the recompute's temporaries fit in none of the holes. On their own mappings: about 1.0 GB, at the
    same speed there (zero-filling is small next to a block-1024 step; +1-4% CPU time at batch 4 x 256).
    Safe to call again with the other setting: it applies to the blocks allocated after it."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold, m_mmap_max = -1, -3, -4  # glibc's mallopt parameter numbers (malloc.h)
        ok = bool(libc.mallopt(m_trim_threshold, 2 ** 31 - 1))
        if not map_large_blocks:
            return ok and bool(libc.mallopt(m_mmap_max, 0))
        # glibc's default count of mappings; a fixed threshold (no longer raised by each freed mapping, as by default)
        return ok and bool(libc.mallopt(m_mmap_max, 65536)) and bool(libc.mallopt(m_mmap_threshold, LARGE_BLOCK_MB << 20))
    except (OSError, AttributeError):  # another libc (musl): leave it be
        return False


@contextmanager
def grad_sync_off(model):
    """A micro-step that accumulates gradients locally without communicating: the all-reduce (DDP) or
    reduce-scatter (FSDP) then happens once, on the last micro-step of the optimizer step."""
    if hasattr(model, "no_sync"):  # DDP
        with model.no_sync():
            yield
        return
    model.set_requires_gradient_sync(False)  # FSDP2 (fully_shard) has a switch, not a context manager
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


# ---------------------------------------------------------------------------------------------------------------
# FSDP (fsdp: true under torchrun): parameters, gradients and optimizer state sharded across ranks

def shard_model(model, device_type, world):
    """Shard the model in place with FSDP2 (fully_shard) and move each rank's shard to its device: the whole model
    never has to fit on one device. Each block is its own unit (only one block's full weights exist at a time in
    forward and backward); the root unit keeps the embeddings, ln_f and the tied lm_head together, so the tie
    survives. Parameters become DTensors: build the optimizer after this."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    mesh = init_device_mesh(device_type, (world,))
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def full_model_state(model):
    """FSDP: the full (unsharded) state dict gathered onto rank 0's CPU; other ranks get {}. Collective: every rank
    must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def optimizer_state(model, optimizer, fsdp):
    """The optimizer state in torch's usual format (parameters numbered in group order) also under FSDP, so a
    checkpoint resumes with or without FSDP, on any number of ranks. FSDP: collective; None on ranks other than 0.
    Footgun: the torch.distributed.checkpoint helpers fill an empty optimizer state with a zero-lr step first, which
    changes Adam's step count: before the first step the (empty) state is taken as it is."""
    if not fsdp or not optimizer.state:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    named = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not named:
        return None
    ids = {name: i for i, name in enumerate(n for g in named["param_groups"] for n in g["params"])}
    return {"state": {ids[name]: s for name, s in named["state"].items()},
            "param_groups": [dict(g, params=[ids[n] for n in g["params"]]) for g in named["param_groups"]]}


def load_optimizer_state(model, optimizer, state, fsdp):
    """Inverse of optimizer_state. FSDP: every rank passes the full state and keeps its own shard of it."""
    if not fsdp or not state["state"]:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    name_of = {p: n for n, p in model.named_parameters()}
    names = [name_of[p] for g in optimizer.param_groups for p in g["params"]]  # the numbering of optimizer_state
    named = {"state": {names[i]: s for i, s in state["state"].items()},
             "param_groups": [dict(g, params=[names[i] for i in g["params"]]) for g in state["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, named, options=StateDictOptions(full_state_dict=True))


# ---------------------------------------------------------------------------------------------------------------
# the backprop step

def forward_backward(model, batches, use_loss_mask, ctx=nullcontext(), scaler=None, optimizer=None, ddp=False, world=1):
    """The micro-steps of one optimizer step. Leaves in .grad the gradient of sum(mask * ce) / sum(mask) taken over
    every target of every micro-batch on every rank, so gradient accumulation (and DDP) equals one big batch
    exactly, masked or not; returns that loss. Each micro-step backpropagates its *sum*; the division by the global
    count happens once at the end (a window with no mask-1 target adds 0 and no gradient)."""
    batches = iter(batches)
    batch = next(batches)
    loss_sum_total = count_total = 0.0
    while batch is not None:
        following = next(batches, None)  # look ahead: under DDP only the last micro-step all-reduces the grads
        with grad_sync_off(model) if (ddp and following is not None) else nullcontext():
            with ctx:
                # loss_only: the (B, T, V) logits are never built whole (model.ChunkedCrossEntropy), the largest
                # memory saving of a GPT-2 step
                # a packed batch (data.PackedLoader) also carries position and document ids (model.packed_inputs)
                packed = {"position_ids": batch[3], "doc_ids": batch[4]} if len(batch) == 5 else {}
                _, loss_sum = model(batch[0], batch[1], batch[2] if use_loss_mask else None, loss_reduction="sum",
                                    loss_only=True, **packed)
            (scaler.scale(loss_sum) if scaler is not None else loss_sum).backward()
        count_total = count_total + (batch[2].sum().float() if use_loss_mask else (batch[1] != -1).sum().float())
        loss_sum_total = loss_sum_total + loss_sum.detach().float()
        batch = following
    device = next(model.parameters()).device
    stats = torch.stack([torch.as_tensor(x, dtype=torch.float32, device=device).reshape(())
                         for x in (loss_sum_total, count_total)])  # (2,): a count may be a python float
    if ddp:
        dist.all_reduce(stats)
    count = stats[1].clamp(min=1.0)
    if scaler is not None and optimizer is not None:
        scaler.unscale_(optimizer)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    # DDP averaged the grads over ranks: undo that, and divide by the global count (one foreach kernel for them all)
    if grads:  # (the foreach kernel refuses an empty list)
        torch._foreach_mul_(grads, world / count.item())
    return (stats[0] / count).item()


# ---------------------------------------------------------------------------------------------------------------
# the schedule, signals

def get_lr(it, learning_rate, min_lr, warmup_iters, lr_decay_iters, decay_lr=True):
    """Linear warmup for warmup_iters, cosine decay to min_lr at lr_decay_iters, then min_lr."""
    if not decay_lr:
        return learning_rate
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it >= lr_decay_iters:
        return min_lr
    ratio = (it - warmup_iters) / max(1, lr_decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (learning_rate - min_lr)


@contextmanager
def stop_signals():
    """SIGINT / SIGTERM (Ctrl-C, a scheduler's preemption) do not kill a training loop mid-step: inside this
    context they are recorded in the yielded list, and the loop finishes its step, saves and exits. The old
    handlers come back on leaving."""
    received = []
    old = {s: signal.signal(s, lambda signum, frame: received.append(signum)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for s, h in old.items():
            signal.signal(s, h)



# ---------------------------------------------------------------------------------------------------------------
# metrics

class MetricsLog:
    """metrics.jsonl (one JSON object per log/eval line) and loss.png drawn from it when matplotlib is installed."""

    def __init__(self, folder, start_iter, enabled):
        self.path = os.path.join(folder, "metrics.jsonl")
        self.png = os.path.join(folder, "loss.png")
        self.enabled = enabled
        if enabled and os.path.exists(self.path):  # resume: drop what came after the checkpoint we go on from
            kept = [json.dumps(r) + "\n" for r in read_metrics(self.path) if r.get("iter", 0) <= start_iter]
            with open(self.path + ".tmp", "w") as f:
                f.writelines(kept)
            os.replace(self.path + ".tmp", self.path)

    def write(self, **record):
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def plot(self):
        if not self.enabled:
            return
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return
        rows = read_metrics(self.path)
        fig, ax = plt.subplots(figsize=(7, 4))
        tr = [(r["iter"], r["loss"]) for r in rows if "loss" in r]
        if tr:
            ax.plot(*zip(*tr), label="train (per step)", alpha=0.5, lw=0.8)
        for key, label in (("train_loss", "train (eval)"), ("val_loss", "val")):
            pts = [(r["iter"], r[key]) for r in rows if r.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", ms=3, label=label)
        ax.set_xlabel("iteration"), ax.set_ylabel("loss"), ax.legend(), ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(self.png + ".tmp.png", dpi=100)
        plt.close(fig)
        os.replace(self.png + ".tmp.png", self.png)


def read_metrics(path):
    """The records of a metrics.jsonl; a line cut short by a killed process is skipped."""
    rows = []
    with open(path) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return rows


def fmt_time(s):
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"

