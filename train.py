"""
The training loop: pretraining, chat SFT (masked loss), full / LoRA / XGBLoRA fine-tuning, MeZO, BOS zero,
one process or many under torchrun (DDP, FSDP).

    python train.py --config_file configs/tiny_sft.json                       # the shipped sample conversations
    python train.py --config_file configs/tiny.json --dataset_dir data/shakespeare_char --max_iters 500
    python train.py --config_file configs/tiny_sft.json --init_from_model base_tiny --model_name chat_tiny
    python train.py --config_file configs/gpt2_lora_sft.json --init_from path/to/hf_gpt2_dir
    python train.py --config_file configs/tiny.json --init_from resume        # go on from checkpoints/<model_name>
    torchrun --standalone --nproc_per_node=2 train.py --config_file configs/tiny.json

Every key of config.TrainConfig can be set in the JSON preset and overridden as --key value.
"""

import ctypes
import gc
import json
import math
import os
import random
import signal
import sys
import time
from contextlib import contextmanager, nullcontext

import numpy as np
import torch
import torch.distributed as dist

import lora
import mezo
from checkpoint import CheckpointError, atomic_save, build_model, find_checkpoint, load_checkpoint, model_dir
from config import ConfigError, config_dict, load_config, parse_cli
from data import BatchLoader, DataError, PackedLoader, model_inputs, read_metadata
from model import GPT, GPTConfig
from tokenizer import Tokenizer

SAMPLE_DATASET = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "sample_chat")
ARCH_KEYS = ("n_layer", "n_head", "n_embd", "vocab_size", "bias")
RESUME_KEYS = ARCH_KEYS + ("block_size", "finetuning_type", "lora_rank", "lora_target", "trainer",
                           "use_bos_zero_training", "bos_scaling_factor", "init_from_model", "packing")


class TrainError(RuntimeError):
    """A problem with the run as configured: the message says what and how to fix it."""


# ---------------------------------------------------------------------------------------------------------------
# setup: devices, distributed, precision

def setup_distributed(cfg):
    """Rank, world size and device. Under torchrun (RANK set) this joins the process group: NCCL on CUDA, gloo on
    CPU. Each rank drives one device."""
    ddp = int(os.environ.get("RANK", -1)) != -1
    if ddp:
        backend = cfg.backend if cfg.backend != "auto" else ("nccl" if torch.cuda.is_available() and cfg.device != "cpu" else "gloo")
        dist.init_process_group(backend=backend)
        rank, world, local = dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))
        device = f"cuda:{local}" if backend == "nccl" else "cpu"
        if device.startswith("cuda"):
            torch.cuda.set_device(device)
        return ddp, rank, world, device
    device = cfg.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else ("mps" if torch.backends.mps.is_available() else "cpu")
    return ddp, 0, 1, device


def pick_dtype(cfg, device_type):
    """auto: bf16 autocast on CUDA GPUs that have it (else fp16 with a grad scaler) and on CPUs with native bf16
    matmuls (AVX512-BF16 / AMX: measured faster here at every shape we train); fp32 elsewhere."""
    if cfg.dtype != "auto":
        return cfg.dtype
    if device_type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    if device_type == "cpu" and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()):
        return "bfloat16"
    return "float32"


def autocast_context(device_type, dtype):
    if dtype == "float32" or device_type == "mps":
        return nullcontext()
    return torch.autocast(device_type=device_type, dtype={"bfloat16": torch.bfloat16, "float16": torch.float16}[dtype])


