"""
Benchmarks: training, sampling, data preparation, data loading and conversion, each against a reference timed in
the same run, printed as a markdown table.

    python bench.py                                   # every CPU section (each prints the seconds it took)
    python bench.py --sections train_tiny,loader      # some of them: names in SECTIONS below
    python bench.py --threads 1 --json bench.json     # one thread (steadier on a shared machine); raw figures too
    python bench.py --quick                           # fewer repeats and tokens: a smoke run, noisier figures
    python bench.py --sections train_gpu              # on a CUDA GPU: 124M at block 1024, bf16 + compile, MFU
    python bench.py --sections classic --nanogpt_dir path/to/nanoGPT   # nanoGPT's classic CPU run, its train.py too
    python bench.py --all_dtypes                      # time bf16 candidates even where this CPU only emulates bf16

Machines are noisy (other jobs share the cores), so no figure is compared with one taken at another time: every
row times our code and its reference in the same process, round-robin (repeat r runs each candidate once before
repeat r + 1 starts, so a burst of load hits all alike), and compares the medians. "Fastest setting" means each
side is timed in fp32 and under bf16 autocast (and transformers also with its eager attention) and the fastest
of its own settings is the one compared. Peak memory is measured in a fresh process per figure (the peak RSS
above the process's size after its imports; torch.cuda.max_memory_allocated on a GPU), because a process's
high-water mark never goes down. On a machine with more runnable processes than cores, 2 threads per process
collapse (each op waits for a descheduled thread: 10x slower): use --threads 1 there; the load average is printed.

Ceilings: the training and sampling sections also time our step's unavoidable arithmetic alone: its matrix
products and GPT-2's own kernels (tanh GELU, layer norms, the loss's log-softmax), recorded at PyTorch's dispatch
level and replayed on random inputs with nothing in between, plus the AdamW update for training. That is about
the most any PyTorch code doing the same arithmetic can reach here, which tells a target our overhead misses from
one no implementation could meet.

The CPU: the header says what it is (runtime.cpu_facts: model, cores, vector flags, native bf16 or not) and its
peak FLOP/s (cores x FMA units x fp32 lanes x 2 x clock, each factor and the clock's source stated), and every
training row adds its achieved FLOP/s (GPT.estimate_mfu's 6N + attention per token) as a share of that peak for
the dtype it ran in: the headroom. On a CPU without native bf16 (no avx512_bf16 / amx_bf16: AVX2-only CPUs) bf16
matmuls are emulated, about 100x slower than fp32, so the bf16 candidates are skipped there, and the run says so
(--all_dtypes times them anyway).

The references: transformers' GPT2LMHeadModel at the same shape (training step and generate), raw tiktoken
encode_ordinary_batch over the same text (preparation), the batches per second training consumes (loader),
GPT2LMHeadModel.from_pretrained on the same checkpoint (conversion), full fine-tuning (LoRA memory), random
windows of the same chat data (packing: real, non-pad tokens trained per second); for serve.py
(a real server process, streaming HTTP clients): one client alone, and sample.py's path in this process.
"""

import argparse
import collections
import json
import math
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.abspath(__file__))
SHARED = os.path.normpath(os.path.join(ROOT, "..", "shared"))
if os.path.isdir(os.path.join(SHARED, "tiktoken_cache")):  # GPT-2 BPE offline (see ../shared/README.md)
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", os.path.join(SHARED, "tiktoken_cache"))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

from errors import GPTLabError, one_line_errors  # noqa: E402

SECTIONS = ("prepare", "loader", "convert", "train_tiny", "train_124m", "packing", "sample", "int8", "serve",
            "lora_memory")
NO_MODEL_SECTIONS = ("prepare", "loader", "convert")  # run first, before the malloc setting of the others (main)
# opt-in: nanoGPT's classic run against its own train.py (needs --nanogpt_dir, ~10 min), torch.compile on CPU (slow
# to compile), activation checkpointing at block 1024 (12 min on 2 AVX2 cores), GPU only
EXTRA_SECTIONS = ("classic", "compile_tiny", "act_ckpt", "train_gpu")
REFERENCE_TOKENS_PER_S = 15_600  # a straightforward PyTorch GPT-2 at the tiny shape here (../shared/README.md)
TINY = dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12)  # nanoGPT's shakespeare_char CPU shape
GPT2_124M = dict(n_layer=12, n_head=12, n_embd=768)
# transformers' candidate settings (dtype, attention implementation): its default SDPA, and its eager attention,
# which under bf16 on this CPU is faster for the same reason ours writes attention out (model.py)
HF_SETTINGS = (("float32", "sdpa"), ("bfloat16", "sdpa"), ("float32", "eager"), ("bfloat16", "eager"))
DTYPES = ("float32", "bfloat16")  # each side's candidate dtypes (bf16 only where the CPU has it natively: timed_dtypes)
SKIPS_BF16 = ("train_tiny", "train_124m", "sample", "compile_tiny")  # the sections that time bf16 candidates beside fp32 ones


class BenchError(GPTLabError, RuntimeError):
    """A section that cannot run here (no corpus, no GPU) or a measurement process that failed."""


# ---------------------------------------------------------------------------------------------------------------
# timing and memory

def interleaved(fns, repeats, inner=1, warmup=1, device="cpu"):
    """{name: median wall seconds per call} of each zero-argument fn, timed round-robin (see the module
    docstring), and every repeat's figures: {name: {"wall": [...], "cpu": [...]}}. "cpu" is this process's CPU
    time per call: steadier than wall time on a loaded machine, for the JSON and the details list only."""
    def timed(f, n):
        t, c = time.perf_counter(), time.process_time()
        for _ in range(n):
            f()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return (time.perf_counter() - t) / n, (time.process_time() - c) / n
    for f in fns.values():
        for _ in range(warmup):
            f()
    samples = {k: {"wall": [], "cpu": []} for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            wall, cpu = timed(f, inner)
            samples[k]["wall"].append(wall)
            samples[k]["cpu"].append(cpu)
    return {k: statistics.median(v["wall"]) for k, v in samples.items()}, samples


def whole_run(cmd, cwd, what):
    """Run a training process (train.py, nanoGPT's) to its end with this process's thread count: (wall seconds
    from start to exit, the last "val loss X" it printed). what: the BenchError's words if it fails."""
    t = time.perf_counter()
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads())))
    seconds = time.perf_counter() - t
    if done.returncode != 0:
        raise BenchError(f"{what} failed: {done.stderr.strip()[-500:]}")
    losses = re.findall(r"val loss ([0-9.]+)", done.stdout + done.stderr)
    return seconds, float(losses[-1]) if losses else float("nan")


def fastest(rates, side, attention=""):
    """The fastest candidate of one side ("ours" / "transformers"), optionally only those with that attention
    (candidates are named "SIDE DTYPE [ATTENTION] [compiled]")."""
    return max((k for k in rates if k.startswith(side) and (not attention or attention in k.split()[2:])),
               key=rates.get)


def per_repeat(samples, ours, ref):
    """The spread of ours' speed-up over ref across the repeats, each repeat's pair timed back to back (a
    "0.93x-1.43x" note): how far the machine's load moved the one figure the table shows, the median's."""
    ratios = [r / o for o, r in zip(samples[ours]["wall"], samples[ref]["wall"])]
    return f"per repeat {min(ratios):.2f}x-{max(ratios):.2f}x"


def cpu_rates(samples, units):
    """units per CPU-second of each candidate (the steadier figure of `interleaved`)."""
    return {k: units / statistics.median(v["cpu"]) for k, v in samples.items()}


def _status_mb(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith(field + ":"))


def peak_rss_mb():
    """This process's peak RSS (MB) since the last reset_peak_rss. Footgun: ru_maxrss is no good here: after
    fork + exec Linux reports at least the *parent's* peak, so a probe started by a 6 GB bench process would read
    6 GB whatever it does. /proc/self/status's VmHWM belongs to this process's memory alone."""
    try:
        return _status_mb("VmHWM")
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux: an upper bound


