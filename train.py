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

The file reads top to bottom: the fine-tuning methods and the two trainers (small tables), the run state that
setup() builds once (model, optimizer, loader, resume), then the loop in train(): short commented paragraphs.
"""

import gc
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.distributed as dist

import lora
import mezo
import xgblora
from checkpoint import atomic_save, build_model, find_checkpoint, load_checkpoint, make_checkpoint, model_dir
from config import ConfigError, config_dict, load_config, parse_cli
from data import BatchLoader, DataError, PackedLoader, read_metadata
from errors import GPTLabError, one_line_errors
from hf import load_hf_gpt2
from model import GPT, GPTConfig, packed_inputs, padded_vocab
from runtime import (MetricsLog, autocast_context, forward_backward, fmt_time, full_model_state, get_lr,
                     keep_freed_memory, load_optimizer_state, optimizer_state, pick_dtype, setup_distributed,
                     shard_model, stop_signals)
from tokenizer import Tokenizer

SAMPLE_DATASET = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "sample_chat")
ARCH_KEYS = ("n_layer", "n_head", "n_embd", "vocab_size", "bias", "activation_function")
RESUME_KEYS = ARCH_KEYS + ("block_size", "finetuning_type", "lora_rank", "lora_target", "trainer",
                           "use_bos_zero_training", "bos_scaling_factor", "init_from_model", "packing",
                           "align_windows")


class TrainError(GPTLabError, RuntimeError):
    """A problem with the run as configured: the message says what and how to fix it."""


# ---------------------------------------------------------------------------------------------------------------
# the fine-tuning methods (finetuning_type) and the trainers (trainer): a new one is one entry plus a config key

@dataclass(frozen=True)
class Method:
    """A fine-tuning method in the shape all of them share."""
    place: Callable  # (model, cfg, merges) -> apply_lora's kwargs (saved in the checkpoint) or None
    adapters_only: bool  # a run on a base checkpoints only its adapters and names the base
    after_step: Optional[Callable] = None  # (run, lr): what follows each optimizer step
    refuse: Optional[Callable] = None  # (cfg, model, fsdp): raise for what the method cannot do


def place_lora(model, cfg, merges=0):
    kwargs = dict(rank=cfg.lora_rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, targets=cfg.lora_target)
    lora.apply_lora(model, **kwargs)
    return kwargs


def refuse_xgblora(cfg, model, fsdp):
    if fsdp:
        raise TrainError("fsdp does not support finetuning_type xgblora (its merges rebuild layers): use DDP "
                         "(fsdp false) for it")
    if model is not None and cfg.xgblora_layers_per_iteration > model.config.n_layer:
        raise TrainError(f"xgblora_layers_per_iteration {cfg.xgblora_layers_per_iteration} is more than the model's "
                         f"{model.config.n_layer} layers: set it to {model.config.n_layer} or less (0 = every layer)")


def xgblora_after_step(run, lr):
    """Merge the booster into the weights and start a fresh one when due; the optimizer state belonged to the old
    booster and is dropped, the lr schedule goes on."""
    if not xgblora.merge_due(run.iter_num, run.cfg, run.steps_per_epoch):
        return
    cfg = run.cfg
    run.merges += 1
    run.lora_kwargs = xgblora.merge_and_restart(run.raw_model, cfg, run.merges)
    run.raw_model.to(run.device)
    if run.optimizer is not None:
        run.optimizer = run.raw_model.configure_optimizers(cfg.weight_decay, lr, (cfg.beta1, cfg.beta2), run.device_type)
    run.model = wrap(run.raw_model, run)
    layers = run.lora_kwargs.get("layers")
    run.log(f"iter {run.iter_num}: XGBLoRA merge {run.merges} (booster merged into the weights, new rank-1 booster"
            f"{' on layers ' + str(layers) if layers else ''})")
    run.metrics.write(iter=run.iter_num, xgblora_merge=run.merges)


METHODS = {
    "full": Method(place=lambda model, cfg, merges=0: None, adapters_only=False),
    "lora": Method(place=place_lora, adapters_only=True),
    "xgblora": Method(place=xgblora.place_booster, adapters_only=False, after_step=xgblora_after_step,
                      refuse=refuse_xgblora),
}


def apply_finetuning(model, cfg, merge_count=0):
    """Put the configured method on the model (adapters placed, the rest frozen). Returns the lora kwargs (None
    for a full fine-tune)."""
    method = METHODS[cfg.finetuning_type]
    if method.refuse:
        method.refuse(cfg, model, fsdp=False)
    return method.place(model, cfg, merge_count)


def backprop_step(run, lr):
    """Backprop + AdamW: the micro-steps' gradients (gradient accumulation), clipped, one optimizer step.
    Returns (loss, finite)."""
    cfg = run.cfg
    batches = (run.train_loader.get_batch() for _ in range(cfg.gradient_accumulation_steps))  # fetched lazily
    loss = forward_backward(run.model, batches, cfg.use_loss_mask, run.ctx, run.scaler, run.optimizer, run.ddp,
                            run.world)
    grad_norm = torch.nn.utils.clip_grad_norm_(run.raw_model.parameters(), cfg.grad_clip if cfg.grad_clip else float("inf"))
    ok = math.isfinite(loss) and bool(torch.isfinite(grad_norm))
    if ok:
        run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    return loss, ok


def zo_step(run, lr):
    """MeZO: two forwards along a seeded random direction, no backward, no optimizer. Returns (loss, finite)."""
    cfg = run.cfg
    batch = run.train_loader.get_batch()
    with run.ctx:
        loss = mezo.zo_step(run.raw_model, batch, lr=lr, eps=cfg.zo_eps, weight_decay=cfg.weight_decay,
                            seed=cfg.seed * 1_000_003 + run.iter_num, use_loss_mask=cfg.use_loss_mask)
    return loss, math.isfinite(loss)


TRAINERS = {"regular": backprop_step, "zo": zo_step}


# ---------------------------------------------------------------------------------------------------------------
# the dataset and the model

def resolve_dataset(cfg, log):
    """The dataset folder; with none given, the project's shipped sample conversations (prepared on first use)."""
    if cfg.dataset_dir:
        return cfg.dataset_dir
    meta_path = os.path.join(SAMPLE_DATASET, "dataset_metadata.json")  # prepared again if made before starts.bin
    needs_starts = cfg.packing or cfg.align_windows
    if not os.path.exists(meta_path) or (needs_starts and not read_metadata(SAMPLE_DATASET).get("has_starts")):
        import prepare_dataset
        log(f"no --dataset_dir: preparing the shipped sample conversations into {SAMPLE_DATASET}")
        prepare_dataset.prepare([SAMPLE_DATASET + ".jsonl"], SAMPLE_DATASET, tokenization="char", fmt="chat")
    return SAMPLE_DATASET


