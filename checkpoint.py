"""
Checkpoints: atomic writes, safe loads, and rebuilding a model from what was saved.

A checkpoint is a plain dict saved with torch.save and loaded with weights_only=True (tensors, numbers, strings,
lists and dicts only: loading never runs code). Layout of checkpoints/<model_name>/:
    ckpt.pt               latest training state (model, optimizer, iteration, RNG, ...), for --init_from resume
    best.pt               the model at its best val loss (no optimizer)
    config.json           the training config, tokenizer_state.json, metrics.jsonl, loss.png
The dict holds "model_args" (GPTConfig fields) and "model" (the state dict). A LoRA run stores only the adapter
tensors in "model" and names its base in "base": {"kind": "model", "name": ...} (another project checkpoint)
or {"kind": "hf", "path": ...} (a Hugging Face directory); loading rebuilds the base and puts the adapters on.
"""

import os
import pickle
import zipfile

import torch

import lora
from errors import GPTLabError
from hf import load_hf_gpt2
from model import GPT, GPTConfig
from tokenizer import Tokenizer

CKPT_FORMAT = 1  # the layout make_checkpoint writes; load_checkpoint refuses a newer one


class CheckpointError(GPTLabError, RuntimeError):
    """A checkpoint that cannot be used: the message names the file and what to do."""


def make_checkpoint(model_state, model_args, config, tokenizer, iter_num=0, best_val_loss=None, lora=None, base=None,
                    data_format="text", **extra):
    """The one layout of every checkpoint the project writes (train.py's ckpt.pt / best.pt / merged model, the
    converter's, the scaffold's). model_state: the state dict (a LoRA run on a base: its adapters only); model_args:
    GPTConfig's fields; config: the run's settings as a dict; tokenizer: Tokenizer.state_dict(); lora: apply_lora's
    kwargs or None; base: what an adapters-only checkpoint sits on ({"kind": "model"|"hf", ...}) or None;
    data_format: "chat" or "text" (sample.py and serve.py chat only with chat models). extra: what a writer adds
    (training state for resume: optimizer, scaler, loader, rng; the scaffold's own keys)."""
    return {"format_version": CKPT_FORMAT, "model": model_state, "model_args": dict(model_args), "config": config,
            "tokenizer": tokenizer, "iter_num": iter_num, "best_val_loss": best_val_loss, "lora": lora, "base": base,
            "data_format": data_format, **extra}


def atomic_save(obj, path):
    """torch.save to a temp file in the same folder, flush it to disk, then rename over `path`. A crash at any
    moment (SIGKILL included) leaves either the old complete file or the new complete file, never half of one."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_checkpoint(path, map_location="cpu"):
    """Load a checkpoint dict safely (weights_only=True). A truncated file, a foreign file or one crafted to run code
    on unpickling is refused with a one-line error."""
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: refused to load: the file holds objects other than tensors and plain data, "
                              f"which could run code ({first[:160]})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated or not a torch file: "
                              f"{str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_args" not in ckpt:
        raise CheckpointError(f"{path}: not a checkpoint of this project (no 'model' / 'model_args' entries)")
    version = ckpt.get("format_version", 1)  # files from before the version was written are format 1
    if not isinstance(version, int) or version > CKPT_FORMAT:
        raise CheckpointError(f"{path}: checkpoint format {version!r} is newer than this code reads ({CKPT_FORMAT}): "
                              f"update the project to load it")
    return ckpt


def model_dir(out_dir, model_name):
    return os.path.join(out_dir, model_name)


def find_checkpoint(name_or_path, out_dir="checkpoints", prefer="ckpt.pt"):
    """A model name (checkpoints/<name>/), a checkpoint folder or a .pt file -> the .pt path."""
    if os.path.isfile(name_or_path):
        return name_or_path
    folder = name_or_path if os.path.isdir(name_or_path) else model_dir(out_dir, name_or_path)
    for fname in (prefer, "ckpt.pt", "best.pt"):
        path = os.path.join(folder, fname)
        if os.path.exists(path):
            return path
    known = sorted(d for d in os.listdir(out_dir) if os.path.isdir(os.path.join(out_dir, d))) if os.path.isdir(out_dir) else []
    hint = f"known models: {', '.join(known)}" if known else "train one first with train.py"
    raise CheckpointError(f"no checkpoint for model '{name_or_path}' in {folder} ({hint})")


def latest_model_name(out_dir="checkpoints"):
    """The model trained (saved) most recently, for `python sample.py` with no arguments."""
    best, best_time = None, -1.0
    if os.path.isdir(out_dir):
        for d in os.listdir(out_dir):
            path = os.path.join(out_dir, d, "ckpt.pt")
            if os.path.exists(path) and os.path.getmtime(path) > best_time:
                best, best_time = d, os.path.getmtime(path)
    return best


def build_model(ckpt, out_dir="checkpoints", device="cpu"):
    """Rebuild the GPT a checkpoint describes, with its weights (LoRA adapters placed on their base).
    Returns the model (LoRA layers left unmerged, so training can go on)."""
    args = dict(ckpt["model_args"])
    base = ckpt.get("base")
    if base:  # adapters-only checkpoint: rebuild the base first
        model = load_base(base, out_dir)
        if model.config.block_size > args["block_size"]:
            model.crop_block_size(args["block_size"])
        model.set_dropout(args["dropout"])  # into every layer, not just the config: resume must be exact
        for k in ("use_bos_zero_training", "bos_scaling_factor"):
            setattr(model.config, k, args[k])
    else:
        model = GPT(GPTConfig(**args))
    if ckpt.get("lora"):
        lora.apply_lora(model, **ckpt["lora"])
    state = ckpt["model"]
    # an adapters-only checkpoint holds just the LoRA tensors: the base's weights are "missing" by design
    _, unexpected = model.load_state_dict(state, strict=not base)
    if unexpected:
        raise CheckpointError(f"checkpoint has tensors the model lacks: {', '.join(unexpected[:5])}")
    return model.to(device)


def load_base(base, out_dir="checkpoints"):
    """The frozen base a LoRA checkpoint names: another project model, or a Hugging Face GPT-2 directory."""
    if base["kind"] == "hf":
        model, _ = load_hf_gpt2(base["path"])
        return model
    ckpt = load_checkpoint(find_checkpoint(base["name"], out_dir))
    # a LoRA base is merged, as train.py's --init_from_model does, so the new adapters go on plain Linears.
    # Footgun: the base is read by name (its ckpt.pt); training that model further changes what these adapters sit on
    return lora.remove_lora(build_model(ckpt, out_dir))


def load_model(name_or_path, out_dir="checkpoints", device="cpu", prefer="ckpt.pt"):
    """(model, tokenizer, ckpt) for a model name / folder / .pt file: what sample.py and evaluate.py need."""
    path = find_checkpoint(name_or_path, out_dir, prefer)
    ckpt = load_checkpoint(path)
    model = build_model(ckpt, out_dir, device)
    tok = Tokenizer.from_state(ckpt["tokenizer"])
    return model, tok, ckpt