def reset_peak_rss():
    """Start a new high-water mark here and return the process's current RSS (MB): a transient peak during the
    imports would otherwise hide a small model's whole training (Linux: writing 5 to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_mb("VmRSS")
    except (OSError, StopIteration):
        return peak_rss_mb()


def probe(spec, timeout=900):
    """Run one measurement in a fresh `python bench.py --probe SPEC` process and return its JSON answer."""
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--probe", json.dumps(spec),
                          "--threads", str(torch.get_num_threads())], cwd=ROOT,
                         capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise BenchError(f"probe {spec} failed: {out.stderr.strip().splitlines()[-1] if out.stderr.strip() else out.returncode}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def autocast(dtype, device="cpu"):
    from runtime import autocast_context
    return autocast_context("cuda" if device.startswith("cuda") else device, dtype)


def auto_dtype():
    """What `dtype: auto` picks on this CPU (runtime.pick_dtype), as train.py and sample.py use it."""
    from runtime import pick_dtype
    return pick_dtype("auto", "cpu")


def timed_dtypes(cpu, all_dtypes=False):
    """(dtypes to time, why the others are skipped or ""). bf16 only where the CPU runs it natively (cpu: runtime's
    cpu_facts): AVX2-only CPUs emulate bf16 matmuls (0.8 GFLOP/s against fp32's 136 on AVX2 kernels here), and
    timing them took one section 849 s and another past 20 minutes, to learn that fp32 is faster there."""
    if cpu["native_bf16"] or all_dtypes:
        return DTYPES, ""
    return ("float32",), ("skipped bf16 candidates: this CPU has no avx512_bf16/amx_bf16, bf16 is emulated "
                          "(--all_dtypes times them anyway)")


def hf_settings(dtypes):
    return [(d, i) for d, i in HF_SETTINGS if d in dtypes]


def fmt_flops(x):
    return f"{x / 1e12:,.2f} TFLOP/s" if x >= 1e12 else f"{x / 1e9:,.1f} GFLOP/s"


def cpu_header(cpu):
    """Two header lines: what the CPU is and its peak FLOP/s, each factor with how it was obtained."""
    family = f" family {cpu['family']:#x}" if cpu["family"] is not None else ""
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA")
    native = [f for f in cpu["flags"] if f in ("avx512_bf16", "amx_bf16")]
    bf16 = f"yes ({', '.join(native)})" if native else ("yes (torch's check)" if cpu["native_bf16"] else
                                                        "no (no avx512_bf16/amx_bf16: bf16 is emulated)")
    what = (f"CPU: {cpu['model']} ({cpu['vendor'] or 'vendor unknown'}{family}), {cpu['cores']} cores used "
            f"({cpu['threads']} threads), torch capability {cpu['capability']}"
            f"{f', ONEDNN_MAX_CPU_ISA={isa}' if isa else ''}, flags {' '.join(cpu['flags']) or 'unknown'}; "
            f"native bf16: {bf16}")
    peak = cpu["peak_flops"]
    if peak["float32"] is None:
        return what + "\nCPU peak: not estimated (needs the avx2 + fma flags and a known clock)"
    lanes = {16: "AVX-512", 8: "AVX2"}[cpu["lanes"]]
    if cpu["lanes"] == 8 and "avx512f" in cpu["flags"]:
        lanes = "AMD family 0x19 runs AVX-512 on 256-bit pipes"
    if "amx_bf16" in cpu["flags"]:
        bf16_peak = f"{fmt_flops(peak['bfloat16'])} (AMX-BF16: Intel's 1024 FLOP/cycle/core)"
    elif peak["bfloat16"]:
        bf16_peak = f"{fmt_flops(peak['bfloat16'])} (avx512_bf16's dot product: 2x fp32)"
    else:
        bf16_peak = "none (emulated)"
    return (what + f"\nCPU peak: fp32 {cpu['cores']} cores x {cpu['fma_units']} FMA units (assumed, modern x86) x "
            f"{cpu['lanes']} fp32 lanes ({lanes}) x 2 FLOP x {cpu['clock_ghz']:.2f} GHz = {fmt_flops(peak['float32'])}"
            f"; bf16 {bf16_peak}; clock from {cpu['clock_source']}; an upper bound")


def achieved(cpu, flops_per_token, candidates):
    """The FLOPs column of a training row: each (tokens/s, dtype)'s achieved FLOP/s (flops_per_token:
    GPT.estimate_mfu's 6N + attention count, the same for both sides) and its share of the CPU's peak for the dtype
    it ran in, "ours / reference"."""
    cells = []
    for tps, dtype in candidates:
        flops, peak = flops_per_token * tps, cpu["peak_flops"].get(dtype)
        cells.append(f"{flops / 1e9:,.1f}G ({100 * flops / peak:.1f}%)" if peak else f"{flops / 1e9:,.1f}G (no peak)")
    return " / ".join(cells)


MATMUL_OPS = (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
              torch.ops.aten.baddbmm.default)  # baddbmm: model.explicit_attention_weights
# the rest of the arithmetic any GPT-2 step runs, however it is written: its tanh GELU, its layer norms and the
# loss's log-softmax over the vocabulary, forward and backward (PyTorch's kernels for each)
GPT2_OPS = (torch.ops.aten.gelu.default, torch.ops.aten.gelu_backward.default, torch.ops.aten.native_layer_norm.default,
            torch.ops.aten.native_layer_norm_backward.default, torch.ops.aten._log_softmax.default)
Spec = collections.namedtuple("Spec", "shape stride dtype")  # a recorded tensor argument


def recorded_ops(fn, ops=MATMUL_OPS + GPT2_OPS):
    """Every call of one of `ops` that one call of fn makes, in order: [(op, args, kwargs), ...], each tensor
    argument replaced by its Spec (shape, strides, dtype). Recorded at PyTorch's dispatch level (below autograd and
    autocast), so backward's calls are there, in the dtype autocast gave them."""
    from torch.utils._python_dispatch import TorchDispatchMode
    calls = []

    def spec(a):
        return Spec(a.shape, a.stride(), a.dtype) if isinstance(a, torch.Tensor) else a

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in ops:
                calls.append((func, [spec(a) for a in args], {k: spec(v) for k, v in (kwargs or {}).items()}))
            return func(*args, **(kwargs or {}))
    with Record():
        fn()
    return calls


def ops_alone(calls, device="cpu"):
    """A zero-argument fn that makes the same calls on random tensors and nothing else: the time of a step's
    arithmetic with no other work, so tokens / that time is about the most any code doing the same arithmetic with
    PyTorch's kernels can reach on this machine (a ceiling for the ratio against a reference). Every call gets
    inputs of its own with the recorded layout (a transposed weight is read differently), as in the real step,
    where each layer reads its own weights: shared inputs would sit warm in the cache and make a memory-bound step
    look faster than it can be. Work that is not recorded (attention's softmax, casts, residual adds, Python) counts
    as free."""
    def make(a):
        if not isinstance(a, Spec):
            return a
        span = 1 + sum((n - 1) * s for n, s in zip(a.shape, a.stride))  # elements the strided view reaches
        return torch.randn(span, dtype=a.dtype, device=device).as_strided(a.shape, a.stride)
    replay = [(op, [make(a) for a in args], {k: make(v) for k, v in kwargs.items()}) for op, args, kwargs in calls]

    def run():
        for op, args, kwargs in replay:
            op(*args, **kwargs)
    return run


def update_alone(model, optimizer):
    """A zero-argument fn that does the rest of the arithmetic every training step has to do, transformers' step
    included: clip the gradients and take the AdamW step (the same fused kernel, on weights of the same shapes).
    On a CPU it reads and writes every fp32 weight, gradient and moment: 0.1 s of a GPT-2 124M step here.
    The gradients are random, with a norm under the clip of 1.0, so clipping (which always multiplies) leaves them
    as they are; the weights move by one AdamW step per call, which changes no timing."""
    params = [p for p in model.parameters() if p.requires_grad]
    grads = [torch.randn_like(p) * 1e-6 for p in params]  # norm 0.01 at 124M

    def run():
        for p, g in zip(params, grads):
            p.grad = g
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return run


# ---------------------------------------------------------------------------------------------------------------
# the models and their training steps

def our_model(shape, vocab_size, block_size, bias, device="cpu"):
    from model import GPT, GPTConfig
    return GPT(GPTConfig(block_size=block_size, vocab_size=vocab_size, n_layer=shape["n_layer"], n_head=shape["n_head"],
                         n_embd=shape["n_embd"], dropout=0.0, bias=bias)).to(device)


def hf_model(shape, vocab_size, block_size, device="cpu"):
    from transformers import GPT2Config, GPT2LMHeadModel
    cfg = GPT2Config(vocab_size=vocab_size, n_positions=block_size, n_layer=shape["n_layer"], n_head=shape["n_head"],
                     n_embd=shape["n_embd"], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                     bos_token_id=vocab_size - 1, eos_token_id=vocab_size - 1)
    return GPT2LMHeadModel(cfg).to(device)


def adamw(model, device_type="cpu"):
    """The optimizer train.py builds (GPT.configure_optimizers: decay on 2-D weights only, the fused kernel on CPU
    and CUDA), for either model: transformers gets the same fast optimizer, only the models differ."""
    from model import GPT
    return GPT.configure_optimizers(model, 0.1, 1e-3, (0.9, 0.99), "cuda" if device_type.startswith("cuda") else device_type)


def our_step(model, optimizer, get_batch, ctx):
    """One optimizer step exactly as train.py takes it: fetch the batch, forward + backward through
    runtime.forward_backward (loss as a sum normalised by the target count), clip at 1.0, AdamW step, zero grads."""
    from runtime import forward_backward
    loss = forward_backward(model, [get_batch()], False, ctx)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    if math.isfinite(loss) and bool(torch.isfinite(norm)):
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


def hf_step(model, optimizer, get_batch, ctx):
    """transformers' usual step: loss from labels (shifted inside the model), backward, clip, AdamW."""
    x, _ = get_batch()[:2]
    with ctx:
        loss = model(input_ids=x, labels=x).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def random_batches(vocab_size, batch_size, block_size, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)

    def get_batch():
        t = torch.randint(0, vocab_size, (batch_size, block_size + 1), generator=g)
        return t[:, :-1].to(device), t[:, 1:].to(device)
    return get_batch


def train_comparison(name, shape, batch_size, block_size, ours_get_batch, hf_get_batch, our_vocab, hf_vocab, bias,
                     repeats, inner, device="cpu", dtypes=DTYPES, compiled=()):
    """Tokens/s of our step and transformers' step at one shape, every setting of each in `dtypes`, interleaved.
    compiled: dtypes in which each side also runs under torch.compile (a model of its own, "... compiled"), its
    first two steps timed apart (compile_seconds: what a run pays before the compiled speed starts)."""
    torch.manual_seed(0)
    ours = our_model(shape, our_vocab, block_size, bias, device)
    hf = hf_model(shape, hf_vocab, block_size, device)
    o_opt, h_opt = adamw(ours, device), adamw(hf, device)
    fns, update = {}, update_alone(ours, o_opt)
    for dtype in dtypes:
        fns[f"ours {dtype}"] = step = (lambda d=dtype: our_step(ours, o_opt, ours_get_batch, autocast(d, device)))
        # the ceiling: the step's products and GPT-2 kernels, and its optimizer update, with nothing else between
        fns[f"ceiling {dtype}"] = (lambda p=ops_alone(recorded_ops(step), device): (p(), update()))
    for dtype, impl in hf_settings(dtypes):
        def f(d=dtype, i=impl):
            hf.set_attn_implementation(i)
            return hf_step(hf, h_opt, hf_get_batch, autocast(d, device))
        fns[f"transformers {dtype} {impl}"] = f
    compile_seconds = {}
    for dtype in compiled:
        compile_seconds.update(compiled_candidates(fns, shape, block_size, bias, our_vocab, hf_vocab, dtype,
                                                   ours_get_batch, hf_get_batch, device))
    med, samples = interleaved(fns, repeats, inner, device=device)
    tokens = batch_size * block_size
    tps = {k: tokens / v for k, v in med.items()}
    best_ours, best_hf = fastest(tps, "ours"), fastest(tps, "transformers")
    best_hf_sdpa = fastest(tps, "transformers", "sdpa")
    ceiling = f"ceiling {best_ours.split()[1]}"  # the ceiling in our fastest candidate's dtype
    flops_per_token = ours.estimate_mfu(1.0, 1.0)  # 6N + attention (PaLM), counted for both sides alike
    del ours, hf, o_opt, h_opt
    return {"name": name, "flops_per_token": flops_per_token, "tokens_per_s": tps,
            "tokens_per_cpu_s": cpu_rates(samples, tokens),
            "seconds_per_step_samples": samples, "best_ours": best_ours, "best_hf": best_hf,
            "best_hf_default_attention": best_hf_sdpa, "ratio": tps[best_ours] / tps[best_hf],
            "ratio_default_attention": tps[best_ours] / tps[best_hf_sdpa],
            "best_ceiling": ceiling, "ceiling_ratio": tps[ceiling] / tps[best_hf], "compile_seconds": compile_seconds}