def build_fresh(cfg, tok, log):
    """A new model from the config, or one started from another model / a Hugging Face checkpoint."""
    notes = []
    base = None
    if cfg.init_from not in ("scratch", "resume"):  # a Hugging Face GPT-2 directory or hub id
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
        if Tokenizer.from_state(ckpt["tokenizer"]).ids_key() != tok.ids_key():
            raise TrainError(f"model '{cfg.init_from_model}' was trained with another tokenizer than the dataset "
                             f"{cfg.dataset_dir or SAMPLE_DATASET}: prepare the data with the base model's tokenizer")
        base = {"kind": "model", "name": cfg.init_from_model}
        notes.append(f"weights and architecture from model '{cfg.init_from_model}' (iteration {ckpt.get('iter_num')})")
    else:
        vocab = cfg.vocab_size or padded_vocab(tok.vocab_size)
        if vocab < tok.vocab_size:
            raise TrainError(f"vocab_size {vocab} is smaller than the tokenizer's {tok.vocab_size}: raise it or set 0 (auto)")
        mc = GPTConfig(block_size=cfg.block_size, vocab_size=vocab, n_layer=cfg.n_layer, n_head=cfg.n_head,
                       n_embd=cfg.n_embd, dropout=cfg.dropout, bias=cfg.bias,
                       activation_function=cfg.activation_function)
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



