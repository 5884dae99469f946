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

import gc
import json
import math
import os
import random
import signal
import sys
import time

import numpy as np
import torch
import torch.distributed as dist

import lora
import mezo
from checkpoint import CheckpointError, atomic_save, build_model, find_checkpoint, load_checkpoint, model_dir
from config import ConfigError, config_dict, load_config, parse_cli
from data import BatchLoader, DataError, read_metadata
from model import GPT, GPTConfig, padded_vocab
from runtime import (MetricsLog, autocast_context, forward_backward, fmt_time, full_model_state, get_lr,
                     keep_freed_memory, load_optimizer_state, optimizer_state, pick_dtype, setup_distributed,
                     shard_model)
from tokenizer import Tokenizer

SAMPLE_DATASET = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "sample_chat")
ARCH_KEYS = ("n_layer", "n_head", "n_embd", "vocab_size", "bias")
RESUME_KEYS = ARCH_KEYS + ("block_size", "finetuning_type", "lora_rank", "lora_target", "trainer",
                           "use_bos_zero_training", "bos_scaling_factor", "init_from_model")


class TrainError(RuntimeError):
    """A problem with the run as configured: the message says what and how to fix it."""


# ---------------------------------------------------------------------------------------------------------------
# the dataset and the model

def resolve_dataset(cfg, log):
    """The dataset folder; with none given, the project's shipped sample conversations (prepared on first use)."""
    if cfg.dataset_dir:
        return cfg.dataset_dir
    if not os.path.exists(os.path.join(SAMPLE_DATASET, "dataset_metadata.json")):
        import prepare_dataset
        log(f"no --dataset_dir: preparing the shipped sample conversations into {SAMPLE_DATASET}")
        prepare_dataset.prepare([SAMPLE_DATASET + ".jsonl"], SAMPLE_DATASET, tokenization="char", fmt="chat")
    return SAMPLE_DATASET


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
    ddp, rank, world, device = setup_distributed(cfg.device, cfg.backend)
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
    dtype = pick_dtype(cfg.dtype, device_type)
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
        if Tokenizer.from_state(ckpt["tokenizer"]).ids_key() != tok.ids_key():  # the ids matter, not a path
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
    train_loader = BatchLoader(dataset_dir, "train", seed=cfg.seed, rank=rank, **loader_args)
    if cfg.use_loss_mask and train_loader.data.mask_tokens == 0:
        raise DataError(f"{dataset_dir}: the train split's loss masks hold no 1 (mask_fraction "
                        f"{meta.get('mask_fraction', 0.0):.3f}): there is no target to train on; prepare it again with the "
                        f"role you want to train (--mask_role, e.g. assistant), or set use_loss_mask false")
    tokens_per_step = cfg.batch_size * cfg.block_size * cfg.gradient_accumulation_steps * world
    steps_per_epoch = max(1, math.ceil(train_loader.data.num_tokens / tokens_per_step))
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
            loader = BatchLoader(dataset_dir, split, seed=cfg.seed + 999, rank=rank, **loader_args)
            total = torch.zeros(2, device=device)
            for _ in range(cfg.eval_iters):
                batch = loader.get_batch()
                with ctx:
                    _, loss_sum = raw_model(batch[0], batch[1], batch[2] if cfg.use_loss_mask else None, loss_reduction="sum")
                count = batch[2].sum() if cfg.use_loss_mask else torch.tensor(batch[1].numel())
                total += torch.stack([loss_sum.float(), count.float().to(device)])
            if ddp:
                dist.all_reduce(total)
            # no target in any batch (masks all 0): no loss to report; None, never a 0.0 that would count as best
            out[split] = (total[0] / total[1]).item() if total[1] > 0 else None
        raw_model.train()
        return out

    @torch.no_grad()
    def sample_text():
        """A short sample from the model as it is now: 64 tokens after BOS, temperature 0.8, top_k 200, drawn
        with a generator of its own so the run's random state (dropout, windows) is untouched. Every rank runs it
        (FSDP's forward is collective); rank 0 logs it."""
        raw_model.eval()
        gen = torch.Generator(device=device).manual_seed(cfg.seed)
        out = raw_model.generate(torch.tensor([[tok.eot_token]], device=device), 64, temperature=0.8, top_k=200,
                                 generator=gen)
        raw_model.train()
        return tok.decode(out[0, 1:].tolist())

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
        lr = get_lr(iter_num, cfg.learning_rate, cfg.min_lr, cfg.warmup_iters, cfg.lr_decay_iters, cfg.decay_lr)
        if optimizer is not None:
            for g in optimizer.param_groups:
                g["lr"] = lr

        resumed_here = resume and iter_num == start_iter  # this evaluation and save happened before the restart
        saved = False
        if (cfg.eval_interval and iter_num % cfg.eval_interval == 0 or iter_num == cfg.max_iters) and not resumed_here:
            t_eval = time.time()
            losses = evaluate()
            last_losses = losses
            shown = {k: f"{v:.4f}" if v is not None else "n/a (no target token in its batches)" for k, v in losses.items()}
            log(f"step {iter_num}: train loss {shown['train']}, val loss {shown['val']}")
            metrics.write(iter=iter_num, train_loss=losses["train"], val_loss=losses["val"])
            metrics.plot()
            is_best = losses["val"] is not None and losses["val"] < best_val
            best_val = min(best_val, losses["val"]) if is_best else best_val
            save(best=is_best)
            saved = True
            t0 += time.time() - t_eval  # keep evaluation and saving out of the tokens/s figure
        elif cfg.checkpoint_interval and iter_num % cfg.checkpoint_interval == 0 and iter_num > start_iter:
            save()
            saved = True
        if cfg.sample_interval and iter_num % cfg.sample_interval == 0 and iter_num > start_iter or (
                iter_num >= cfg.max_iters and not stop_signal):
            text = sample_text()
            log(f"sample at iteration {iter_num}: {text!r}")
            metrics.write(iter=iter_num, sample=text)
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