def compiled_candidates(fns, shape, block_size, bias, our_vocab, hf_vocab, dtype, ours_get_batch, hf_get_batch,
                        device="cpu"):
    """Adds to fns our step and transformers' (each of its attentions) on torch.compile'd models of their own, in
    one dtype, after taking their first two steps (the compile); returns {candidate: seconds of those two steps}.
    Each model is compiled as train.py's compile: true does (torch.compile with its defaults); its attention
    implementation is set before the compile, so each is a graph of its own."""
    new, seconds = {}, {}
    torch.manual_seed(0)
    ours = our_model(shape, our_vocab, block_size, bias, device)
    o_opt, o_c = adamw(ours, device), torch.compile(ours)
    new[f"ours {dtype} compiled"] = lambda: our_step(o_c, o_opt, ours_get_batch, autocast(dtype, device))
    for impl in sorted({i for d, i in HF_SETTINGS if d == dtype}):
        hf = hf_model(shape, hf_vocab, block_size, device)
        hf.set_attn_implementation(impl)
        h_opt, h_c = adamw(hf, device), torch.compile(hf)
        new[f"transformers {dtype} {impl} compiled"] = (
            lambda h_c=h_c, h_opt=h_opt: hf_step(h_c, h_opt, hf_get_batch, autocast(dtype, device)))
    for k, f in new.items():
        t = time.perf_counter()
        f(), f()
        seconds[k] = time.perf_counter() - t
    fns.update(new)
    return seconds


# ---------------------------------------------------------------------------------------------------------------
# datasets the sections share (prepared once per run into a temp folder)

class Workspace:
    def __init__(self, tmp, corpus_dir):
        self.tmp, self.corpus_dir = tmp, corpus_dir
        self._cache = {}

    def corpus(self, name):
        path = os.path.join(self.corpus_dir, name)
        if not os.path.exists(path):
            raise BenchError(f"{path}: corpus not found (give --corpus_dir, the folder with tinyshakespeare.txt and "
                             f"pride_and_prejudice_pg1342.txt)")
        return path

    def shakespeare_char(self):
        if "char" not in self._cache:
            import prepare_dataset
            out = os.path.join(self.tmp, "shakespeare_char")
            prepare_dataset.prepare([self.corpus("tinyshakespeare.txt")], out, tokenization="char", fmt="text")
            self._cache["char"] = out
        return self._cache["char"]

    def gpt2_text(self):
        if "gpt2" not in self._cache:
            import prepare_dataset
            out = os.path.join(self.tmp, "pride_gpt2")
            prepare_dataset.prepare([self.corpus("pride_and_prejudice_pg1342.txt")], out, tokenization="gpt2", fmt="text")
            self._cache["gpt2"] = out
        return self._cache["gpt2"]

    def sample_chat(self, tokenization):
        """The shipped sample conversations, prepared with this tokenizer (chat format: masks and starts)."""
        if tokenization not in self._cache:
            import prepare_dataset
            out = os.path.join(self.tmp, f"sample_chat_{tokenization}")
            prepare_dataset.prepare([os.path.join(ROOT, "data", "sample_chat.jsonl")], out, tokenization=tokenization,
                                    fmt="chat")
            self._cache[tokenization] = out
        return self._cache[tokenization]

    def hf_checkpoint(self):
        """A random-weight GPT-2 124M saved with save_pretrained (real format; pretrained weights are not reachable
        here)."""
        if "hf" not in self._cache:
            from transformers import GPT2Config, GPT2LMHeadModel
            out = os.path.join(self.tmp, "hf_gpt2_124m")
            torch.manual_seed(0)
            GPT2LMHeadModel(GPT2Config()).save_pretrained(out)
            self._cache["hf"] = out
        return self._cache["hf"]


def loader(dataset_dir, batch_size, block_size, device="cpu"):
    from data import BatchLoader, read_metadata
    from model import padded_vocab
    meta = read_metadata(dataset_dir)
    return BatchLoader(dataset_dir, "train", batch_size, block_size, device=device,
                       model_vocab_size=padded_vocab(int(meta["vocab_size"])))


# ---------------------------------------------------------------------------------------------------------------
# sections: each returns (rows for the table, raw figures for the JSON)

def row(what, ours, ref, ratio, target, ok, note="", flops=""):
    """One table row; flops: a training row's achieved FLOP/s and share of the CPU's peak (achieved)."""
    return {"what": what, "ours": ours, "reference": ref, "ratio": ratio, "target": target, "ok": ok, "note": note,
            "flops": flops}


def ceiling_row(what, work, tps, dtype, ref, ratio, ref_suffix="", flops=""):
    """The ceiling row: `work` alone, no other (the "ceiling DTYPE" candidate), against ref."""
    return row(f"{what}: {work} alone (the ceiling of any PyTorch code doing them)",
               f"{fmt_tps(tps[f'ceiling {dtype}'])} ({dtype})", f"{fmt_tps(tps[ref])} ({ref[13:]}{ref_suffix})",
               f"{ratio:.2f}x", "(reported)", None, flops=flops)


def fmt_tps(x):
    return f"{x / 1000:,.1f}k tok/s" if x >= 1000 else f"{x:,.1f} tok/s"


def train_flops(cpu, res, *candidates):
    """achieved() for candidates named as in res["tokens_per_s"] ("ours bfloat16", "transformers float32 eager")."""
    return achieved(cpu, res["flops_per_token"], [(res["tokens_per_s"][k], k.split()[1]) for k in candidates])


def train_rows(res, what, target_ratio, cpu):
    """Three rows: transformers in its fastest dtype with its default attention (SDPA), in its fastest setting of
    all (eager attention included), and the ceiling: our step's unavoidable arithmetic alone against that."""
    tps = res["tokens_per_s"]
    ours, hf, hf_sdpa = res["best_ours"], res["best_hf"], res["best_hf_default_attention"]
    return [row(f"{what}: training tokens/s, fastest dtype each (transformers' default attention)",
                f"{fmt_tps(tps[ours])} ({ours[5:]})", f"{fmt_tps(tps[hf_sdpa])} ({hf_sdpa[13:]})",
                f"{res['ratio_default_attention']:.2f}x", f">= {target_ratio}x vs transformers",
                res["ratio_default_attention"] >= target_ratio, flops=train_flops(cpu, res, ours, hf_sdpa)),
            row(f"{what}: training tokens/s, fastest setting each (transformers' eager attention too)",
                f"{fmt_tps(tps[ours])} ({ours[5:]})", f"{fmt_tps(tps[hf])} ({hf[13:]})", f"{res['ratio']:.2f}x",
                f">= {target_ratio}x vs transformers", res["ratio"] >= target_ratio,
                per_repeat(res["seconds_per_step_samples"], ours, hf), flops=train_flops(cpu, res, ours, hf)),
            ceiling_row(what, "our step's matrix products, GELU, layer norms, loss log-softmax and AdamW update", tps,
                        res["best_ceiling"].split()[1], hf, res["ceiling_ratio"],
                        flops=train_flops(cpu, res, res["best_ceiling"], hf)),
            share_of_ceiling_row(what, res, target_ratio)]


def share_of_ceiling_row(what, res, target_ratio):
    """Our fastest against the ceiling: where the ceiling itself is under target_ratio x transformers, no PyTorch
    code reaches the target with these kernels, and the row asks for 90% of the ceiling instead."""
    tps, ours, ceiling = res["tokens_per_s"], res["best_ours"], res["best_ceiling"]
    share = tps[ours] / tps[ceiling]
    possible = res["ceiling_ratio"] >= target_ratio
    return row(f"{what}: our fastest against the ceiling", f"{fmt_tps(tps[ours])} ({ours[5:]})",
               f"{fmt_tps(tps[ceiling])} ({ceiling})", f"{share:.2f}x",
               f">= 0.9x (the ceiling is {res['ceiling_ratio']:.2f}x transformers"
               f"{'' if possible else f', under {target_ratio}x'})", None if possible else share >= 0.9)


def memory_rows(what, shape_spec, res):
    ours = probe(dict(shape_spec, kind="train", side="ours", setting=res["best_ours"][5:]))
    hf = probe(dict(shape_spec, kind="train", side="hf", setting=res["best_hf"][13:]))
    res["peak_mb"] = {"ours": ours["peak_mb"], "transformers": hf["peak_mb"]}
    return [row(f"{what}: peak memory of training (3 steps, fresh process)", f"{ours['peak_mb']:,.0f} MB",
                f"{hf['peak_mb']:,.0f} MB", f"{ours['peak_mb'] / hf['peak_mb']:.2f}x", "(reported)", None)]


def section_train_tiny(ws, args):
    data = ws.shakespeare_char()
    B, T = TINY["batch_size"], TINY["block_size"]
    ld = loader(data, B, T)
    get_batch = ld.get_batch
    res = train_comparison("train_tiny", TINY, B, T, get_batch, get_batch, ld.vocab_limit, ld.data.vocab_size,
                           bias=False, repeats=5 if args.quick else 9, inner=10 if args.quick else 20,
                           dtypes=args.dtypes)
    tps = res["tokens_per_s"]
    what = "tiny 4x128, block 64, batch 12 (CPU)"
    rows = train_rows(res, what, 1.5, args.cpu)
    best = tps[res["best_ours"]]
    rows.append(row(f"{what}: our training tokens/s vs the reference figure", fmt_tps(best),
                    fmt_tps(REFERENCE_TOKENS_PER_S) + " (README)", f"{best / REFERENCE_TOKENS_PER_S:.2f}x",
                    ">= 1.2x (18.7k tok/s)", best >= 1.2 * REFERENCE_TOKENS_PER_S,
                    flops=train_flops(args.cpu, res, res["best_ours"])))
    auto = auto_dtype()
    res["auto_dtype"] = auto
    rows.append(row(f"{what}: train.py's dtype auto picks {auto}", fmt_tps(tps[f'ours {auto}']),
                    fmt_tps(tps[res['best_ours']]) + " (our fastest)", f"{tps[f'ours {auto}'] / best:.2f}x",
                    "auto = our fastest", auto == res["best_ours"][5:] or tps[f"ours {auto}"] / best > 0.97,
                    flops=train_flops(args.cpu, res, f"ours {auto}", res["best_ours"])))
    if not args.no_memory:
        rows += memory_rows(what, dict(shape="tiny", vocab=ld.vocab_limit, hf_vocab=ld.data.vocab_size), res)
    return rows, res


def section_train_124m(ws, args):
    data = ws.gpt2_text()
    B, T = 4, 256
    ld = loader(data, B, T)
    res = train_comparison("train_124m", GPT2_124M, B, T, ld.get_batch, ld.get_batch, 50304, 50257, bias=True,
                           repeats=3 if args.quick else 5, inner=1, dtypes=args.dtypes)
    what = "124M 12x768, batch 4 x 256 (CPU)"
    rows = train_rows(res, what, 1.3, args.cpu)
    if not args.no_memory:
        rows += memory_rows(what, dict(shape="124m", vocab=50304, hf_vocab=50257), res)
    return rows, res