def check_cpu_compiler():
    """torch.compile on the CPU writes C++ that inductor builds with the system's compiler (CXX, else g++). Without
    one the first step dies deep inside inductor; say so before training starts, with the fix."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler  # private: a torch without it skips the check
    except ImportError:
        return
    try:
        get_cpp_compiler()
    except Exception as e:  # inductor's InvalidCxxCompiler: no CXX / g++ that answers --version
        from torch._inductor import config as inductor_config
        tried = ", ".join(c for c in inductor_config.cpp.cxx if c)
        raise TrainError(f"compile: true on the CPU needs a C++ compiler for torch.compile's kernels, and none works "
                         f"(tried {tried}: {type(e).__name__}): install one (Debian: apt-get install g++) or set CXX "
                         f"to it, or pass --compile false") from None


def wrap(raw_model, run):
    """The module the loop calls: compiled when asked, in DDP under torchrun (FSDP already wraps in place)."""
    m = raw_model
    if run.compile:
        if run.device_type == "cpu":
            check_cpu_compiler()
        m = torch.compile(m)
    if run.ddp and not run.fsdp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        m = DDP(m, device_ids=[int(run.device.split(":")[1])] if run.device_type == "cuda" else None)
    return m


# ---------------------------------------------------------------------------------------------------------------
# the run state, built once

@dataclass
class Run:
    """Everything a training run holds. setup() builds it; the loop changes only the counters, and XGBLoRA's merges
    the model, adapters and optimizer."""
    cfg: Any
    log: Callable
    # processes and precision
    ddp: bool
    rank: int
    world: int
    device: str
    device_type: str
    fsdp: bool
    dtype: str
    ctx: Any
    compile: bool = False
    # data and output
    dataset_dir: str = ""
    meta: dict = None
    tok: Any = None
    folder: str = ""
    ckpt_path: str = ""
    train_loader: Any = None
    loader_args: dict = None
    tokens_per_step: int = 0
    steps_per_epoch: int = 0
    # the model and its method
    method: Method = None
    raw_model: Any = None  # the GPT itself (checkpoints, evaluation, sampling)
    model: Any = None  # what the training step calls: raw_model compiled and/or in DDP
    lora_kwargs: dict = None
    base: dict = None
    optimizer: Any = None
    scaler: Any = None
    metrics: Any = None
    # counters
    iter_num: int = 0
    start_iter: int = 0
    best_val: float = float("inf")
    merges: int = 0  # XGBLoRA boosters merged so far
    resumed: bool = False

    @property
    def master(self):
        return self.rank == 0


def setup(cfg, log):
    """Processes, precision, data, model (fresh, from a base, or resumed), optimizer and loader: the whole run."""
    ddp, rank, world, device = setup_distributed(cfg.device, cfg.backend)
    device_type = "cuda" if device.startswith("cuda") else device
    run = Run(cfg=cfg, log=log if rank == 0 else (lambda *a, **k: None), ddp=ddp, rank=rank, world=world,
              device=device, device_type=device_type, fsdp=cfg.fsdp and ddp, dtype="", ctx=None)
    setup_process(run)
    setup_data(run)
    ckpt = read_resume_checkpoint(run) if cfg.init_from == "resume" else None
    setup_model(run, ckpt)
    setup_training(run, ckpt)
    setup_output(run)
    return run


def setup_process(run):
    """Seeds, the malloc setting, TF32, precision, and what the method refuses before any model is loaded."""
    cfg = run.cfg
    if cfg.fsdp and not run.ddp:
        run.log("note: fsdp is on but this is a single process (no torchrun): training without sharding")
    run.method = METHODS[cfg.finetuning_type]
    if run.method.refuse:
        run.method.refuse(cfg, None, run.fsdp)
    if run.fsdp and cfg.dtype == "float16":
        raise TrainError("fsdp does not support dtype float16 (its grad scaler is not sharded): use DDP (fsdp false) "
                         "for it")
    torch.manual_seed(cfg.seed + (0 if run.fsdp else run.rank))  # FSDP shards each rank's own copy: all build the same
    np.random.seed(cfg.seed + run.rank)
    random.seed(cfg.seed + run.rank)
    if run.device_type == "cpu":
        keep_freed_memory(map_large_blocks=cfg.activation_checkpointing)
    if run.device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls: free speed on Ampere+ at no visible loss cost
        torch.backends.cudnn.allow_tf32 = True
    run.dtype = pick_dtype(cfg.dtype, run.device_type)
    run.ctx = autocast_context(run.device_type, run.dtype)
    run.compile = cfg.compile if cfg.compile is not None else run.device_type == "cuda"
    if cfg.finetuning_type != "full":  # before any model is loaded (a GPT-2 base takes a while)
        try:
            lora._check_targets(cfg.lora_target)
        except ValueError as e:
            raise ConfigError(f"config: 'lora_target' = {cfg.lora_target!r}: {e}") from None


def setup_data(run):
    """The dataset folder (the shipped sample when none is given), its metadata and tokenizer; the output folder."""
    cfg = run.cfg
    run.dataset_dir = resolve_dataset(cfg, run.log) if run.master or cfg.dataset_dir else SAMPLE_DATASET
    if run.ddp and not cfg.dataset_dir:
        dist.barrier()  # rank 0 may be preparing the sample dataset
    run.meta = read_metadata(run.dataset_dir)
    run.tok = Tokenizer.load(os.path.join(run.dataset_dir, "tokenizer_state.json"))
    run.folder = model_dir(cfg.out_dir, cfg.model_name)
    run.ckpt_path = os.path.join(run.folder, "ckpt.pt")


def read_resume_checkpoint(run):
    """--init_from resume: the run's ckpt.pt, checked against this config and this dataset's tokenizer."""
    cfg = run.cfg
    if not os.path.exists(run.ckpt_path):
        raise TrainError(f"--init_from resume: no checkpoint at {run.ckpt_path} (train model '{cfg.model_name}' first)")
    ckpt = load_checkpoint(run.ckpt_path)
    old = ckpt["config"]
    for key in RESUME_KEYS:
        if key in old and old[key] != getattr(cfg, key):
            raise TrainError(f"{run.ckpt_path}: resuming with a different setting: '{key}' is {getattr(cfg, key)!r} now "
                             f"but {old[key]!r} in the checkpoint; use the config the run started with")
    if Tokenizer.from_state(ckpt["tokenizer"]).ids_key() != run.tok.ids_key():  # the ids matter, not a path
        raise TrainError(f"{run.ckpt_path}: the run was trained with another tokenizer than the dataset {run.dataset_dir} "
                         f"uses ({run.tok.kind}): resume with the dataset_dir the run started with")
    return ckpt


def setup_model(run, ckpt):
    """The model: from the resume checkpoint, or fresh / from a base with the method placed on it; then the BOS
    flag, and onto the device (sharded under FSDP)."""
    cfg = run.cfg
    if ckpt is not None:
        run.raw_model = build_model(ckpt, cfg.out_dir)  # out_dir: a LoRA base named by model name lives there
        run.lora_kwargs, run.base = ckpt.get("lora"), ckpt.get("base")
        run.iter_num = run.start_iter = ckpt["iter_num"]
        run.best_val = ckpt.get("best_val_loss") or float("inf")
        run.merges = ckpt.get("xgblora_merges", 0)
        run.resumed = True
        if cfg.finetuning_type == "full":
            for p in run.raw_model.parameters():
                p.requires_grad_(True)
        run.log(f"resuming {cfg.model_name} from iteration {run.iter_num}")
    else:
        run.raw_model, run.base, notes = build_fresh(cfg, run.tok, run.log)
        for n in notes:
            run.log(f"init: {n}")
        if run.method.refuse:
            run.method.refuse(cfg, run.raw_model, run.fsdp)
        run.lora_kwargs = run.method.place(run.raw_model, cfg, 0)
    model = run.raw_model
    model.config.use_bos_zero_training = cfg.use_bos_zero_training
    model.config.bos_scaling_factor = cfg.bos_scaling_factor
    model.set_activation_checkpointing(cfg.activation_checkpointing)  # a model attribute: survives XGBLoRA's merges
    if cfg.activation_checkpointing:
        run.log("activation checkpointing: each block's activations are recomputed in backward")
    if cfg.finetuning_type == "xgblora" and cfg.lora_rank != 1 and ckpt is None:
        run.log(f"warning: finetuning_type xgblora trains rank-1 boosters; lora_rank {cfg.lora_rank} is ignored")
    if run.fsdp:
        shard_model(model, run.device_type, run.world)  # each rank's shard goes to its device: never whole there
        torch.manual_seed(cfg.seed + run.rank)  # the ranks' dropout differs again
    else:
        model.to(run.device)
    trainable, total = lora.count_parameters(model)
    run.log(f"number of parameters: {total / 1e6:.2f}M (trainable {trainable:,}, {100 * trainable / total:.2f}%)")


def setup_training(run, ckpt):
    """The loader, the optimizer and grad scaler, the resume state (optimizer, loader, RNG, scaler), the wrapped
    model."""
    cfg, meta, model = run.cfg, run.meta, run.raw_model
    if cfg.use_loss_mask and not meta.get("has_mask"):
        expected = [os.path.join(run.dataset_dir, "train", s["file"][:-4] + "_mask.bin") for s in meta["splits"]["train"]["shards"]]
        raise DataError(f"use_loss_mask is on but {run.dataset_dir} has no mask shards (expected {', '.join(expected[:2])}"
                        f"{' ...' if len(expected) > 2 else ''}): prepare it with --format chat, or set use_loss_mask false")
    if cfg.block_size > model.config.block_size:
        raise TrainError(f"block_size {cfg.block_size} is larger than the model's {model.config.block_size}")
    run.loader_args = dict(batch_size=cfg.batch_size, block_size=cfg.block_size, device=run.device,
                           use_mask=cfg.use_loss_mask, prepend_bos=cfg.use_bos_zero_training,
                           bos_token=run.tok.eot_token, model_vocab_size=model.config.vocab_size,
                           align=cfg.align_windows)
    run.train_loader = make_loader(run, "train", cfg.seed, cfg.gradient_accumulation_steps)
    if cfg.use_loss_mask and run.train_loader.data.mask_tokens == 0:
        raise DataError(f"{run.dataset_dir}: the train split's loss masks hold no 1 (mask_fraction "
                        f"{meta.get('mask_fraction', 0.0):.3f}): there is no target to train on; prepare it again with "
                        f"the role you want to train (--mask_role, e.g. assistant), or set use_loss_mask false")
    run.tokens_per_step = cfg.batch_size * cfg.block_size * cfg.gradient_accumulation_steps * run.world
    run.steps_per_epoch = max(1, math.ceil(run.train_loader.data.num_tokens / run.tokens_per_step))
    if cfg.packing:  # a real pass over every conversation; XGBLoRA's epoch merges count these
        run.steps_per_epoch = run.train_loader.steps_per_epoch
        run.log(run.train_loader.summary())
    run.log(f"data: {run.dataset_dir} ({meta.get('tokenization')}, train {run.train_loader.data.num_tokens:,} tokens); "
            f"{run.tokens_per_step:,} tokens per step, {run.steps_per_epoch} steps per epoch; dtype {run.dtype} on "
            f"{run.device}")
    if cfg.trainer == "regular":
        run.optimizer = model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2),
                                                   run.device_type)
    run.scaler = torch.amp.GradScaler("cuda", enabled=(run.dtype == "float16" and run.device_type == "cuda"))
    if ckpt is not None:
        restore_training_state(run, ckpt)
    run.model = wrap(model, run)


def make_loader(run, split, seed, accum=1):
    """Random windows (from any token, or with align_windows from a conversation's start), or with packing rows of
    whole conversations (the same plan on every rank, each taking its own rows; a packed row starts at a BOS, so
    nothing is prepended)."""
    if run.cfg.packing:
        args = {k: v for k, v in run.loader_args.items() if k not in ("prepend_bos", "align")}
        return PackedLoader(run.dataset_dir, split, seed=seed, rank=run.rank, world=run.world, accum=accum, **args)
    return BatchLoader(run.dataset_dir, split, seed=seed, rank=run.rank, **run.loader_args)


def restore_training_state(run, ckpt):
    """What resume needs besides the weights: the optimizer, every rank's loader position and RNG, the scaler."""
    if run.optimizer is not None and ckpt.get("optimizer"):
        load_optimizer_state(run.raw_model, run.optimizer, ckpt["optimizer"], run.fsdp)
    # a rank the saved run did not have keeps its own fresh stream (not rank 0's); so does every rank of a
    # checkpoint that never trained here (a peft adapter imported by convert_hf.py: no loader state at all)
    if run.rank < len(ckpt.get("loader") or []):
        run.train_loader.load_state_dict(ckpt["loader"][run.rank])
    if "rng" in ckpt:
        torch.set_rng_state(ckpt["rng"]["torch"][run.rank % len(ckpt["rng"]["torch"])])
    if run.scaler.is_enabled() and ckpt.get("scaler"):
        run.scaler.load_state_dict(ckpt["scaler"])


def setup_output(run):
    """The model's folder: no temp files of a killed save, config.json and tokenizer_state.json; metrics.jsonl
    (on resume cut back to the checkpoint's iteration)."""
    folder = run.folder
    if run.master:
        os.makedirs(folder, exist_ok=True)
        for fname in os.listdir(folder):  # temp files of a save that a killed process never finished
            if ".tmp" in fname:
                os.remove(os.path.join(folder, fname))
        with open(os.path.join(folder, "config.json.tmp"), "w") as f:
            json.dump(config_dict(run.cfg), f, indent=2)
        os.replace(os.path.join(folder, "config.json.tmp"), os.path.join(folder, "config.json"))
        run.tok.save(os.path.join(folder, "tokenizer_state.json"))
    run.metrics = MetricsLog(folder, run.iter_num, run.master)


# ---------------------------------------------------------------------------------------------------------------
# checkpoints, evaluation, samples

def make_ckpt(run, with_state):
    """This run's checkpoint (checkpoint.make_checkpoint); with_state adds what resume needs. Under DDP/FSDP every
    rank must call it (the state is gathered)."""
    cfg, raw_model = run.cfg, run.raw_model
    state_model = full_model_state(raw_model) if run.fsdp else raw_model.state_dict()
    adapters_only = run.method.adapters_only and run.base is not None
    if adapters_only:  # adapters only; the base is named in "base"
        adapters = lora.lora_state_dict(raw_model)
        state_model = {k: v for k, v in state_model.items() if k in adapters}
    ck = make_checkpoint(state_model, vars(raw_model.config), config_dict(cfg), run.tok.state_dict(),
                         iter_num=run.iter_num, best_val_loss=None if run.best_val == float("inf") else run.best_val,
                         lora=run.lora_kwargs, base=run.base if run.method.adapters_only else None,
                         data_format=run.meta.get("format", "text"), xgblora_merges=run.merges)
    if with_state:
        ck["optimizer"] = optimizer_state(raw_model, run.optimizer, run.fsdp) if run.optimizer is not None else None
        ck["scaler"] = run.scaler.state_dict() if run.scaler.is_enabled() else None
        loaders, rngs = [run.train_loader.state_dict()], [torch.get_rng_state()]
        if run.ddp:  # every rank's sampling and dropout RNG, so a resumed DDP run is exact too
            gathered = [None] * run.world
            dist.all_gather_object(gathered, (loaders[0], rngs[0]))
            loaders, rngs = [g[0] for g in gathered], [g[1] for g in gathered]
        ck["loader"] = loaders
        ck["rng"] = {"torch": rngs}
    return ck


def save(run, best=False):
    ck = make_ckpt(run, with_state=True)
    if run.master:
        atomic_save(ck, run.ckpt_path)
        if best:
            ck.pop("optimizer", None)
            atomic_save(ck, os.path.join(run.folder, "best.pt"))


@torch.no_grad()
def evaluate(run):
    """Mean loss per split over eval_iters fixed batches (the same windows at every evaluation, so the curve is not
    sampling noise), weighted by target count (masked targets when use_loss_mask). Reduced across ranks. A split
    whose batches hold no target at all gets None: no loss to report, never a 0.0 that would count as best."""
    cfg, model = run.cfg, run.raw_model
    out = {}
    model.eval()
    for split in ("train", "val"):
        loader = make_loader(run, split, cfg.seed + 999)
        total = torch.zeros(2, device=run.device)
        for _ in range(cfg.eval_iters):
            batch = loader.get_batch()
            x, y, m = batch[0], batch[1], batch[2] if cfg.use_loss_mask else None
            with run.ctx:
                _, loss_sum = model(x, y, m, loss_reduction="sum", loss_only=True, **packed_inputs(batch))
            count = m.sum() if m is not None else (y != -1).sum()  # padding of packed rows has target -1
            total += torch.stack([loss_sum.float(), count.float().to(run.device)])
        if run.ddp:
            dist.all_reduce(total)
        out[split] = (total[0] / total[1]).item() if total[1] > 0 else None
    model.train()
    return out


@torch.no_grad()
def sample_text(run):
    """A short sample from the model as it is now: 64 tokens after BOS, temperature 0.8, top_k 200, drawn with a
    generator of its own so the run's random state (dropout, windows) is untouched. Every rank runs it (FSDP's
    forward is collective); rank 0 logs it."""
    model = run.raw_model
    model.eval()
    gen = torch.Generator(device=run.device).manual_seed(run.cfg.seed)
    out = model.generate(torch.tensor([[run.tok.eot_token]], device=run.device), 64, temperature=0.8, top_k=200,
                         generator=gen)
    model.train()
    return run.tok.decode(out[0, 1:].tolist())


def evaluate_and_save(run):
    """Evaluate both splits, log them, save ckpt.pt (and best.pt when val improved). Returns the losses."""
    losses = evaluate(run)
    shown = {k: f"{v:.4f}" if v is not None else "n/a (no target token in its batches)" for k, v in losses.items()}
    run.log(f"step {run.iter_num}: train loss {shown['train']}, val loss {shown['val']}")
    run.metrics.write(iter=run.iter_num, train_loss=losses["train"], val_loss=losses["val"])
    run.metrics.plot()
    is_best = losses["val"] is not None and losses["val"] < run.best_val
    if is_best:
        run.best_val = losses["val"]
    save(run, best=is_best)
    return losses


def write_merged(run):
    """merge_lora: a plain model with the adapters merged, as <model_name>_merged (every rank calls it: FSDP
    gathers)."""
    final = make_ckpt(run, with_state=False)
    if not run.master:
        return
    merged = lora.remove_lora(build_model(final, run.cfg.out_dir))
    mfolder = model_dir(run.cfg.out_dir, run.cfg.model_name + "_merged")
    ck = make_checkpoint(merged.state_dict(), vars(merged.config), config_dict(run.cfg), run.tok.state_dict(),
                         iter_num=run.iter_num, data_format=final["data_format"])  # data_format: sample.py chats
    atomic_save(ck, os.path.join(mfolder, "ckpt.pt"))
    run.tok.save(os.path.join(mfolder, "tokenizer_state.json"))
    run.log(f"merged model written to {mfolder}")


# ---------------------------------------------------------------------------------------------------------------
# the loop

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
    run = setup(cfg, log)
    log = run.log
    run.model.train()
    bad_steps, last_losses, last_loss = 0, {}, None
    t_start = t0 = time.time()
    tokens_since = 0
    with stop_signals() as stop:
        while True:
            # learning rate: linear warmup, then cosine decay to min_lr
            lr = get_lr(run.iter_num, cfg.learning_rate, cfg.min_lr, cfg.warmup_iters, cfg.lr_decay_iters, cfg.decay_lr)
            if run.optimizer is not None:
                for g in run.optimizer.param_groups:
                    g["lr"] = lr

            # evaluate and save (not at the iteration a resumed run starts from: that was done before the stop),
            # else save now and then; evaluating, saving and sampling are kept out of the tokens/s figure
            saved = False
            t_pause = time.time()
            resumed_here = run.resumed and run.iter_num == run.start_iter
            if (cfg.eval_interval and run.iter_num % cfg.eval_interval == 0 or run.iter_num == cfg.max_iters) \
                    and not resumed_here:
                last_losses = evaluate_and_save(run)
                saved = True
            elif cfg.checkpoint_interval and run.iter_num % cfg.checkpoint_interval == 0 and run.iter_num > run.start_iter:
                save(run)
                saved = True

            # a short sample every sample_interval iterations, and one at the end
            at_end = run.iter_num >= cfg.max_iters and not stop
            if at_end or cfg.sample_interval and run.iter_num % cfg.sample_interval == 0 and run.iter_num > run.start_iter:
                text = sample_text(run)
                log(f"sample at iteration {run.iter_num}: {text!r}")
                run.metrics.write(iter=run.iter_num, sample=text)
            t0 += time.time() - t_pause

            # done, or stopped by SIGINT / SIGTERM: save first (a step is never cut in half)
            if run.iter_num >= cfg.max_iters or stop:
                if stop:
                    if not saved:
                        save(run)
                    log(f"stopped by signal {stop[0]} at iteration {run.iter_num}; checkpoint saved to {run.ckpt_path}")
                break

            # one optimizer step: backprop + AdamW, or MeZO's two forwards
            loss, ok = TRAINERS[cfg.trainer](run, lr)

            # a non-finite loss or gradient: the step is skipped; too many in a row stop the run
            if not ok:
                bad_steps += 1
                log(f"iter {run.iter_num}: non-finite loss or gradient ({loss}); step skipped "
                    f"({bad_steps}/{cfg.max_bad_steps})")
                run.metrics.write(iter=run.iter_num, skipped=True)
                if bad_steps >= cfg.max_bad_steps:
                    raise TrainError(f"{bad_steps} non-finite steps in a row at iteration {run.iter_num}: the learning "
                                     f"rate ({lr:.2e}) is likely too high, or the data holds bad windows; the last good "
                                     f"checkpoint is kept at {run.ckpt_path}")
            else:
                bad_steps = 0
            run.iter_num += 1
            tokens_since += run.tokens_per_step
            last_loss = loss

            # what the method does after a step (XGBLoRA: merge the booster when due, start a new one)
            if run.method.after_step:
                run.method.after_step(run, lr)

            # log: loss, lr, time per iteration, tokens/s, ETA (and MFU, memory on CUDA)
            if run.iter_num % cfg.log_interval == 0 and run.master:
                log_progress(run, loss, lr, time.time() - t0, tokens_since, t_start)
                t0, tokens_since = time.time(), 0

    if cfg.merge_lora and run.lora_kwargs:
        write_merged(run)
    if run.ddp:
        dist.barrier()  # every rank waits until rank 0 has written its last checkpoint before train() tears down
    return {"iter_num": run.iter_num, "train_loss": last_losses.get("train"), "val_loss": last_losses.get("val"),
            "last_step_loss": last_loss, "best_val_loss": run.best_val, "checkpoint": run.ckpt_path,
            "stopped_by_signal": bool(stop), "xgblora_merges": run.merges}


def log_progress(run, loss, lr, dt, tokens, t_start):
    cfg = run.cfg
    steps = max(1, tokens / run.tokens_per_step)
    tps = tokens / dt
    eta = (cfg.max_iters - run.iter_num) * dt / steps
    extra = ""
    if run.device_type == "cuda":
        mfu = run.raw_model.estimate_mfu(tps / run.world, peak_flops=989e12 if run.dtype == "bfloat16" else 67e12)
        extra = f", mfu {100 * mfu:.1f}%, mem {torch.cuda.max_memory_allocated() / 2**30:.2f}GiB"
    run.log(f"iter {run.iter_num}: loss {loss:.4f}, lr {lr:.2e}, {1000 * dt / steps:.1f}ms/it, {tps:,.0f} tok/s{extra}, "
            f"ETA {fmt_time(eta)}")
    run.metrics.write(iter=run.iter_num, loss=loss, lr=lr, tokens_per_sec=tps, time=time.time() - t_start)


@one_line_errors
def main(argv=None):
    cfg = load_config(*parse_cli(sys.argv[1:] if argv is None else argv))
    train(cfg)


if __name__ == "__main__":
    main()