def keep_freed_memory():
    """CPU training: ask glibc's malloc to keep the memory a step frees for the next step. Footgun: by default it
    hands every block over 32 MB (activations, logits) back to the kernel with munmap and asks for it again with
    mmap, and the kernel zero-fills each page on its first touch, every step: 15-20% of a GPT-2 124M step on this
    CPU (1.61 -> 1.37 s at batch 4 x 256, bf16). Taking all memory from the heap and never trimming it keeps the
    process at its peak size, which a training process reaches every step anyway. No-op where glibc is absent."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_max = -1, -4  # glibc's mallopt parameter numbers (malloc.h)
        return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2 ** 31 - 1))
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


def get_lr(it, cfg):
    """Linear warmup for warmup_iters, cosine decay to min_lr at lr_decay_iters, then min_lr."""
    if not cfg.decay_lr:
        return cfg.learning_rate
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if it >= cfg.lr_decay_iters:
        return cfg.min_lr
    ratio = (it - cfg.warmup_iters) / max(1, cfg.lr_decay_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.learning_rate - cfg.min_lr)


# ---------------------------------------------------------------------------------------------------------------
# the dataset and the model

def resolve_dataset(cfg, log):
    """The dataset folder; with none given, the project's shipped sample conversations (prepared on first use)."""
    if cfg.dataset_dir:
        return cfg.dataset_dir
    meta_path = os.path.join(SAMPLE_DATASET, "dataset_metadata.json")
    if not os.path.exists(meta_path) or (cfg.packing and not read_metadata(SAMPLE_DATASET).get("has_starts")):
        import prepare_dataset
        log(f"no --dataset_dir: preparing the shipped sample conversations into {SAMPLE_DATASET}")
        prepare_dataset.prepare([SAMPLE_DATASET + ".jsonl"], SAMPLE_DATASET, tokenization="char", fmt="chat")
    return SAMPLE_DATASET