def packing_comparison(dataset_dir, shape, batch_size, block_size, repeats, inner):
    """Chat SFT steps (masked loss, train.py's dtype auto) on packed rows and on random windows of the same data and
    shape, interleaved. Tokens/s counts the tokens each trains on: every token of a window, the non-pad tokens of a
    packed row (the epoch's fill, exact over an epoch: packed positions / (rows * block_size))."""
    from data import BatchLoader, PackedLoader, read_metadata
    from model import padded_vocab
    from runtime import forward_backward
    vocab = padded_vocab(int(read_metadata(dataset_dir)["vocab_size"]))
    torch.manual_seed(0)
    model = our_model(shape, vocab, block_size, bias=False)
    opt = adamw(model)
    dtype = auto_dtype()
    args = dict(use_mask=True, model_vocab_size=vocab)
    loaders = {"random windows": BatchLoader(dataset_dir, "train", batch_size, block_size, **args),
               "packed": PackedLoader(dataset_dir, "train", batch_size, block_size, **args)}

    def step(ld):
        forward_backward(model, [ld.get_batch()], True, autocast(dtype))
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    med, samples = interleaved({k: (lambda ld=ld: step(ld)) for k, ld in loaders.items()}, repeats, inner)
    packed = loaders["packed"]
    fill = float(packed.n.sum()) / (packed.rows_per_epoch * block_size)
    tokens = {"random windows": batch_size * block_size, "packed": fill * batch_size * block_size}
    tps = {k: tokens[k] / v for k, v in med.items()}
    per_cpu_s = {k: tokens[k] * r for k, r in cpu_rates(samples, 1).items()}
    return {"dtype": dtype, "fill": fill, "flops_per_token": model.estimate_mfu(1.0, 1.0), "tokens_per_s": tps,
            "tokens_per_cpu_s": per_cpu_s, "samples": samples,
            "summary": packed.summary(), "ratio": tps["packed"] / tps["random windows"],
            "cpu_ratio": per_cpu_s["packed"] / per_cpu_s["random windows"],
            "per_repeat": [fill * w / p for p, w in zip(samples["packed"]["wall"], samples["random windows"]["wall"])]}


def section_packing(ws, args):
    """Packed whole conversations (block-diagonal attention, positions restarting) against random windows, at the
    tiny shape (char tokens) and at 124M (GPT-2 tokens), trained tokens per second."""
    rows, res = [], {}
    for name, shape, tokenization, B, T in (("tiny 4x128, block 64, batch 12", TINY, "char", 12, 64),
                                            ("124M 12x768, batch 4 x 256", GPT2_124M, "gpt2", 4, 256)):
        tiny = shape is TINY
        r = packing_comparison(ws.sample_chat(tokenization), shape, B, T, repeats=(5 if tiny else 3) if args.quick
                               else (9 if tiny else 5), inner=(10 if args.quick else 20) if tiny else 1)
        res[name] = r
        tps = r["tokens_per_s"]
        rows.append(row(f"packing, {name} (CPU, {r['dtype']}, chat SFT, {100 * r['fill']:.1f}% of positions filled): "
                        f"trained tokens/s", fmt_tps(tps["packed"]), fmt_tps(tps["random windows"]) + " (random windows)",
                        f"{r['ratio']:.2f}x", ">= 0.9x", r["ratio"] >= 0.9,
                        f"{r['cpu_ratio']:.2f}x in CPU time, per repeat {min(r['per_repeat']):.2f}x-"
                        f"{max(r['per_repeat']):.2f}x",
                        flops=achieved(args.cpu, r["flops_per_token"], [(tps[k], r["dtype"]) for k in
                                                                        ("packed", "random windows")])))
    res["tokens_per_s"] = {f"{n} {k}": v for n, r in list(res.items()) for k, v in r["tokens_per_s"].items()}
    return rows, res


CLASSIC_ITERS = {"quick": 300, "full": 2000}  # the classic run's iterations: its README's 2000, or --quick's
NANOGPT_CLASSIC = ["--device=cpu", "--compile=False", "--eval_iters=20", "--log_interval=1", "--block_size=64",
                   "--batch_size=12", "--n_layer=4", "--n_head=4", "--n_embd=128", "--dropout=0.0"]  # its README's CPU run


def nanogpt_workspace(ws, nanogpt_dir):
    """A copy of the user's nanoGPT checkout (its scripts, not its outputs) with tinyshakespeare prepared by its own
    data/shakespeare_char/prepare.py, which reads input.txt when it is there instead of downloading it."""
    import shutil
    if not os.path.isfile(os.path.join(nanogpt_dir or "", "config", "train_shakespeare_char.py")):
        raise BenchError(f"--nanogpt_dir {nanogpt_dir!r}: not a nanoGPT checkout (no config/train_shakespeare_char.py); "
                         f"the classic section runs karpathy/nanoGPT's own train.py: git clone it and pass its folder")
    out = os.path.join(ws.tmp, "nanogpt")
    for name in ("train.py", "model.py", "configurator.py", "config", "data/shakespeare_char/prepare.py"):
        src, dst = os.path.join(nanogpt_dir, name), os.path.join(out, name)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        (shutil.copytree if os.path.isdir(src) else shutil.copy)(src, dst)
    data = os.path.join(out, "data", "shakespeare_char")
    shutil.copy(ws.corpus("tinyshakespeare.txt"), os.path.join(data, "input.txt"))
    subprocess.run([sys.executable, "prepare.py"], cwd=data, check=True, capture_output=True)
    return out


def section_classic(ws, args):
    """nanoGPT's classic CPU run, the one its README gives for a laptop (shakespeare_char, 4 x 128, block 64,
    batch 12, eval_iters 20, no dropout, 2000 iterations), each whole process timed from start to exit: our
    train.py (configs/shakespeare_char.json, the same settings, dtype auto) against nanoGPT's own train.py run from
    a copy of --nanogpt_dir (fp32 on the CPU), alternating, two runs each; and the last val loss each printed."""
    iters = CLASSIC_ITERS["quick" if args.quick else "full"]
    nano = nanogpt_workspace(ws, args.nanogpt_dir)
    ours_cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--config_file", "configs/shakespeare_char.json",
                "--dataset_dir", ws.shakespeare_char(), "--out_dir", os.path.join(ws.tmp, "classic"),
                "--eval_iters", "20", "--max_iters", str(iters), "--lr_decay_iters", str(iters)]
    nano_cmd = [sys.executable, "train.py", "config/train_shakespeare_char.py", *NANOGPT_CLASSIC,
                f"--max_iters={iters}", f"--lr_decay_iters={iters}", "--out_dir=" + os.path.join(ws.tmp, "classic_nano")]
    runs = {"ours": [], "nanoGPT": []}
    for _ in range(1 if args.quick else 2):
        runs["ours"].append(whole_run(ours_cmd, ROOT, "our train.py (classic run)"))
        runs["nanoGPT"].append(whole_run(nano_cmd, nano, "nanoGPT's train.py (classic run)"))
    secs = {k: statistics.median(s for s, _ in v) for k, v in runs.items()}
    loss = {k: v[-1][1] for k, v in runs.items()}
    ratio = secs["nanoGPT"] / secs["ours"]
    each = "; ".join(f"{k} " + " / ".join(f"{s:.1f} s" for s, _ in v) for k, v in runs.items())
    what = f"classic shakespeare_char run, {iters} iterations, whole process (CPU, dtype auto = {auto_dtype()})"
    rows = [row(f"{what}: wall time", f"{secs['ours']:.1f} s", f"{secs['nanoGPT']:.1f} s (nanoGPT)", f"{ratio:.2f}x",
                ">= 1.2x", ratio >= 1.2, each),
            row(f"{what}: last val loss", f"{loss['ours']:.4f}", f"{loss['nanoGPT']:.4f} (nanoGPT)", "",
                "<= 1.90" if iters == 2000 else "(reported)", loss["ours"] <= 1.90 if iters == 2000 else None)]
    return rows, {"seconds_each": runs, "speedup": ratio, "val_loss": loss}


def section_compile_tiny(ws, args):
    """train_tiny with torch.compile as a setting of both sides: each side's eager settings and its step on a
    compiled model (train.py's compile: true; in the dtype train.py's auto picks), against the same eager ceiling.
    Compiled code fuses what the ceiling counts as free (softmax, adds, copies) but calls the same matrix
    kernels. The compile is timed from an empty inductor cache (a folder of this run's): what a first run pays;
    a later run of the same model loads its kernels from the cache in a few seconds."""
    data = ws.shakespeare_char()
    B, T = TINY["batch_size"], TINY["block_size"]
    ld = loader(data, B, T)
    dtype = auto_dtype()
    from unittest import mock
    # an empty cache of this run's for the compile; the sections after this one use the user's again
    with mock.patch.dict(os.environ, {"TORCHINDUCTOR_CACHE_DIR": os.path.join(ws.tmp, "inductor_cache")}):
        res = train_comparison("compile_tiny", TINY, B, T, ld.get_batch, ld.get_batch, ld.vocab_limit,
                               ld.data.vocab_size, bias=False, repeats=5 if args.quick else 9,
                               inner=10 if args.quick else 20, dtypes=args.dtypes, compiled=(dtype,))
    tps, secs = res["tokens_per_s"], res["compile_seconds"]
    what = "tiny 4x128, block 64, batch 12 (CPU), torch.compile a setting of each side"
    rows = train_rows(res, what, 1.5, args.cpu)
    for side in ("ours", "transformers"):
        for k in sorted(k for k in secs if k.startswith(side)):
            eager = k[:-len(" compiled")]
            rows.append(row(f"{what}: {k[len(side) + 1:]} against eager, first 2 steps {secs[k]:.0f} s "
                            f"({side}; empty inductor cache)", fmt_tps(tps[k]), fmt_tps(tps[eager]) + " (eager)",
                            f"{tps[k] / tps[eager]:.2f}x", "(reported)", None, flops=train_flops(args.cpu, res, k, eager)))
    return rows, res