def padded_vocab(n):
    return ((n + 63) // 64) * 64  # a multiple of 64 makes the embedding/lm_head matmuls faster


def build_fresh(cfg, tok, log):
    """A new model from the config, or one started from another model / a Hugging Face checkpoint."""
    notes = []
    base = None
    if cfg.init_from not in ("scratch", "resume"):  # a Hugging Face GPT-2 directory or hub id
        from convert_hf import load_hf_gpt2
        if tok.kind != "gpt2":
            raise TrainError(f"--init_from {cfg.init_from} is a GPT-2 checkpoint, which needs gpt2-tokenized data, but "
                             f"the dataset uses '{tok.kind}': prepare it with --tokenization gpt2")
        model, _ = load_hf_gpt2(cfg.init_from)
        base = {"kind": "hf", "path": os.path.abspath(cfg.init_from) if os.path.isdir(cfg.init_from) else cfg.init_from}
        notes.append(f"weights and architecture from Hugging Face checkpoint {cfg.init_from}")
    elif cfg.init_from_model:
        ckpt = load_checkpoint(find_checkpoint(cfg.init_from_model, cfg.out_dir))
        model = build_model(ckpt, cfg.out_dir)
        lora.remove_lora(model)  # a LoRA base is merged: the new run starts from its effective weights
        if Tokenizer.from_state(ckpt["tokenizer"]).state_dict() != tok.state_dict():
            raise TrainError(f"model '{cfg.init_from_model}' was trained with another tokenizer than the dataset "
                             f"{cfg.dataset_dir or SAMPLE_DATASET}: prepare the data with the base model's tokenizer")
        base = {"kind": "model", "name": cfg.init_from_model}
        notes.append(f"weights and architecture from model '{cfg.init_from_model}' (iteration {ckpt.get('iter_num')})")
    else:
        vocab = cfg.vocab_size or padded_vocab(tok.vocab_size)
        if vocab < tok.vocab_size:
            raise TrainError(f"vocab_size {vocab} is smaller than the tokenizer's {tok.vocab_size}: raise it or set 0 (auto)")
        mc = GPTConfig(block_size=cfg.block_size, vocab_size=vocab, n_layer=cfg.n_layer, n_head=cfg.n_head,
                       n_embd=cfg.n_embd, dropout=cfg.dropout, bias=cfg.bias)
        return GPT(mc), None, notes
    # fine-tuning an existing model: its architecture wins, this config's training settings apply
    mc = model.config
    for key in ARCH_KEYS:
        if key != "vocab_size" and getattr(cfg, key) != getattr(mc, key):
            notes.append(f"{key}: config says {getattr(cfg, key)}, kept the base model's {getattr(mc, key)}")
    if model.config.vocab_size < tok.vocab_size:
        raise TrainError(f"the base model's vocab_size {mc.vocab_size} is smaller than the dataset tokenizer's {tok.vocab_size}")
    if cfg.block_size > mc.block_size:
        raise TrainError(f"block_size {cfg.block_size} is larger than the base model's {mc.block_size}: a fine-tune "
                         f"can only use up to {mc.block_size} (set --block_size {mc.block_size} or less)")
    if cfg.block_size < mc.block_size:
        notes.append(f"block_size: cropped the base's {mc.block_size} to {cfg.block_size}")
        model.crop_block_size(cfg.block_size)
    if cfg.dropout != mc.dropout:
        notes.append(f"dropout: {mc.dropout} -> {cfg.dropout} in every layer")
        model.set_dropout(cfg.dropout)
    return model, base, notes


def apply_finetuning(model, cfg, merge_count=0):
    """Put LoRA / XGBLoRA adapters on the model (freezing the rest). Returns the lora kwargs (None for full)."""
    if cfg.finetuning_type == "full":
        return None
    if cfg.finetuning_type == "lora":
        kwargs = dict(rank=cfg.lora_rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, targets=cfg.lora_target)
    else:  # xgblora: one rank-1 booster; K random layers per booster when asked (the paper's layer sampling)
        layers = None
        if cfg.xgblora_layers_per_iteration > model.config.n_layer:
            raise TrainError(f"xgblora_layers_per_iteration {cfg.xgblora_layers_per_iteration} is more than the model's "
                             f"{model.config.n_layer} layers: set it to {model.config.n_layer} or less (0 = every layer)")
        if cfg.xgblora_layers_per_iteration:
            rng = random.Random(cfg.seed * 100003 + merge_count)  # derived from the merge count: resume needs no state
            layers = sorted(rng.sample(range(model.config.n_layer), cfg.xgblora_layers_per_iteration))
        kwargs = dict(rank=1, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, targets=cfg.lora_target, layers=layers)
    lora.apply_lora(model, **kwargs)
    return kwargs


def xgblora_due(iter_num, cfg, steps_per_epoch):
    """Merge after this optimizer step? Every N steps, or (N = 0) at the end of every `merge_frequency` epochs,
    an epoch being ceil(train tokens / tokens per optimizer step) steps."""
    if cfg.finetuning_type != "xgblora" or iter_num == 0:
        return False
    every = cfg.xgblora_steps_per_iteration or steps_per_epoch * cfg.xgblora_merge_frequency
    return iter_num % every == 0


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
                _, loss_sum = model(batch[0], batch[1], batch[2] if use_loss_mask else None, loss_reduction="sum",
                                    loss_only=True, **model_inputs(batch))
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
    for p in model.parameters():
        if p.grad is not None:
            p.grad.mul_(world / count)  # DDP averaged the grads over ranks: undo that, divide by the global count
    return (stats[0] / count).item()


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
            pts = [(r["iter"], r[key]) for r in rows if key in r]
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


# ---------------------------------------------------------------------------------------------------------------

def train(cfg, log=print):
    """Run training as configured. Returns a summary dict (final losses, iterations, paths)."""
    try:
        return _train(cfg, log)
    finally:
        if dist.is_available() and dist.is_initialized():
            # Footgun: destroy_process_group only drops c10d's own reference. The DDP reducer, FSDP's state and the
            # optimizer's sharded tensors hold the gloo group too; if it dies only at interpreter exit, its worker
            # threads are torn down mid-finalisation and the process aborts (SIGABRT, "terminate called without an
            # active exception") after a finished run. _train's frame is gone now: collect its cycles first.
            gc.collect()
            dist.destroy_process_group()


def _train(cfg, log):
    ddp, rank, world, device = setup_distributed(cfg)
    master = rank == 0
    log = log if master else (lambda *a, **k: None)
    device_type = "cuda" if device.startswith("cuda") else device
    fsdp = cfg.fsdp and ddp
    if cfg.fsdp and not ddp:
        log("note: fsdp is on but this is a single process (no torchrun): training without sharding")
    if fsdp and (cfg.finetuning_type == "xgblora" or cfg.dtype == "float16"):
        raise TrainError(f"fsdp does not support {'finetuning_type xgblora' if cfg.dtype != 'float16' else 'dtype float16'} "
                         f"(its merges rebuild layers / its grad scaler is not sharded): use DDP (fsdp false) for it")
    torch.manual_seed(cfg.seed + (0 if fsdp else rank))  # FSDP shards each rank's own copy: all must build the same
    np.random.seed(cfg.seed + rank)
    random.seed(cfg.seed + rank)
    if device_type == "cpu":
        keep_freed_memory()
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls: free speed on Ampere+ at no visible loss cost
        torch.backends.cudnn.allow_tf32 = True
    dtype = pick_dtype(cfg, device_type)
    ctx = autocast_context(device_type, dtype)
    if cfg.finetuning_type != "full":  # before any model is loaded (a GPT-2 base takes a while)
        try:
            lora._check_targets(cfg.lora_target)
        except ValueError as e:
            raise ConfigError(f"config: 'lora_target' = {cfg.lora_target!r}: {e}") from None

    dataset_dir = resolve_dataset(cfg, log) if master or cfg.dataset_dir else SAMPLE_DATASET
    if ddp and not cfg.dataset_dir:
        dist.barrier()  # rank 0 may be preparing the sample dataset
    meta = read_metadata(dataset_dir)
    tok = Tokenizer.load(os.path.join(dataset_dir, "tokenizer_state.json"))
    folder = model_dir(cfg.out_dir, cfg.model_name)
    ckpt_path = os.path.join(folder, "ckpt.pt")

    # --- model: fresh, fine-tuned from a base, or resumed ---
    resume = cfg.init_from == "resume"
    merge_count, iter_num, best_val = 0, 0, float("inf")
    if resume:
        if not os.path.exists(ckpt_path):
            raise TrainError(f"--init_from resume: no checkpoint at {ckpt_path} (train model '{cfg.model_name}' first)")
        ckpt = load_checkpoint(ckpt_path)
        old = ckpt["config"]
        for key in RESUME_KEYS:
            if key in old and old[key] != getattr(cfg, key):
                raise TrainError(f"{ckpt_path}: resuming with a different setting: '{key}' is {getattr(cfg, key)!r} now "
                                 f"but {old[key]!r} in the checkpoint; use the config the run started with")
        trained_with = {k: v for k, v in ckpt["tokenizer"].items() if k != "hf_dir"}  # the ids matter, not a path
        if trained_with != {k: v for k, v in tok.state_dict().items() if k != "hf_dir"}:
            raise TrainError(f"{ckpt_path}: the run was trained with another tokenizer than the dataset {dataset_dir} "
                             f"uses ({tok.kind}): resume with the dataset_dir the run started with")
        model = build_model(ckpt, cfg.out_dir)  # out_dir: a LoRA base named by model name lives there
        lora_kwargs, base = ckpt.get("lora"), ckpt.get("base")
        iter_num, best_val = ckpt["iter_num"], ckpt.get("best_val_loss") or float("inf")
        merge_count = ckpt.get("xgblora_merges", 0)
        if cfg.finetuning_type == "full":
            for p in model.parameters():
                p.requires_grad_(True)
        log(f"resuming {cfg.model_name} from iteration {iter_num}")
    else:
        model, base, notes = build_fresh(cfg, tok, log)
        for n in notes:
            log(f"init: {n}")
        lora_kwargs = apply_finetuning(model, cfg)
    model.config.use_bos_zero_training = cfg.use_bos_zero_training
    model.config.bos_scaling_factor = cfg.bos_scaling_factor
    if cfg.finetuning_type == "xgblora" and cfg.lora_rank != 1 and not resume:
        log(f"warning: finetuning_type xgblora trains rank-1 boosters; lora_rank {cfg.lora_rank} is ignored")
    if fsdp:
        shard_model(model, device_type, world)  # each rank's shard goes to its device: the model is never whole there
        torch.manual_seed(cfg.seed + rank)  # the ranks' dropout differs again
    else:
        model.to(device)
    trainable, total = lora.count_parameters(model)
    log(f"number of parameters: {total / 1e6:.2f}M (trainable {trainable:,}, {100 * trainable / total:.2f}%)")

    # --- data ---
    if cfg.use_loss_mask and not meta.get("has_mask"):
        expected = [os.path.join(dataset_dir, "train", s["file"][:-4] + "_mask.bin") for s in meta["splits"]["train"]["shards"]]
        raise DataError(f"use_loss_mask is on but {dataset_dir} has no mask shards (expected {', '.join(expected[:2])}"
                        f"{' ...' if len(expected) > 2 else ''}): prepare it with --format chat, or set use_loss_mask false")
    if cfg.block_size > model.config.block_size:
        raise TrainError(f"block_size {cfg.block_size} is larger than the model's {model.config.block_size}")
    loader_args = dict(batch_size=cfg.batch_size, block_size=cfg.block_size, device=device, use_mask=cfg.use_loss_mask,
                       prepend_bos=cfg.use_bos_zero_training, bos_token=tok.eot_token,
                       model_vocab_size=model.config.vocab_size)
    packed_args = {k: v for k, v in loader_args.items() if k != "prepend_bos"}  # a packed row starts at a BOS

    def make_loader(split, seed, accum=1):
        if cfg.packing:  # whole conversations per row: the same plan on every rank, each taking its own rows
            return PackedLoader(dataset_dir, split, seed=seed, rank=rank, world=world, accum=accum, **packed_args)
        return BatchLoader(dataset_dir, split, seed=seed, rank=rank, **loader_args)
    train_loader = make_loader("train", cfg.seed, cfg.gradient_accumulation_steps)
    tokens_per_step = cfg.batch_size * cfg.block_size * cfg.gradient_accumulation_steps * world
    steps_per_epoch = max(1, math.ceil(train_loader.data.num_tokens / tokens_per_step))
    if cfg.packing:  # a real pass over every conversation; XGBLoRA's epoch merges count these
        steps_per_epoch = train_loader.steps_per_epoch
        log(train_loader.summary())
    log(f"data: {dataset_dir} ({meta.get('tokenization')}, train {train_loader.data.num_tokens:,} tokens); "
        f"{tokens_per_step:,} tokens per step, {steps_per_epoch} steps per epoch; dtype {dtype} on {device}")

    # --- optimizer, wrappers ---
    raw_model = model
    optimizer = None
    if cfg.trainer == "regular":
        optimizer = raw_model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2), device_type)
        if resume and ckpt.get("optimizer"):
            load_optimizer_state(raw_model, optimizer, ckpt["optimizer"], fsdp)
    scaler = torch.amp.GradScaler("cuda", enabled=(dtype == "float16" and device_type == "cuda"))
    if resume:
        if rank < len(ckpt["loader"]):  # a rank the saved run did not have keeps its own fresh stream (not rank 0's)
            train_loader.load_state_dict(ckpt["loader"][rank])
        if "rng" in ckpt:
            torch.set_rng_state(ckpt["rng"]["torch"][rank % len(ckpt["rng"]["torch"])])
        if resume and scaler.is_enabled() and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        del ckpt
    use_compile = cfg.compile if cfg.compile is not None else device_type == "cuda"

    def wrap(m):
        if use_compile:
            m = torch.compile(m)
        if ddp and not fsdp:  # FSDP already wraps the model in place (shard_model)
            from torch.nn.parallel import DistributedDataParallel as DDP
            m = DDP(m, device_ids=[int(device.split(":")[1])] if device_type == "cuda" else None)
        return m
    model = wrap(raw_model)

    # --- bookkeeping ---
    if master:
        os.makedirs(folder, exist_ok=True)
        for fname in os.listdir(folder):  # temp files of a save that a killed process never finished
            if ".tmp" in fname:
                os.remove(os.path.join(folder, fname))
        with open(os.path.join(folder, "config.json.tmp"), "w") as f:
            json.dump(config_dict(cfg), f, indent=2)
        os.replace(os.path.join(folder, "config.json.tmp"), os.path.join(folder, "config.json"))
        tok.save(os.path.join(folder, "tokenizer_state.json"))
    metrics = MetricsLog(folder, iter_num, master)
    stop_signal = []

    def on_signal(signum, frame):
        stop_signal.append(signum)  # finish the current step, save, exit
    old_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}

    def make_ckpt(with_state):
        state_model = full_model_state(raw_model) if fsdp else raw_model.state_dict()
        if cfg.finetuning_type == "lora" and base is not None:  # adapters only; the base is named in "base"
            adapters = lora.lora_state_dict(raw_model)
            state_model = {k: v for k, v in state_model.items() if k in adapters}
        ck = {"model": state_model, "model_args": dict(vars(raw_model.config)), "config": config_dict(cfg),
              "tokenizer": tok.state_dict(), "iter_num": iter_num, "best_val_loss": None if best_val == float("inf") else best_val,
              "lora": lora_kwargs, "base": base if cfg.finetuning_type == "lora" else None,
              "xgblora_merges": merge_count, "data_format": meta.get("format", "text"), "format_version": 1}
        if with_state:
            ck["optimizer"] = optimizer_state(raw_model, optimizer, fsdp) if optimizer is not None else None
            ck["scaler"] = scaler.state_dict() if scaler.is_enabled() else None
            loaders = [train_loader.state_dict()]
            rngs = [torch.get_rng_state()]
            if ddp:  # every rank's sampling and dropout RNG, so a resumed DDP run is exact too
                gathered = [None] * world
                dist.all_gather_object(gathered, (loaders[0], rngs[0]))
                loaders, rngs = [g[0] for g in gathered], [g[1] for g in gathered]
            ck["loader"] = loaders
            ck["rng"] = {"torch": rngs}
        return ck

    def save(best=False):
        ck = make_ckpt(with_state=True)
        if master:
            atomic_save(ck, ckpt_path)
            if best:
                ck.pop("optimizer", None)
                atomic_save(ck, os.path.join(folder, "best.pt"))

    @torch.no_grad()
    def evaluate():
        """Mean loss per split over eval_iters fixed batches (the same windows at every evaluation, so the curve is not
        sampling noise), weighted by target count (masked targets when use_loss_mask). Reduced across ranks."""
        out = {}
        raw_model.eval()
        for split in ("train", "val"):
            loader = make_loader(split, cfg.seed + 999)
            total = torch.zeros(2, device=device)
            for _ in range(cfg.eval_iters):
                batch = loader.get_batch()
                with ctx:
                    _, loss_sum = raw_model(batch[0], batch[1], batch[2] if cfg.use_loss_mask else None, loss_reduction="sum",
                                            **model_inputs(batch))
                count = batch[2].sum() if cfg.use_loss_mask else (batch[1] != -1).sum()
                total += torch.stack([loss_sum.float(), count.float().to(device)])
            if ddp:
                dist.all_reduce(total)
            out[split] = (total[0] / total[1].clamp(min=1)).item()
        raw_model.train()
        return out

    # --- the loop ---
    model.train()
    bad_steps = 0
    t_start = time.time()
    t0 = time.time()
    tokens_since = 0
    start_iter = iter_num
    last_losses = {}
    last_train_loss = None
    while True:
        lr = get_lr(iter_num, cfg)
        if optimizer is not None:
            for g in optimizer.param_groups:
                g["lr"] = lr

        resumed_here = resume and iter_num == start_iter  # this evaluation and save happened before the restart
        saved = False
        if (cfg.eval_interval and iter_num % cfg.eval_interval == 0 or iter_num == cfg.max_iters) and not resumed_here:
            t_eval = time.time()
            losses = evaluate()
            last_losses = losses
            log(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
            metrics.write(iter=iter_num, train_loss=losses["train"], val_loss=losses["val"])
            metrics.plot()
            is_best = losses["val"] < best_val
            best_val = min(best_val, losses["val"])
            save(best=is_best)
            saved = True
            t0 += time.time() - t_eval  # keep evaluation and saving out of the tokens/s figure
        elif cfg.checkpoint_interval and iter_num % cfg.checkpoint_interval == 0 and iter_num > start_iter:
            save()
            saved = True
        if iter_num >= cfg.max_iters or stop_signal:
            if stop_signal:
                if not saved:
                    save()
                log(f"stopped by signal {stop_signal[0]} at iteration {iter_num}; checkpoint saved to {ckpt_path}")
            break

        # one optimizer step
        if cfg.trainer == "zo":  # MeZO: two forwards along a seeded random direction, no backward, no optimizer
            batch = train_loader.get_batch()
            with ctx:
                loss_value = mezo.zo_step(raw_model, batch, lr=lr, eps=cfg.zo_eps, weight_decay=cfg.weight_decay,
                                          seed=cfg.seed * 1_000_003 + iter_num, use_loss_mask=cfg.use_loss_mask)
            step_ok = math.isfinite(loss_value)
        else:
            batches = (train_loader.get_batch() for _ in range(cfg.gradient_accumulation_steps))  # fetched lazily
            loss_value = forward_backward(model, batches, cfg.use_loss_mask, ctx, scaler, optimizer, ddp, world)
            grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip if cfg.grad_clip else float("inf"))
            step_ok = math.isfinite(loss_value) and bool(torch.isfinite(grad_norm))
            if step_ok:
                scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)

        if not step_ok:
            bad_steps += 1
            log(f"iter {iter_num}: non-finite loss or gradient ({loss_value}); step skipped ({bad_steps}/{cfg.max_bad_steps})")
            metrics.write(iter=iter_num, skipped=True)
            if bad_steps >= cfg.max_bad_steps:
                raise TrainError(f"{bad_steps} non-finite steps in a row at iteration {iter_num}: the learning rate "
                                 f"({lr:.2e}) is likely too high, or the data holds bad windows; the last good checkpoint "
                                 f"is kept at {ckpt_path}")
        else:
            bad_steps = 0
        iter_num += 1
        tokens_since += tokens_per_step
        last_train_loss = loss_value

        if xgblora_due(iter_num, cfg, steps_per_epoch):
            # merge the booster into the weights (W += scaling * B @ A), then start a fresh one; the optimizer
            # state belonged to the old booster and is dropped, the lr schedule goes on
            merge_count += 1
            lora.remove_lora(raw_model)
            lora_kwargs = apply_finetuning(raw_model, cfg, merge_count)
            raw_model.to(device)
            if optimizer is not None:
                optimizer = raw_model.configure_optimizers(cfg.weight_decay, lr, (cfg.beta1, cfg.beta2), device_type)
            model = wrap(raw_model)
            log(f"iter {iter_num}: XGBLoRA merge {merge_count} (booster merged into the weights, new rank-1 booster"
                f"{' on layers ' + str(lora_kwargs['layers']) if lora_kwargs.get('layers') else ''})")
            metrics.write(iter=iter_num, xgblora_merge=merge_count)

        if iter_num % cfg.log_interval == 0 and master:
            dt = time.time() - t0
            tps = tokens_since / dt
            eta = (cfg.max_iters - iter_num) * dt / max(1, tokens_since / tokens_per_step)
            extra = ""
            if device_type == "cuda":
                mfu = raw_model.estimate_mfu(tps / world, peak_flops=989e12 if dtype == "bfloat16" else 67e12)
                extra = f", mfu {100 * mfu:.1f}%, mem {torch.cuda.max_memory_allocated() / 2**30:.2f}GiB"
            log(f"iter {iter_num}: loss {loss_value:.4f}, lr {lr:.2e}, {1000 * dt / max(1, tokens_since / tokens_per_step):.1f}ms/it, "
                f"{tps:,.0f} tok/s{extra}, ETA {fmt_time(eta)}")
            metrics.write(iter=iter_num, loss=loss_value, lr=lr, tokens_per_sec=tps, time=time.time() - t_start)
            t0, tokens_since = time.time(), 0

    for s, h in old_handlers.items():
        signal.signal(s, h)
    final = make_ckpt(with_state=False) if cfg.merge_lora and lora_kwargs else None  # on every rank: FSDP gathers
    if master and final is not None:
        merged = build_model(final, cfg.out_dir)
        lora.remove_lora(merged)
        mfolder = model_dir(cfg.out_dir, cfg.model_name + "_merged")
        ck = {"model": merged.state_dict(), "model_args": dict(vars(merged.config)), "config": config_dict(cfg),
              "tokenizer": tok.state_dict(), "iter_num": iter_num, "best_val_loss": None, "lora": None, "base": None,
              "data_format": final["data_format"], "format_version": 1}  # data_format: sample.py chats with it
        atomic_save(ck, os.path.join(mfolder, "ckpt.pt"))
        tok.save(os.path.join(mfolder, "tokenizer_state.json"))
        log(f"merged model written to {mfolder}")
    if ddp:
        dist.barrier()  # every rank waits until rank 0 has written its last checkpoint before train() tears down
    return {"iter_num": iter_num, "train_loss": last_losses.get("train"), "val_loss": last_losses.get("val"),
            "last_step_loss": last_train_loss, "best_val_loss": best_val, "checkpoint": ckpt_path,
            "stopped_by_signal": bool(stop_signal), "xgblora_merges": merge_count}


def main(argv=None):
    try:
        cfg = load_config(*parse_cli(sys.argv[1:] if argv is None else argv))
        train(cfg)
    except (ConfigError, DataError, CheckpointError, TrainError, FileNotFoundError, ValueError, RuntimeError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"error: {msg}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