def section_sample(ws, args):
    """124M, batch 1, greedy, N new tokens after a 32-token prompt: our generate (KV cache) vs transformers'
    generate, the same random weights in both (converted), so both do exactly the same work; then our full
    recompute (no cache) for the speed-up the cache buys. Ours runs as sample.py runs it: its fp32 weights in the
    decode layout (decode_weights.py, "ours float32"), and also with nn.Linear's own ("plain"), under bf16
    autocast, and weight-only int8 (--dtype int8)."""
    n_new = 64 if args.quick else 256
    fns, outs, ours_gen, prompt = sample_candidates(ws, args, n_new)
    med, samples = interleaved(fns, repeats=3, warmup=1)  # 10 candidates x 256 tokens: minutes (6 on fp32 only)
    tps = {k: n_new / v for k, v in med.items()}
    best_ours, best_hf = fastest(tps, "ours"), fastest(tps, "transformers")
    hf_sdpa = fastest(tps, "transformers", "sdpa")
    same = bool(torch.equal(outs["ours float32 cache=True"], outs["transformers float32 sdpa"]))
    hf_fp32 = max((k for k in tps if k.startswith("transformers float32")), key=tps.get)
    int8_same = int((outs["ours int8 cache=True"] == outs["ours float32 cache=True"])[0, prompt.size(1):].sum())
    # the cache's speed-up, in our fastest dtype: one recompute run (it is slow) between two cached runs; the
    # cached time is the median of those two and of the runs above
    d = best_ours[5:]
    cached = list(samples[best_ours]["wall"])
    for cache in (True, False, True):
        t = time.perf_counter()
        ours_gen(d, cache=cache)
        if cache:
            cached.append(time.perf_counter() - t)
        else:
            t_full = time.perf_counter() - t
    same_full = bool(torch.equal(outs[f"ours {d} cache=True"], outs[f"ours {d} cache=False"]))
    t_cache = statistics.median(cached)
    res = {"new_tokens": n_new, "tokens_per_s": tps, "tokens_per_cpu_s": cpu_rates(samples, n_new), "samples": samples, "best_ours": best_ours, "best_hf": best_hf,
           "ratio": tps[best_ours] / tps[best_hf], "ratio_default_attention": tps[best_ours] / tps[hf_sdpa],
           "same_tokens_as_transformers_fp32": same,
           "recompute_seconds": t_full, "cache_seconds": t_cache, "cache_speedup": t_full / t_cache,
           "recompute_same_tokens": same_full, "ceiling_ratio": tps[f"ceiling {d}"] / tps[best_hf],
           "fp32_ratio": tps["ours float32"] / tps[hf_fp32], "packed_vs_plain": tps["ours float32"] / tps["plain float32 (ours)"],
           "int8_ratio": tps["int8 (ours)"] / tps[best_hf], "int8_same_tokens_as_fp32": int8_same,
           "hf_sdpa": hf_sdpa, "hf_fp32": hf_fp32, "cache_dtype": d}
    return sample_rows(res), res


def sample_candidates(ws, args, n_new):
    """The sample section's timed candidates {name: fn}, the dict their generated ids land in, our generate
    (setting, cache=True) and the prompt."""
    import copy
    from decode_weights import for_decoding
    from hf import load_hf_gpt2
    from transformers import GPT2LMHeadModel
    from tokenizer import Tokenizer
    hf_dir = ws.hf_checkpoint()
    ours, tok = load_hf_gpt2(hf_dir)
    ours.eval()
    models = {"float32": for_decoding(copy.deepcopy(ours), "float32"), "bfloat16": ours, "plain float32": ours,
              "int8": for_decoding(copy.deepcopy(ours), "int8")}
    hf = GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    hf.generation_config.eos_token_id = None  # never stop early: exactly n_new tokens on both sides
    hf.generation_config.pad_token_id = 0
    with open(ws.corpus("pride_and_prejudice_pg1342.txt")) as f:
        text = f.read()
    prompt = torch.tensor([Tokenizer("gpt2").encode(text[5000:6000])[:32]])
    outs = {}

    def ours_gen(setting, cache=True):
        with autocast(setting.split()[-1]):
            outs[f"ours {setting} cache={cache}"] = models[setting].generate(prompt, n_new, temperature=0,
                                                                             use_kv_cache=cache)

    def hf_gen(dtype, impl):
        hf.set_attn_implementation(impl)
        with torch.no_grad(), autocast(dtype):
            outs[f"transformers {dtype} {impl}"] = hf.generate(prompt, max_new_tokens=n_new, min_new_tokens=0,
                                                               do_sample=False)
    # "ours ..." are sample.py's --dtype float32 / bfloat16 (fastest() picks among them); int8 and nn.Linear's
    # plain fp32 layout are reported on their own rows (both native on every CPU)
    fns = {f"ours {d}": (lambda d=d: ours_gen(d)) for d in args.dtypes}
    fns.update({f"{d} (ours)": (lambda d=d: ours_gen(d)) for d in ("int8", "plain float32")})
    fns.update({f"transformers {d} {i}": (lambda d=d, i=i: hf_gen(d, i)) for d, i in hf_settings(args.dtypes)})
    # the ceiling: the recorded arithmetic of one decode step (that of a 2-token generate after that of a 1-token
    # one, i.e. after the prefill), once per new token; each decode step reads all the weights, so a whole
    # generate's products, each with inputs of its own, would not fit in memory
    for d in args.dtypes:
        with autocast(d):
            prefill = recorded_ops(lambda: ours.generate(prompt, 1, temperature=0))
            two = recorded_ops(lambda: ours.generate(prompt, 2, temperature=0))
        decode_step = ops_alone(two[len(prefill):])
        fns[f"ceiling {d}"] = (lambda f=decode_step: [f() for _ in range(n_new)])
    return fns, outs, ours_gen, prompt


def sample_rows(res):
    tps, samples, n_new, d = res["tokens_per_s"], res["samples"], res["new_tokens"], res["cache_dtype"]
    best_ours, best_hf, hf_sdpa, hf_fp32 = res["best_ours"], res["best_hf"], res["hf_sdpa"], res["hf_fp32"]
    same, same_full = res["same_tokens_as_transformers_fp32"], res["recompute_same_tokens"]
    int8_same, t_cache, t_full = res["int8_same_tokens_as_fp32"], res["cache_seconds"], res["recompute_seconds"]
    what = f"sampling 124M, batch 1, greedy, {n_new} new tokens (CPU)"
    ours_txt = f"{fmt_tps(tps[best_ours])} ({best_ours[5:]}, KV cache)"
    # as each is shipped: sample.py's --dtype auto (runtime.pick_dtype) against generate() as it comes (fp32,
    # default attention), the comparison the "about 23 tokens/s" reference figure is
    auto = auto_dtype()
    res["ratio_as_shipped"] = tps[f"ours {auto}"] / tps["transformers float32 sdpa"]
    return [row(f"{what}: tokens/s as shipped (sample.py --dtype auto vs generate() defaults)",
                f"{fmt_tps(tps[f'ours {auto}'])} ({auto}, KV cache)",
                f"{fmt_tps(tps['transformers float32 sdpa'])} (float32 sdpa, generate)",
                f"{res['ratio_as_shipped']:.2f}x", ">= 1.5x vs transformers", res["ratio_as_shipped"] >= 1.5),
            row(f"{what}: tokens/s, fastest dtype each (transformers' default attention)", ours_txt,
                f"{fmt_tps(tps[hf_sdpa])} ({hf_sdpa[13:]}, generate)", f"{res['ratio_default_attention']:.2f}x",
                ">= 1.5x vs transformers", res["ratio_default_attention"] >= 1.5,
                f"fp32 greedy tokens identical to transformers': {'yes' if same else 'NO'}"),
            row(f"{what}: tokens/s, fastest setting each (transformers' eager attention too)", ours_txt,
                f"{fmt_tps(tps[best_hf])} ({best_hf[13:]}, generate)", f"{res['ratio']:.2f}x",
                ">= 1.5x vs transformers", res["ratio"] >= 1.5, per_repeat(samples, best_ours, best_hf)),
            row(f"{what}: fp32 tokens/s, both in fp32 (transformers' fastest attention)",
                f"{fmt_tps(tps['ours float32'])} (float32, decode layout)", f"{fmt_tps(tps[hf_fp32])} ({hf_fp32[13:]}, "
                f"generate)", f"{res['fp32_ratio']:.2f}x", ">= 1.1x vs transformers", res["fp32_ratio"] >= 1.1,
                f"nn.Linear's layout: {fmt_tps(tps['plain float32 (ours)'])}; the decode layout is "
                f"{res['packed_vs_plain']:.2f}x that"),
            row(f"{what}: int8 weight-only (sample.py --dtype int8) vs transformers' fastest setting",
                f"{fmt_tps(tps['int8 (ours)'])} (int8)", f"{fmt_tps(tps[best_hf])} ({best_hf[13:]}, generate)",
                f"{res['int8_ratio']:.2f}x", ">= 2x vs transformers", res["int8_ratio"] >= 2.0,
                f"random weights: {int8_same}/{n_new} greedy tokens as fp32's (trained models: the int8 section)"),
            ceiling_row(what, "our generate's matrix products, GELU and layer norms", tps, d, best_hf,
                        res["ceiling_ratio"], ", generate"),
            row(f"{what}: KV cache vs full recompute ({d})", fmt_tps(n_new / t_cache), fmt_tps(n_new / t_full),
                f"{res['cache_speedup']:.1f}x", "(reported)", None,
                f"same tokens: {'yes' if same_full else 'NO'}")]


def int8_cost(model_name, out_dir, dataset_dir, n_batches, n_new, seed=0):
    """fp32 against int8 weights of one trained model: the val loss on the same n_batches (fp32 has nn.Linear's
    weights, as training evaluates) and greedy decoding of n_new tokens after a val prompt (both via the engine)."""
    import copy
    from checkpoint import load_model
    from data import BatchLoader
    from decode_weights import for_decoding
    from engine import Engine, Request
    model, tok, _ = load_model(model_name, out_dir)
    model.eval()
    q8 = for_decoding(copy.deepcopy(model), "int8")
    T = model.config.block_size
    val = BatchLoader(dataset_dir, "val", 4, T, seed=seed)  # the same seeded windows for both
    losses = {"float32": [], "int8": []}
    with torch.no_grad():
        for _ in range(n_batches):
            X, Y = val.get_batch()[:2]
            losses["float32"].append(model(X, Y)[1].item())
            losses["int8"].append(q8(X, Y)[1].item())
    prompt = [tok.eot_token] + X[0, :31].tolist()
    replies = {}
    for name, m in (("float32", for_decoding(model, "float32")), ("int8", q8)):
        r = Request(prompt, n_new, temperature=0)
        list(Engine(m, tok).run([r]))
        replies[name] = r.tokens
    a, b = replies["float32"], replies["int8"]
    first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
    loss = {k: statistics.fmean(v) for k, v in losses.items()}
    return {"val_loss": loss, "val_loss_change": loss["int8"] - loss["float32"],
            "same_tokens": sum(x == y for x, y in zip(a, b)), "first_difference": first, "new_tokens": n_new}


def section_int8(ws, args):
    """What weight-only int8 decoding costs on trained models (the speed is the sample section's): the classic
    benchmark's char model (configs/shakespeare_char.json) and a GPT-2 124M-shape model trained briefly on the
    shared prose, each trained here by train.py, then read in fp32 and int8."""
    out = os.path.join(ws.tmp, "int8_models")
    char_iters, big_iters = (300, 20) if args.quick else (2000, 100)
    runs = [("char", ["--config_file", "configs/shakespeare_char.json", "--dataset_dir", ws.shakespeare_char(),
                      "--max_iters", char_iters, "--lr_decay_iters", char_iters]),
            ("gpt2_124m", ["--dataset_dir", ws.gpt2_text(), "--n_layer", 12, "--n_head", 12, "--n_embd", 768,
                           "--block_size", 256, "--batch_size", 4, "--max_iters", big_iters, "--lr_decay_iters",
                           big_iters, "--warmup_iters", big_iters // 10, "--learning_rate", 6e-4, "--min_lr", 6e-5,
                           "--dropout", 0.0])]
    rows, res = [], {}
    for name, flags in runs:
        iters = int(flags[flags.index("--max_iters") + 1])
        cmd = [sys.executable, os.path.join(ROOT, "train.py"), *map(str, flags), "--model_name", name, "--out_dir", out,
               "--eval_interval", str(iters), "--eval_iters", "5", "--log_interval", str(max(1, iters // 5))]
        t = time.perf_counter()
        whole_run(cmd, ROOT, f"training the {name} model for the int8 section")
        r = int8_cost(name, out, flags[flags.index("--dataset_dir") + 1], n_batches=10 if args.quick else 40,
                      n_new=64 if args.quick else 256)
        r["train_seconds"] = time.perf_counter() - t
        res[name] = r
        what = {"char": f"int8 cost: char model, shakespeare_char preset, {iters} iterations",
                "gpt2_124m": f"int8 cost: GPT-2 124M shape, {iters} iterations on the prose"}[name]
        rows.append(row(f"{what}: val loss int8 vs fp32", f"{r['val_loss']['int8']:.4f}",
                        f"{r['val_loss']['float32']:.4f}", f"{r['val_loss_change']:+.4f}", "(reported)", None,
                        f"greedy: {r['same_tokens']}/{r['new_tokens']} tokens as fp32's, first difference at "
                        f"{r['first_difference']}"))
    return rows, res


def served_checkpoint(ws):
    """A random-weight GPT-2 124M (our model, GPT-2's tokenizer) saved as a project checkpoint for serve.py."""
    from checkpoint import atomic_save, make_checkpoint
    from tokenizer import Tokenizer
    out = os.path.join(ws.tmp, "serve_checkpoints")
    torch.manual_seed(0)
    model = our_model(GPT2_124M, 50304, 1024, bias=True)
    ckpt = make_checkpoint(model.state_dict(), vars(model.config), {}, Tokenizer("gpt2").state_dict())
    atomic_save(ckpt, os.path.join(out, "gpt2_124m", "ckpt.pt"))
    return out, "gpt2_124m"


def stream_completion(url, prompt, max_tokens, progress=None):
    """One streaming POST /v1/completions (greedy) over a plain connection: (start time, arrival time of each
    chunk, completion tokens). progress: an Event set once 4 chunks have come (the request is mid-stream)."""
    from urllib.parse import urlparse
    import http.client
    u = urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=900)
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise BenchError(f"serve.py answered {resp.status}: {resp.read()[:200]}")
    times, tokens = [], None
    for line in resp:
        if line.startswith(b"data: {"):
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif chunk["choices"][0]["text"]:
                times.append(time.perf_counter())
                if progress is not None and len(times) == 4:
                    progress.set()
        elif line.startswith(b"data: [DONE]"):
            break
    conn.close()
    return t0, times, tokens


def concurrent_streams(url, prompts, n, max_tokens, late=None):
    """n streaming clients at once (threads), client i sending prompts[i]; with `late`, one more request (prompts[7],
    late max_tokens) sent once all n are mid-stream. Returns the n results and the late one's (stream_completion's)."""
    import threading
    res, marks = [None] * n, [threading.Event() for _ in range(n)]

    def client(i):
        res[i] = stream_completion(url, prompts[i], max_tokens, marks[i])
    threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    late_res = None
    if late:
        for m in marks:
            m.wait()
        late_res = stream_completion(url, prompts[7], late)
    for t in threads:
        t.join()
    return res, late_res


def sample_path_times(sampler, tok, prompt, n_new):
    """sample.py's path (Sampler.stream, greedy, this process): the time each piece of text was written."""
    times = []

    class Clock:
        def write(self, piece):
            if piece:
                times.append(time.perf_counter())

        def flush(self):
            pass
    sampler.stream([tok.eot_token] + tok.encode(prompt), n_new, stop_at_eot=False, out=Clock(), temperature=0)
    return times


def per_token(times, tokens):
    """Seconds a token from the first piece to the last: tokens - 1 decode steps (held-back text merges pieces)."""
    return (times[-1] - times[0]) / (tokens - 1)


def serve_figures(url, prompts, sampler, tok, n_new, repeats):
    """Each figure of section_serve, once per repeat, round-robin as `interleaved`: {name: [value per repeat]}."""
    concurrent_streams(url, prompts, 1, 4)  # warm-up: first-call costs on both sides
    sample_path_times(sampler, tok, prompts[0], n_new)
    figs = collections.defaultdict(list)
    for _ in range(repeats):
        (alone,), _ = concurrent_streams(url, prompts, 1, n_new)
        figs["alone_tps"].append(alone[2] / (alone[1][-1] - alone[0]))
        figs["serve_ms_per_token"].append(1000 * per_token(alone[1], alone[2]))
        many, _ = concurrent_streams(url, prompts, 8, n_new)
        figs["batch8_tps"].append(sum(r[2] for r in many) / (max(r[1][-1] for r in many) - min(r[0] for r in many)))
        figs["sample_ms_per_token"].append(1000 * per_token(sample_path_times(sampler, tok, prompts[0], n_new), n_new))
        _, late = concurrent_streams(url, prompts, 7, n_new, late=8)
        figs["ttft_busy_ms"].append(1000 * (late[1][0] - late[0]))
        (quiet,), _ = concurrent_streams(url, prompts, 1, 8)
        figs["ttft_alone_ms"].append(1000 * (quiet[1][0] - quiet[0]))
    return figs


def section_serve(ws, args):
    """serve.py at the GPT-2 124M shape (random weights, GPT-2's tokenizer), CPU, fp32, a real server process
    and HTTP streaming clients (threads here): aggregate tokens/s of 8 concurrent clients against one alone; the
    time to first token of a request that arrives while 7 others stream, against the same request alone; and the
    per-token latency of one stream against sample.py's path (the same engine in this process, no HTTP)."""
    import signal
    from checkpoint import load_model
    from sample import Sampler
    from tokenizer import Tokenizer
    n_new, repeats = (32, 2) if args.quick else (64, 3)
    out, name = served_checkpoint(ws)
    with open(ws.corpus("pride_and_prejudice_pg1342.txt")) as f:
        text = f.read()
    tok = Tokenizer("gpt2")
    prompts = [tok.decode(tok.encode(text[5000 + 700 * i:6000 + 700 * i])[:31]) for i in range(8)]  # + BOS: 32
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()), PYTHONUNBUFFERED="1")
    server = subprocess.Popen([sys.executable, "serve.py", "--out_dir", out, "--model_name", name, "--port", "0",
                               "--dtype", "float32", "--max_batch_size", "8"], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = server.stdout.readline()
        if " at http://" not in line:
            raise BenchError(f"serve.py did not start: {line}{server.stderr.read()[-300:]}")
        url = line.split(" at ")[1].split()[0]
        model, _, ckpt = load_model(name, out)
        figs = serve_figures(url, prompts, Sampler(model, tok, ckpt, "cpu", "float32"), tok, n_new, repeats)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
    med = {k: statistics.median(v) for k, v in figs.items()}
    res = {"new_tokens": n_new, "repeats": repeats, "median": med, "samples": dict(figs)}
    what = f"serve.py 124M (CPU, fp32, {n_new} new tokens, 32-token prompts)"
    speedup = med["batch8_tps"] / med["alone_tps"]
    overhead = med["serve_ms_per_token"] / med["sample_ms_per_token"]
    ratios = [b / a for a, b in zip(figs["alone_tps"], figs["batch8_tps"])]
    return [row(f"{what}: aggregate tokens/s, 8 concurrent streaming clients vs 1 alone", fmt_tps(med["batch8_tps"]),
                fmt_tps(med["alone_tps"]) + " (1 client)", f"{speedup:.2f}x", ">= 4x", speedup >= 4,
                f"per repeat {min(ratios):.2f}x-{max(ratios):.2f}x"),
            row(f"{what}: time to first token of a request arriving while 7 others stream, vs alone",
                f"{med['ttft_busy_ms']:.0f} ms", f"{med['ttft_alone_ms']:.0f} ms (alone)",
                f"{med['ttft_busy_ms'] / med['ttft_alone_ms']:.2f}x", "(reported)", None),
            row(f"{what}: per-token latency at batch 1, HTTP stream vs sample.py's path (same engine, no server)",
                f"{med['serve_ms_per_token']:.1f} ms/token", f"{med['sample_ms_per_token']:.1f} ms/token (sample.py)",
                f"{overhead:.2f}x", "<= 1.1x", overhead <= 1.1)], res


def section_prepare(ws, args):
    """prepare_dataset.prepare (gpt2, 2 workers, shards written) vs tiktoken's encode_ordinary_batch on the same
    text cut into the same ~1 MB blocks, both measured as tokens per second of the whole call."""
    import prepare_dataset
    from tokenizer import Tokenizer
    text = ""
    for name in ("tinyshakespeare.txt", "pride_and_prejudice_pg1342.txt"):
        with open(ws.corpus(name)) as f:
            text += f.read()
    text = text * (1 if args.quick else 16)  # 30 MB: long enough that starting the 2 workers (a fork of this
    # large process: its page tables are copied) is a small part, as it is for a real corpus
    src = os.path.join(ws.tmp, "prepare_input.txt")
    with open(src, "w") as f:
        f.write(text)
    blocks, start = [], 0  # newline-cut ~1 MB blocks, as prepare reads them
    while start < len(text):
        end = text.find("\n", start + prepare_dataset.BLOCK_BYTES)
        end = len(text) if end < 0 else end + 1
        blocks.append(text[start:end])
        start = end
    enc = Tokenizer("gpt2").enc
    counts = {}

    def run_prepare():
        out = os.path.join(ws.tmp, "prepare_out")
        meta = prepare_dataset.prepare([src], out, tokenization="gpt2", fmt="text", num_workers=2)
        counts["prepare"] = sum(s["tokens"] for s in meta["splits"].values())  # + one end-of-text per document

    def run_tiktoken():
        counts["tiktoken"] = sum(len(t) for t in enc.encode_ordinary_batch(blocks, num_threads=2))
    med, samples = interleaved({"prepare": run_prepare, "tiktoken": run_tiktoken}, repeats=3 if args.quick else 5)
    n = counts["tiktoken"]
    tps = {k: n / v for k, v in med.items()}
    ratio = tps["prepare"] / tps["tiktoken"]
    res = {"tokens": n, "prepare_tokens": counts["prepare"], "tokens_per_s": tps, "samples": samples, "ratio": ratio,
           "note": "CPU time is the parent's only: prepare's workers are other processes",
           "text_bytes": len(text.encode())}
    return [row(f"prepare_dataset, gpt2, 2 workers, {len(text.encode()) / 1e6:.1f} MB of text (CPU)",
                fmt_tps(tps["prepare"]), fmt_tps(tps["tiktoken"]) + " (tiktoken encode_ordinary_batch)",
                f"{ratio:.2f}x", ">= 0.8x", ratio >= 0.8)], res


def section_loader(ws, args):
    """BatchLoader.get_batch at the tiny shape vs the batches per second our training step consumes (the step
    timed here too, in its fastest setting)."""
    data = ws.shakespeare_char()
    B, T = TINY["batch_size"], TINY["block_size"]
    ld = loader(data, B, T)
    torch.manual_seed(0)
    model = our_model(TINY, ld.vocab_limit, T, False)
    opt = adamw(model)
    dtype = auto_dtype()
    step_batch = random_batches(ld.vocab_limit, B, T)  # the step without its own fetch: training's pure consumption
    med, samples = interleaved({"loader": ld.get_batch, "train step": lambda: our_step(model, opt, step_batch, autocast(dtype))},
                               repeats=5 if args.quick else 9, inner=20)
    rate = {k: 1 / v for k, v in med.items()}
    ratio = rate["loader"] / rate["train step"]
    res = {"batches_per_s": rate, "batches_per_cpu_s": cpu_rates(samples, 1), "samples": samples, "ratio": ratio,
           "dtype": dtype}
    return [row("loader, tiny shape (batch 12 x 64): batches/s", f"{rate['loader']:,.0f} batches/s",
                f"{rate['train step']:,.1f} batches/s (training consumes, {dtype})", f"{ratio:,.0f}x", ">= 20x",
                ratio >= 20)], res


def section_convert(ws, args):
    """hf.load_hf_gpt2 on a 124M checkpoint vs GPT2LMHeadModel.from_pretrained: time and peak memory, each
    in fresh processes (median of 3)."""
    hf_dir = ws.hf_checkpoint()
    runs = {"ours": [], "hf": []}
    for _ in range(2 if args.quick else 3):
        for side in runs:
            runs[side].append(probe({"kind": "convert", "side": side, "hf_dir": hf_dir}))
    med = {side: {k: statistics.median(r[k] for r in rs) for k in ("seconds", "peak_mb")} for side, rs in runs.items()}
    res = {"runs": runs, "median": med}
    o, h = med["ours"], med["hf"]
    what = "convert a 124M HF checkpoint (load_hf_gpt2 vs from_pretrained, fresh process)"
    return [row(f"{what}: seconds", f"{o['seconds']:.2f} s", f"{h['seconds']:.2f} s", f"{h['seconds'] / o['seconds']:.2f}x faster",
                "(reported)", None),
            row(f"{what}: peak memory", f"{o['peak_mb']:,.0f} MB", f"{h['peak_mb']:,.0f} MB",
                f"{o['peak_mb'] / h['peak_mb']:.2f}x", "(reported)", None)], res


def section_lora_memory(ws, args):
    """Peak memory of training the 124M shape at batch 4 x 256, LoRA (rank 16, every target) vs full fine-tuning,
    fresh process each (median of 2). 3 steps, because from the second step on full fine-tuning also holds
    AdamW's two moments while backward runs: the steady state of a real run. Both include the model's weights."""
    runs = {"lora": [], "full": []}
    for _ in range(2):
        for kind in runs:
            spec = {"kind": "train", "side": "ours", "shape": "124m", "vocab": 50304, "setting": "auto", "steps": 3}
            runs[kind].append(probe(dict(spec, lora_rank=16) if kind == "lora" else spec))
    med = {k: {m: statistics.median(r[m] for r in rs) for m in ("peak_mb", "step_mb")} for k, rs in runs.items()}
    ratio = med["lora"]["peak_mb"] / med["full"]["peak_mb"]
    step_ratio = med["lora"]["step_mb"] / med["full"]["step_mb"]
    res = {"runs": runs, "median": med, "ratio": ratio, "step_only_ratio": step_ratio}
    return [row("LoRA r16 (all targets) vs full fine-tuning, 124M, batch 4 x 256 (CPU): peak memory of training",
                f"{med['lora']['peak_mb']:,.0f} MB", f"{med['full']['peak_mb']:,.0f} MB (full)", f"{ratio:.2f}x",
                "<= 0.6x", ratio <= 0.6,
                f"3 steps, fresh process, weights included; above the loaded model alone: {med['lora']['step_mb']:,.0f} "
                f"vs {med['full']['step_mb']:,.0f} MB ({step_ratio:.2f}x)")], res


def act_ckpt_shapes():
    """{name: (shape, bias, batch_size)}: GPT-2 124M at batch 8, and the 250M_1024 presets' shape (read from the
    preset, so it stays theirs) at batch 4 (the preset's 16 would need ~20 GB without checkpointing); block 1024."""
    with open(os.path.join(ROOT, "configs", "250M_1024_pretrain.json")) as f:
        preset = json.load(f)
    return {"124M": (GPT2_124M, True, 8),
            "250M_1024": ({k: preset[k] for k in ("n_layer", "n_head", "n_embd")}, preset["bias"], 4)}


def section_act_ckpt(ws, args):
    """Activation checkpointing (train.py's activation_checkpointing: true): peak memory and seconds of one forward +
    backward at block 1024, with and without, fp32 (where the two losses must agree), each with train.py's CPU
    malloc setting for it (runtime.keep_freed_memory: large blocks mapped apart with checkpointing). Memory: one
    fresh process per figure (weights and gradients included). Speed: both in the "without" process, after its
    memory step, one warm step each (a step here is minutes: one repeat). 12 min on 2 AVX2 cores, 20 on one thread."""
    rows, res = [], {}
    for name, (shape, _, B) in act_ckpt_shapes().items():
        spec = {"kind": "act_ckpt", "shape": name, "time": False}
        off = probe(dict(spec, on=False, time=True), timeout=3600)
        on = probe(dict(spec, on=True), timeout=3600)
        ratio = on["peak_mb"] / off["peak_mb"]
        slower = off["seconds"]["on"] / off["seconds"]["off"]
        loss_diff = abs(on["loss"] - off["loss"])
        res[name] = {"off": off, "on": on, "peak_ratio": ratio, "time_ratio": slower, "loss_diff": loss_diff}
        what = (f"activation checkpointing, {name} {shape['n_layer']}x{shape['n_embd']}, batch {B} x 1024, fp32 "
                f"(CPU): ")
        target = "<= 0.5x" if name == "124M" else "(reported)"
        rows.append(row(what + "peak memory of a forward + backward", f"{on['peak_mb']:,.0f} MB",
                        f"{off['peak_mb']:,.0f} MB (without)", f"{ratio:.2f}x", target,
                        ratio <= 0.5 if name == "124M" else None,
                        f"fresh process, weights and gradients included; the step alone: {on['step_mb']:,.0f} vs "
                        f"{off['step_mb']:,.0f} MB ({on['step_mb'] / off['step_mb']:.2f}x)"))
        rows.append(row(what + "seconds per forward + backward", f"{off['seconds']['on']:.1f} s",
                        f"{off['seconds']['off']:.1f} s (without)", f"{slower:.2f}x", "(reported)", None,
                        f"CPU time {off['cpu_seconds']['on']:.1f} vs {off['cpu_seconds']['off']:.1f} s"))
        rows.append(row(what + "loss, with vs without", f"{on['loss']:.6f}", f"{off['loss']:.6f}",
                        f"diff {loss_diff:.1e}", "<= 1e-5", loss_diff <= 1e-5,
                        f"gradient norm {on['grad_norm']:.6f} vs {off['grad_norm']:.6f}"))
    return rows, res


def section_train_gpu(ws, args):
    """On CUDA: the 124M shape at block 1024 in bf16, ours compiled (train.py's default there) vs transformers
    (bf16 autocast, sdpa) as it comes and compiled too, tokens/s, MFU against the GPU's bf16 peak, peak memory."""
    if not torch.cuda.is_available():
        raise BenchError("train_gpu needs a CUDA GPU: run it on a GPU machine")
    device = "cuda"
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    B, T = args.gpu_batch_size, 1024
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in (("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L4", 121e12),
                                ("A10", 125e12), ("4090", 165e12)) if k in name), None)  # dense bf16 FLOP/s
    # MFU: the same FLOP count per token (6N + attention, PaLM's formula, at our padded vocab) for every side
    flops_model = our_model(GPT2_124M, 50304, T, True)
    results = {}
    for side in ("ours", "transformers", "transformers compiled"):
        torch.manual_seed(0)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        gb = random_batches(50257, B, T, device)
        if side == "ours":
            model = our_model(GPT2_124M, 50304, T, True, device)
            opt = adamw(model, "cuda")
            step_model = torch.compile(model)
            t = time.perf_counter()
            step = lambda: our_step(step_model, opt, gb, autocast("bfloat16", device))  # noqa: E731
        else:
            model = hf_model(GPT2_124M, 50257, T, device)
            model.set_attn_implementation("sdpa")
            opt = adamw(model, "cuda")
            step_model = torch.compile(model) if side.endswith("compiled") else model
            t = time.perf_counter()
            step = lambda: hf_step(step_model, opt, gb, autocast("bfloat16", device))  # noqa: E731
        step()
        step()
        torch.cuda.synchronize()
        warm_s = time.perf_counter() - t
        med, samples = interleaved({side: step}, repeats=5, inner=10, warmup=0, device=device)
        tps = B * T / med[side]
        results[side] = {"tokens_per_s": tps, "warmup_seconds": warm_s, "samples": samples,
                         "mfu": flops_model.estimate_mfu(tps, peak) if peak else None,
                         "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30}
        del model, opt, step, step_model
    # the sides are timed one after the other here (a GPU is not shared the way these CPUs are)
    o = results["ours"]
    res = {"gpu": name, "batch_size": B, "block_size": T, "peak_flops": peak, **results}
    rows = []
    mfu = lambda r: f", MFU {100 * r['mfu']:.1f}%" if r["mfu"] is not None else ""  # noqa: E731
    for ref in ("transformers", "transformers compiled"):
        h = results[ref]
        ratio = o["tokens_per_s"] / h["tokens_per_s"]
        res[f"ratio vs {ref}"] = ratio
        rows.append(row(f"124M, block 1024, batch {B}, bf16 ({name}): training tokens/s vs {ref}",
                        f"{fmt_tps(o['tokens_per_s'])} (compiled{mfu(o)}, {o['peak_mem_gb']:.1f} GiB)",
                        f"{fmt_tps(h['tokens_per_s'])} ({ref}{mfu(h)}, {h['peak_mem_gb']:.1f} GiB)", f"{ratio:.2f}x",
                        "(reported)", None))
    return rows, res


# ---------------------------------------------------------------------------------------------------------------
# fresh-process measurements

def run_probe(spec):
    """One measurement in this (fresh) process; prints a JSON line. peak_mb: the peak RSS above the process's size
    after its imports (for training also after one throwaway step of a 1-layer model, so that lazy imports and
    one-time allocations of either library are not counted as the model's); step_mb: the peak of the steps above
    the size once the model and optimizer are built."""
    import gc
    import transformers  # noqa: F401  (both sides pay the same imports)
    import runtime
    if spec["kind"] != "convert":
        runtime.keep_freed_memory()  # as train.py does: the memory figures are its
    if spec["kind"] == "convert":
        base = reset_peak_rss()
        t = time.perf_counter()
        if spec["side"] == "ours":
            from hf import load_hf_gpt2
            load_hf_gpt2(spec["hf_dir"])
        else:
            from transformers import GPT2LMHeadModel
            GPT2LMHeadModel.from_pretrained(spec["hf_dir"])
        print(json.dumps({"seconds": time.perf_counter() - t, "peak_mb": peak_rss_mb() - base}))
        return
    if spec["kind"] == "act_ckpt":
        return act_ckpt_probe(spec)
    shape, B, T = (TINY, TINY["batch_size"], TINY["block_size"]) if spec["shape"] == "tiny" else (GPT2_124M, 4, 256)
    setting = spec["setting"]
    if setting == "auto":
        setting = auto_dtype()
    dtype, _, impl = setting.partition(" ")

    def build(shape, vocab, T, B):
        torch.manual_seed(0)
        if spec["side"] == "ours":
            model = our_model(shape, vocab, T, spec["shape"] != "tiny")
            if spec.get("lora_rank"):
                import lora
                lora.apply_lora(model, rank=spec["lora_rank"], alpha=2.0 * spec["lora_rank"], targets="all")
            opt, get_batch = adamw(model), random_batches(vocab, B, T)
            return lambda: our_step(model, opt, get_batch, autocast(dtype))
        model = hf_model(shape, vocab, T)
        model.set_attn_implementation(impl or "sdpa")
        opt, get_batch = adamw(model), random_batches(vocab, B, T)
        return lambda: hf_step(model, opt, get_batch, autocast(dtype))
    # a throwaway step of a 1-layer model first: lazy imports and one-time allocations of the library are not
    # the model's memory
    vocab = spec["vocab"] if spec["side"] == "ours" else spec["hf_vocab"]
    build(dict(n_layer=1, n_head=1, n_embd=16), vocab, 8, 1)()
    gc.collect()
    base = reset_peak_rss()
    step = build(shape, vocab, T, B)
    built_peak = peak_rss_mb() - base
    built = reset_peak_rss()
    for _ in range(spec.get("steps", 3)):
        step()
    step_mb = peak_rss_mb() - built
    print(json.dumps({"peak_mb": max(built_peak, built - base + step_mb), "step_mb": step_mb}))


def act_ckpt_probe(spec):
    """section_act_ckpt's fresh process: the model built (seeded), then one fp32 forward + backward with or without
    activation checkpointing, its peak RSS (above the size after the imports: weights and gradients included; and
    above the built model: the step's own), loss and gradient norm; with "time", then one warm step each way."""
    import gc
    from runtime import forward_backward, keep_freed_memory
    shape, bias, B = act_ckpt_shapes()[spec["shape"]]
    keep_freed_memory(map_large_blocks=spec["on"])  # before the model is built, as train.py sets it
    # a throwaway checkpointed step of a 1-layer model first: lazy imports and one-time allocations are not the
    # model's memory
    small = our_model(dict(n_layer=1, n_head=1, n_embd=16), 64, 8, bias).set_activation_checkpointing(True)
    forward_backward(small, [random_batches(64, 1, 8)()], False)
    del small
    gc.collect()
    base = reset_peak_rss()
    torch.manual_seed(0)
    model = our_model(shape, 50304, 1024, bias)
    batch = random_batches(50304, B, 1024)()

    def step(on):
        keep_freed_memory(map_large_blocks=on)  # train.py's malloc setting for each (runtime.keep_freed_memory)
        model.set_activation_checkpointing(on)
        model.zero_grad(set_to_none=True)
        gc.collect()
        return forward_backward(model, [batch], False)
    built = reset_peak_rss()
    loss = step(spec["on"])
    step_mb = peak_rss_mb() - built
    out = {"peak_mb": built - base + step_mb, "step_mb": step_mb, "loss": loss,
           "grad_norm": math.sqrt(sum(p.grad.double().pow(2).sum().item() for p in model.parameters()))}
    if spec["time"]:
        med, samples = interleaved({"on": lambda: step(True), "off": lambda: step(False)}, repeats=1, warmup=0)
        out["seconds"] = med
        out["cpu_seconds"] = {k: v["cpu"][0] for k, v in samples.items()}
    print(json.dumps(out))


# ---------------------------------------------------------------------------------------------------------------

def markdown(rows, header):
    """The table; the FLOP/s column (training rows: achieved FLOP/s, % of the CPU's peak in the row's dtype) only
    when some row has it."""
    flops = any(r.get("flops") for r in rows)
    cols = ["measurement", "ours", "reference", "ratio", "target", "met"]
    cols += ["GFLOP/s (% of CPU peak) ours / ref"] if flops else []
    out = [header, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        met = "" if r["ok"] is None else ("yes" if r["ok"] else "**no**")
        note = f" ({r['note']})" if r["note"] else ""
        cells = [f"{r['what']}{note}", r["ours"], r["reference"], r["ratio"], r["target"], met]
        cells += [r.get("flops", "")] if flops else []
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def details(results):
    """Every setting's figure, for the curious (the table keeps the fastest of each side)."""
    lines = []
    for name, res in results.items():
        for key in ("tokens_per_s", "tokens_per_cpu_s", "batches_per_s", "batches_per_cpu_s"):
            if isinstance(res.get(key), dict):
                lines.append(f"- {name}: " + ", ".join(f"{k} {v:,.1f}" for k, v in res[key].items()) + f" ({key.replace('_', ' ')})")
    return "\n".join(lines)


@one_line_errors
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", default=",".join(SECTIONS),
                   help=f"comma-separated, from: {', '.join(SECTIONS + EXTRA_SECTIONS)} (default: {', '.join(SECTIONS)})")
    p.add_argument("--json", default=None, help="also write every raw figure to this JSON file")
    p.add_argument("--quick", action="store_true", help="fewer repeats and tokens (a smoke run, noisier figures)")
    p.add_argument("--no_memory", action="store_true", help="skip the fresh-process peak-memory runs of training")
    p.add_argument("--corpus_dir", default=os.path.join(SHARED, "corpora"))
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    p.add_argument("--gpu_batch_size", type=int, default=16)
    p.add_argument("--nanogpt_dir", default=None,
                   help="a clone of karpathy/nanoGPT, for the classic section (its own train.py is the reference)")
    p.add_argument("--all_dtypes", action="store_true",
                   help="time bf16 candidates even on a CPU that only emulates bf16 (no avx512_bf16/amx_bf16): slow")
    p.add_argument("--probe", default=None, help=argparse.SUPPRESS)  # internal: one fresh-process measurement
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.probe:
        run_probe(json.loads(args.probe))
        return
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in sections if s not in SECTIONS + EXTRA_SECTIONS]
    if unknown:
        raise BenchError(f"unknown section '{unknown[0]}': choose from {', '.join(SECTIONS + EXTRA_SECTIONS)}")
    sections.sort(key=(SECTIONS + EXTRA_SECTIONS).index)  # the sections without models first (see the loop)
    import platform
    import runtime
    args.cpu = runtime.cpu_facts()  # after --threads: the cores the peak counts are the threads torch uses
    args.dtypes, skipped = timed_dtypes(args.cpu, args.all_dtypes)
    header = (f"bench.py ({' '.join(sys.argv[1:]) or 'all CPU sections'}): torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start")
    print(header + "\n" + cpu_header(args.cpu), file=sys.stderr, flush=True)
    rows, results = [], {}
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        ws = Workspace(tmp, args.corpus_dir)
        for name in sections:
            if name not in NO_MODEL_SECTIONS:
                # the malloc setting train.py and sample.py make on CPU (runtime.keep_freed_memory), for every candidate
                # alike: in one process they share the allocator, and without it a step's speed depends on which
                # candidate ran before. prepare_dataset.py and convert_hf.py do not make it, so their sections run
                # first. Setting it again is a no-op.
                runtime.keep_freed_memory()
            t = time.perf_counter()
            print(f"[{name}] ...", file=sys.stderr, flush=True)
            if skipped and name in SKIPS_BF16:
                print(f"[{name}] {skipped}", file=sys.stderr, flush=True)
            r, res = globals()[f"section_{name}"](ws, args)
            res["seconds"] = time.perf_counter() - t
            if skipped and name in SKIPS_BF16:
                res["skipped"] = skipped
            rows += r
            results[name] = res
            print(f"[{name}] done in {res['seconds']:.0f} s", file=sys.stderr, flush=True)
    header += f"; load average {os.getloadavg()[0]:.1f} at the end\n" + cpu_header(args.cpu)
    header += "".join(f"\n[{n}] {res['skipped']}" for n, res in results.items() if res.get("skipped"))
    print(markdown(rows, header))
    print()
    print(details(results))
    if args.json:
        tmp_json = args.json + ".tmp"
        with open(tmp_json, "w") as f:
            json.dump({"header": header, "cpu": args.cpu, "rows": rows, "results": results}, f, indent=1, default=str)
        os.replace(tmp_json, args.json)


if __name__ == "__main__":
    main()
