"""
Scaffold fusion: a frozen base GPT steered by a second, LoRA-tuned "scaffold" GPT through cross-attention.

    python scaffold.py train --config_file configs/scaffold.json            # train fusers + scaffold adapters
    python scaffold.py train --config_file configs/scaffold.json --init_from resume   # go on after Ctrl-C / SIGTERM
    python scaffold.py generate --prompt "qwerty=" --scaffold_weight 0.7    # answer one prompt
    python scaffold.py evaluate --scaffold_weight 1,0.5,0 --exact_match     # validation figures at several weights
    python scaffold.py                                                       # interactive: train / a prompt / quit

The scaffold reads the prompt once; its final hidden states (after ln_f) are the context. The base reads
prompt + completion as usual, and after each layer i in cross_attn_layers a fuser lets its hidden state x look
at that context:
    x = x + influence_weight * gate(x) * c_proj(CrossAttention(q = ln(x), k, v = scaffold states))
Everything the fuser adds lives inside that residual branch (its LayerNorm included), so with influence_weight
0 the branch is skipped and the fused model IS the base model, logit for logit. c_proj starts at zero, so a
fresh fuser adds nothing either: training starts exactly at the base. The base is frozen; the fusers and the
scaffold's LoRA adapters train (train_fuser false freezes the fusers, for a run that starts from trained ones).
Base and scaffold may differ in width, depth and tokenizer: the fuser's key/value projection maps the
scaffold's width to the base's, and each model encodes the prompt with its own tokenizer.

Data: JSONL, one record per line. {"prompt", "completion"} is plain text: the base reads
BOS + prompt + completion + EOT, the scaffold BOS + prompt. Chat records (OpenAI "messages", ShareGPT
"conversations", Alpaca "instruction"; parsed by prepare_dataset.conversation_turns) are rendered with the chat
template; their last assistant turn is the completion, everything before it the prompt. The loss counts only the
completion's tokens and its closing EOT (prompt and padding masked, in validation too).

Saved as <out_dir>/<model_name>/scaffold.pt (the best validation loss): fuser weights, scaffold adapters, and
where the base and the scaffold come from; both are reloaded from there for generation. Training runs on the main
stack's pieces (train.py's AdamW, schedule, non-finite skip, signal handling, metrics.jsonl); the latest training
state goes to scaffold_ckpt.pt next to it after every evaluation and on SIGINT/SIGTERM, and init_from "resume" goes
on from there exactly.
"""

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn as nn
from torch.nn import functional as F

import lora
from checkpoint import CheckpointError, atomic_save, load_checkpoint, load_model, make_checkpoint
from config import ConfigError, parse_cli, read_settings
from data import DataError
from errors import GPTLabError, InputError, MissingFileError, first_line, one_line_errors
from model import KVCache, LayerNorm, configure_adamw, cross_entropy_loss, sample_next
from prepare_dataset import CHAT_SCHEMAS, conversation_turns, detect_schema
from runtime import MetricsLog, autocast_context, device_type_of, get_lr, pick_device, pick_dtype, stop_signals
from tokenizer import chat_prompt

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "scaffold.json")
REPEAT_NGRAM = 3  # generation stops at the first immediately repeated 3-gram ("a b c a b c") and cuts the repeat


@dataclass
class ScaffoldConfig:
    # --- the two models and where the result goes ---
    base_model: str = "scaffold_toy_base"  # frozen base: a project model (name in out_dir, folder or .pt) or a HF GPT-2 dir
    scaffold_model: str = "scaffold_toy_scaffold"  # the scaffold, same forms; may differ from the base in size
    out_dir: str = "checkpoints"
    model_name: str = "scaffold_toy"  # fusers + adapters are saved to <out_dir>/<model_name>/scaffold.pt
    # start fusers + adapters from this saved scaffold model (needed with train_fuser false); "resume": go on from
    # <out_dir>/<model_name>/scaffold_ckpt.pt exactly where that run stopped (optimizer, data position, RNG, ...)
    init_from: str = ""
    # --- data ---
    train_file: str = "data/scaffold_toy.jsonl"  # JSONL: {"prompt", "completion"} or chat records
    valid_split_ratio: float = 0.1  # fraction of the records held out for validation (seeded shuffle)
    # --- fusion ---
    cross_attn_layers: list = field(default_factory=lambda: [5, 7])  # base layers (0-based) followed by a fuser
    fuser_n_head: int = 0  # heads of each fuser's cross-attention; 0 = the base's n_head
    fuser_dropout: float = 0.0  # on the fuser's output, in training only
    influence_weight: float = 1.0  # in [0, 1]: scale of every fuser's contribution in training and evaluation
    train_fuser: bool = True  # false: only the scaffold's adapters train (fusers frozen, as the original did)
    # --- the scaffold's LoRA adapters ---
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.1
    lora_target: list = field(default_factory=lambda: ["c_attn", "attn.c_proj", "c_fc", "mlp.c_proj"])  # every Linear of a block (as "all"); lora.TARGETS names
    # --- optimisation: AdamW, linear warmup then cosine decay to min_lr (train.py's schedule) ---
    num_epochs: int = 3
    batch_size: int = 16
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-3
    warmup_ratio: float = 0.05  # fraction of all optimizer steps spent warming up
    min_lr: float = 0.0  # the learning rate at the last step (0: the decay ends where it always did, at zero)
    weight_decay: float = 0.01  # on 2-D weights only
    beta1: float = 0.9
    beta2: float = 0.999
    grad_clip: float = 1.0  # 0 disables clipping
    max_bad_steps: int = 5  # stop after this many non-finite losses/gradients in a row (each one is skipped)
    eval_interval: int = 0  # evaluate every N optimizer steps; 0 = at the end of every epoch only
    patience: int = 2  # stop after this many evaluations without a better val loss; 0 = never stop early
    log_interval: int = 20  # print a training line every N optimizer steps
    seed: int = 1337
    # --- sample generations (after every epoch, and the CLI's defaults) ---
    num_samples: int = 2  # validation prompts answered after every epoch
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = no top-k filtering
    # --- device ---
    device: str = "auto"  # auto | cpu | cuda | mps
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16 (auto: bf16 autocast where it is fast, else fp32)


def check_weight(weight, name="scaffold_weight"):
    """A scaffold/influence weight must be a number in [0, 1] (NaN is refused too)."""
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0.0 <= weight <= 1.0:
        raise InputError(f"{name} {weight!r} is outside [0, 1]: 0 is the base model alone, 1 the full scaffold influence")
    return float(weight)


def validate_scaffold_config(cfg, where="config"):
    """Range checks; each failure names the key and what is allowed."""
    def need(ok, key, what):
        if not ok:
            raise ConfigError(f"{where}: '{key}' = {getattr(cfg, key)!r} is out of range: {what}")
    for key in ("base_model", "scaffold_model", "model_name", "train_file"):
        need(bool(getattr(cfg, key)), key, "must not be empty")
    need(0.0 <= cfg.influence_weight <= 1.0, "influence_weight", "must lie in [0, 1]")
    need(0.0 < cfg.valid_split_ratio < 1.0, "valid_split_ratio", "must lie in (0, 1)")
    need(cfg.learning_rate > 0, "learning_rate", "must be > 0")
    need(0.0 <= cfg.warmup_ratio < 1.0, "warmup_ratio", "must lie in [0, 1)")
    need(0.0 <= cfg.min_lr <= cfg.learning_rate, "min_lr", "must lie in [0, learning_rate]")
    for key in ("fuser_dropout", "lora_dropout", "beta1", "beta2"):
        need(0.0 <= getattr(cfg, key) < 1.0, key, "must lie in [0, 1)")
    for key in ("num_epochs", "batch_size", "gradient_accumulation_steps", "lora_rank", "log_interval",
                "max_new_tokens", "max_bad_steps"):
        need(getattr(cfg, key) >= 1, key, "must be >= 1")
    for key in ("fuser_n_head", "eval_interval", "patience", "num_samples", "top_k", "temperature", "weight_decay",
                "grad_clip"):
        need(getattr(cfg, key) >= 0, key, "must be >= 0")
    need(cfg.lora_alpha > 0, "lora_alpha", "must be > 0")
    layers = cfg.cross_attn_layers
    try:
        cfg.cross_attn_layers = [int(i) for i in layers] if isinstance(layers, list) else None
    except (TypeError, ValueError):
        cfg.cross_attn_layers = None
    if not cfg.cross_attn_layers or any(i < 0 for i in cfg.cross_attn_layers):
        raise ConfigError(f"{where}: 'cross_attn_layers' = {layers!r} must be a non-empty list of base layer indices "
                          f"(0-based, e.g. [5, 7])")
    for key, allowed in (("device", ("auto", "cpu", "cuda", "mps")), ("dtype", ("auto", "float32", "bfloat16", "float16"))):
        value = getattr(cfg, key)
        if not (value in allowed or (key == "device" and value.startswith("cuda:"))):
            raise ConfigError(f"{where}: '{key}' = '{value}' is not one of {', '.join(allowed)}")
    if not cfg.train_fuser and not cfg.init_from:
        raise ConfigError(f"{where}: 'train_fuser' is false but 'init_from' is empty: fresh fusers have a zero output "
                          f"projection, so frozen ones would never let the scaffold reach the base; set init_from to a "
                          f"trained scaffold model, or train_fuser true")
    return cfg


def load_scaffold_config(config_file=None, overrides=None):
    """A ScaffoldConfig from an optional JSON preset and a dict of overrides (command-line strings or typed values).
    Keys map one to one onto the dataclass; an unknown key is refused with the closest valid name."""
    values = read_settings(config_file, overrides, ScaffoldConfig,
                           missing_hint="the scaffold preset is configs/scaffold.json", what="scaffold config key")
    return validate_scaffold_config(ScaffoldConfig(**values), config_file or "config")


# ---------------------------------------------------------------------------------------------------------------
# the fuser and the fused model

class CrossAttentionFuser(nn.Module):
    """One fuser: the base's hidden state x (B, T, C) attends to the scaffold's final hidden states (B, Ts, Cs).
    forward returns only the branch, gate * out; the caller adds weight * branch to the residual stream."""

    def __init__(self, n_embd, scaffold_n_embd, n_head, bias=True, dropout=0.0):
        super().__init__()
        if n_embd % n_head:
            raise ConfigError(f"fuser heads {n_head} do not divide the base's n_embd {n_embd}: choose fuser_n_head "
                             f"among the divisors of {n_embd}")
        self.ln = LayerNorm(n_embd, bias=bias)  # normalises the query/gate input only: the residual x is untouched
        self.c_q = nn.Linear(n_embd, n_embd, bias=bias)
        # keys and values come from the scaffold's width: this projection is also what makes a scaffold of
        # another width (Cs != C) fit the base
        self.c_kv = nn.Linear(scaffold_n_embd, 2 * n_embd, bias=bias)
        self.c_gate = nn.Linear(n_embd, 1)  # one sigmoid gate per base token
        self.c_proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.resid_dropout = nn.Dropout(dropout)
        self.n_head = n_head
        self.n_embd = n_embd
        # std 1/sqrt(fan_in), not GPT-2's 0.02: both inputs are LayerNorm outputs (unit scale per feature), and at
        # small widths 0.02 leaves queries, keys and values so faint that the fusers take many epochs to find the
        # scaffold at all (toy task, 8 epochs: val loss 0.68 with this init, 2.26 with 0.02)
        for m in (self.c_q, self.c_kv, self.c_gate):
            nn.init.normal_(m.weight, mean=0.0, std=m.in_features ** -0.5)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        # zero output projection: a fresh fuser adds exactly nothing, so training starts at the base model.
        # (Its own gradient is not zero: it sees the attention output. The rest get gradient once it moves.)
        nn.init.zeros_(self.c_proj.weight)
        if self.c_proj.bias is not None:
            nn.init.zeros_(self.c_proj.bias)

    def context(self, h, mask):
        """Scaffold states h (B, Ts, Cs) and mask (B, Ts) (1 = a real token, 0 = padding) -> (k, v, attn_mask):
        keys and values (B, nh, Ts, hs) and a (B, 1, 1, Ts) bool mask. Computed once per prompt."""
        B, Ts, _ = h.size()
        hs = self.n_embd // self.n_head
        k, v = self.c_kv(h).split(self.n_embd, dim=2)
        k = k.view(B, Ts, self.n_head, hs).transpose(1, 2)  # (B, nh, Ts, hs)
        v = v.view(B, Ts, self.n_head, hs).transpose(1, 2)  # (B, nh, Ts, hs)
        return k, v, mask.bool()[:, None, None, :]  # (B, 1, 1, Ts): True = may attend

    def forward(self, x, ctx):
        k, v, attn_mask = ctx
        B, T, C = x.size()
        h = self.ln(x)
        q = self.c_q(h).view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        # no causal mask: the scaffold read only the prompt, which the base has already read before any token it
        # predicts. Footgun: every row needs one unmasked key (an all-padding row gives NaN): prompts start with BOS.
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        gate = torch.sigmoid(self.c_gate(h))  # (B, T, 1)
        return gate * self.resid_dropout(self.c_proj(y))  # (B, T, C)


def check_layers(cross_attn_layers, n_layer, base="the base model"):
    """Sorted, unique layer indices, each a layer the base has."""
    layers = sorted({int(i) for i in cross_attn_layers})
    if not layers:
        raise ConfigError(f"cross_attn_layers is empty: name at least one base layer (0..{n_layer - 1})")
    for i in layers:
        if not 0 <= i < n_layer:
            raise ConfigError(f"cross_attn_layers: layer {i} does not exist: {base} has layers 0..{n_layer - 1} "
                             f"(set cross_attn_layers to indices in that range)")
    return layers


class ScaffoldFusion(nn.Module):
    """The frozen base, the scaffold, and one fuser after each base layer in cross_attn_layers."""

    def __init__(self, base, scaffold, cross_attn_layers, n_head=0, dropout=0.0):
        super().__init__()
        self.base = base
        self.scaffold = scaffold
        self.cross_attn_layers = check_layers(cross_attn_layers, base.config.n_layer)
        n_head = n_head or base.config.n_head
        self.fusers = nn.ModuleDict({
            str(i): CrossAttentionFuser(base.config.n_embd, scaffold.config.n_embd, n_head, base.config.bias, dropout)
            for i in self.cross_attn_layers})
        for p in base.parameters():
            p.requires_grad_(False)
        self.base.eval()

    def train(self, mode=True):
        super().train(mode)
        self.base.eval()  # frozen: its dropout stays off, so it computes the same function in training and evaluation
        return self

    def scaffold_states(self, sidx):
        """The scaffold's final hidden states (after ln_f) of (B, Ts) prompt ids -> (B, Ts, Cs)."""
        s = self.scaffold
        h = s.embed(sidx)
        for block in s.transformer.h:
            h = block(h)
        return s.transformer.ln_f(h)

    def encode_scaffold(self, sidx, smask):
        """Every fuser's (k, v, attn_mask) for the prompts (B, Ts) with mask (B, Ts): computed once, reused at every
        base position (and every generation step)."""
        h = self.scaffold_states(sidx)
        return {i: self.fusers[str(i)].context(h, smask) for i in self.cross_attn_layers}

    def forward(self, idx, context, targets=None, loss_mask=None, weight=1.0, kv_cache=None, last_only=False,
                loss_reduction="mean"):
        """The base's forward pass (as GPT.forward) with the fusers between its blocks -> (logits, loss).
        context: encode_scaffold's output. weight 0 skips the fusers entirely: the base's own logits, exactly."""
        weight = check_weight(weight)
        base = self.base
        start = kv_cache.pos if kv_cache is not None else 0
        x = base.embed(idx, start)  # (B, T, C)
        for i, block in enumerate(base.transformer.h):
            x = block(x, kv_cache, i)
            if weight > 0 and i in context:
                x = x + weight * self.fusers[str(i)](x, context[i])
        if kv_cache is not None:
            kv_cache.pos += idx.size(1)
        x = base.transformer.ln_f(x)
        if last_only:
            x = x[:, [-1], :]
        logits = base.lm_head(x)
        loss = None
        if targets is not None:
            loss = cross_entropy_loss(logits, targets, loss_mask, loss_reduction)
        return logits, loss

    def trainable_state_dict(self):
        """What a saved scaffold model holds: the fusers and the scaffold's LoRA adapters (never the base)."""
        state = {f"fusers.{k}": v for k, v in self.fusers.state_dict().items()}
        state.update({f"scaffold.{k}": v for k, v in lora.lora_state_dict(self.scaffold).items()})
        return state


# ---------------------------------------------------------------------------------------------------------------
# building, saving and loading

def is_hf_dir(path):
    """A Hugging Face GPT-2 directory: config.json and no project checkpoint beside it (project folders hold a
    config.json too, next to ckpt.pt / best.pt)."""
    return os.path.isdir(path) and os.path.exists(os.path.join(path, "config.json")) and not any(
        os.path.exists(os.path.join(path, f)) for f in ("ckpt.pt", "best.pt"))


def load_gpt(source, device="cpu"):
    """{"kind": "model", "name", "out_dir"} or {"kind": "hf", "path"} -> (GPT, Tokenizer). A LoRA model is merged into
    a plain GPT first (the scaffold gets adapters of its own)."""
    if source["kind"] == "hf":
        from hf import load_hf_gpt2
        model, tok = load_hf_gpt2(source["path"])
    else:
        model, tok, _ = load_model(source["name"], source.get("out_dir", "checkpoints"))
        lora.remove_lora(model)
    return model.to(device), tok


def source_of(name, out_dir):
    if is_hf_dir(name):
        return {"kind": "hf", "path": os.path.abspath(name)}
    return {"kind": "model", "name": name, "out_dir": out_dir}


def build_fused(cfg, device="cpu", log=print):
    """The fused model a config describes: base and scaffold loaded, LoRA on the scaffold, fresh fusers (or the
    ones of cfg.init_from; with init_from "resume" the caller loads the saved state). Returns (fused, base_tok, scaffold_tok, info) with info the plain data a save needs."""
    base_src, scaffold_src = source_of(cfg.base_model, cfg.out_dir), source_of(cfg.scaffold_model, cfg.out_dir)
    base, base_tok = load_gpt(base_src, device)
    scaffold, scaffold_tok = load_gpt(scaffold_src, device)
    check_layers(cfg.cross_attn_layers, base.config.n_layer, f"base model '{cfg.base_model}'")
    lora_kwargs = dict(rank=cfg.lora_rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, targets=cfg.lora_target)
    lora.apply_lora(scaffold, **lora_kwargs)
    fused = ScaffoldFusion(base, scaffold, cfg.cross_attn_layers, cfg.fuser_n_head, cfg.fuser_dropout).to(device)
    if cfg.init_from and cfg.init_from != "resume":  # resume: train() puts the saved state in
        ckpt = load_checkpoint(saved_path(cfg.init_from, cfg.out_dir))
        load_trainable(fused, ckpt, saved_path(cfg.init_from, cfg.out_dir))
        log(f"init: fusers and adapters from '{cfg.init_from}' (val loss {ckpt.get('val_loss')})")
    for p in fused.fusers.parameters():
        p.requires_grad_(cfg.train_fuser)
    model_args = {"cross_attn_layers": fused.cross_attn_layers, "n_head": cfg.fuser_n_head or base.config.n_head,
                  "dropout": cfg.fuser_dropout}
    info = {"base": base_src, "scaffold": scaffold_src, "lora": lora_kwargs, "model_args": model_args}
    return fused, base_tok, scaffold_tok, info


def saved_path(model_name, out_dir="checkpoints"):
    """A saved scaffold model: a name in out_dir, its folder, or the .pt file itself."""
    if os.path.isfile(model_name):
        return model_name
    folder = model_name if os.path.isdir(model_name) else os.path.join(out_dir, model_name)
    return os.path.join(folder, "scaffold.pt")


def load_trainable(fused, ckpt, path):
    """Put a saved model's fusers + adapters into `fused`, checking that they fit exactly."""
    missing, unexpected = fused.load_state_dict(ckpt["model"], strict=False)
    ours = set(fused.trainable_state_dict())
    missing = [k for k in missing if k in ours]
    if missing or unexpected:
        raise CheckpointError(f"{path}: fusers/adapters do not fit this base + scaffold (missing {missing[:3]}, "
                              f"unexpected {list(unexpected)[:3]}): use the models and cross_attn_layers it was trained with")


def load_fused(model_name, out_dir="checkpoints", device="cpu"):
    """A saved scaffold model, rebuilt for generation -> (fused, base_tok, scaffold_tok, ckpt). The base and the
    scaffold are loaded from where the save says they came from."""
    path = saved_path(model_name, out_dir)
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no saved scaffold model '{model_name}' (train one first: "
                              f"python scaffold.py train --config_file configs/scaffold.json)")
    ckpt = load_checkpoint(path)  # weights_only=True
    if ckpt.get("kind") != "scaffold":
        raise CheckpointError(f"{path}: not a scaffold model (use sample.py for plain GPT checkpoints)")
    base, base_tok = load_gpt(ckpt["base"], device)
    scaffold, scaffold_tok = load_gpt(ckpt["scaffold"], device)
    lora.apply_lora(scaffold, **ckpt["lora"])
    args = ckpt["model_args"]
    fused = ScaffoldFusion(base, scaffold, args["cross_attn_layers"], args["n_head"], args["dropout"]).to(device)
    load_trainable(fused, ckpt, path)
    return fused.eval(), base_tok, scaffold_tok, ckpt


# ---------------------------------------------------------------------------------------------------------------
# data

def parse_record(rec, where):
    """One JSON record -> {"where", "prompt", "turns", "completion"}: prompt (plain text) or turns (chat history),
    the other None."""
    if not isinstance(rec, dict):
        raise DataError(f"{where}: not a JSON object; each line needs {{\"prompt\": ..., \"completion\": ...}}")
    schema = detect_schema(rec)  # prepare_dataset's chat schemas, but a prompt/completion pair is plain text here
    if schema not in (None, "prompt_completion"):
        turns, reason = conversation_turns(rec, schema)
        if reason:
            raise DataError(f"{where}: unusable chat record ({reason}); fix or remove the line")
        return {"where": where, "prompt": None, "turns": turns[:-1], "completion": turns[-1][1]}
    missing = [k for k in ("prompt", "completion") if not isinstance(rec.get(k), str)]
    if missing:
        chat_keys = " / ".join(s.keys[0] for name, s in CHAT_SCHEMAS.items() if name != "prompt_completion")
        raise DataError(f"{where}: record has no {' and no '.join(repr(k) for k in missing)} string; each line needs "
                        f"{{\"prompt\": ..., \"completion\": ...}} (or a chat record with {chat_keys})")
    return {"where": where, "prompt": rec["prompt"], "turns": None, "completion": rec["completion"]}


def read_examples(path):
    """A JSONL file -> [example, ...] (parse_record); any bad line is an error naming file:line."""
    if not os.path.exists(path):
        raise MissingFileError(f"{path}: training file not found (python data/make_scaffold_toy.py writes the toy set)")
    examples = []
    with open(path, encoding="utf-8") as f:
        try:
            lines = list(enumerate(f, 1))
        except UnicodeDecodeError:
            raise DataError(f"{path}: not UTF-8 text; convert the file to UTF-8") from None
    for lineno, line in lines:
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not valid JSON ({e.msg}); each line must be one JSON object") from None
        examples.append(parse_record(rec, where))
    if not examples:
        raise DataError(f"{path}: no records (expected one JSON object per line)")
    return examples


def prompt_ids(tok, ex):
    """What a model reads before the completion: BOS + prompt text, or the chat template up to the reply marker."""
    if ex["turns"] is not None:
        return chat_prompt(tok, ex["turns"])
    return [tok.eot_token] + tok.encode(ex["prompt"])


def encode_example(ex, base_tok, scaffold_tok):
    """-> (base ids, loss mask, scaffold ids). The mask is 1 on the completion and its closing EOT."""
    try:
        prompt = prompt_ids(base_tok, ex)
        completion = base_tok.encode(ex["completion"]) + [base_tok.eot_token]
        sids = prompt_ids(scaffold_tok, ex)
    except ValueError as e:
        raise DataError(f"{ex['where']}: {e}") from None
    return prompt + completion, [0] * len(prompt) + [1] * len(completion), sids


def encode_examples(examples, base_tok, scaffold_tok, base_block, scaffold_block, log=print):
    """Encode every example -> [(ids, mask, sids, example), ...]; the ones too long for a model's block_size are
    skipped (and counted)."""
    out, too_long = [], []
    for ex in examples:
        ids, mask, sids = encode_example(ex, base_tok, scaffold_tok)
        if len(ids) - 1 > base_block or len(sids) > scaffold_block:
            too_long.append(ex["where"])
            continue
        out.append((ids, mask, sids, ex))
    if too_long:
        log(f"skipped {len(too_long)} records longer than the block size (base {base_block}, scaffold "
            f"{scaffold_block} tokens), e.g. {', '.join(too_long[:3])}")
    if not out:
        raise DataError(f"no record fits the models' block sizes (base {base_block}, scaffold {scaffold_block})")
    return out


def split_examples(encoded, ratio, seed):
    """Seeded shuffle, then the first round(ratio * n) (at least 1) records are validation."""
    if len(encoded) < 2:
        raise DataError(f"{len(encoded)} usable record(s): need at least 2 to hold one out for validation")
    perm = torch.randperm(len(encoded), generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = min(len(encoded) - 1, max(1, round(ratio * len(encoded))))
    return [encoded[i] for i in perm[n_val:]], [encoded[i] for i in perm[:n_val]]


def load_split(cfg, fused, base_tok, scaffold_tok, log=print):
    """cfg.train_file read, encoded for both models and split -> (examples, train_set, val_set). The same config
    always gives the same split (evaluate uses this to find the training run's validation records)."""
    examples = read_examples(cfg.train_file)
    encoded = encode_examples(examples, base_tok, scaffold_tok, fused.base.config.block_size,
                              fused.scaffold.config.block_size, log)
    train_set, val_set = split_examples(encoded, cfg.valid_split_ratio, cfg.seed)
    return examples, train_set, val_set


def collate(items, device):
    """[(ids, mask, sids, example), ...] -> X, Y, M (B, T) and S, SM (B, Ts), right-padded. Padding: target -1, mask 0;
    scaffold padding has SM 0 (the fusers never attend to it). Right padding is safe for the causal models: real
    tokens never see the padding after them."""
    B = len(items)
    T = max(len(item[0]) for item in items) - 1
    Ts = max(len(item[2]) for item in items)
    X = torch.zeros(B, T, dtype=torch.long)
    Y = torch.full((B, T), -1, dtype=torch.long)
    M = torch.zeros(B, T, dtype=torch.long)
    S = torch.zeros(B, Ts, dtype=torch.long)
    SM = torch.zeros(B, Ts, dtype=torch.long)
    for b, (ids, mask, sids, _) in enumerate(items):
        n = len(ids) - 1
        X[b, :n] = torch.tensor(ids[:-1])
        Y[b, :n] = torch.tensor(ids[1:])
        M[b, :n] = torch.tensor(mask[1:])  # the mask of each target
        S[b, :len(sids)] = torch.tensor(sids)
        SM[b, :len(sids)] = 1
    return [t.to(device) for t in (X, Y, M, S, SM)]


def batches(items, batch_size, device):
    return [collate(items[i:i + batch_size], device) for i in range(0, len(items), batch_size)]


# ---------------------------------------------------------------------------------------------------------------
# generation

def cut_repetition(ids, n=REPEAT_NGRAM):
    """ids cut after the first n-gram that is immediately repeated: [a b c a b c d] -> [a b c] (n=3).
    Only looks at windows that fit in the list (never indexes past its end)."""
    for i in range(len(ids) - 2 * n + 1):
        if ids[i:i + n] == ids[i + n:i + 2 * n]:
            return ids[:i + n]
    return list(ids)


@torch.no_grad()
def generate(fused, ids, scaffold_ids, max_new_tokens, scaffold_weight=1.0, temperature=0.0, top_k=0,
             stop_token=None, generator=None, ngram=REPEAT_NGRAM):
    """New token ids after the base prompt `ids` (list), with the scaffold reading `scaffold_ids`. The scaffold
    context is computed once; the base decodes with its KV cache. Stops at stop_token (not returned), at
    max_new_tokens, when the base's block_size is full, or at the first immediately repeated n-gram (cut off)."""
    scaffold_weight = check_weight(scaffold_weight)
    cfg = fused.base.config
    device = fused.base.lm_head.weight.device
    if len(ids) >= cfg.block_size:
        raise InputError(f"prompt of {len(ids)} tokens does not fit the base's block_size {cfg.block_size}")
    if len(scaffold_ids) > fused.scaffold.config.block_size:
        scaffold_ids = scaffold_ids[-fused.scaffold.config.block_size:]  # the scaffold keeps the prompt's end
    sidx = torch.tensor([scaffold_ids], dtype=torch.long, device=device)
    context = fused.encode_scaffold(sidx, torch.ones_like(sidx))
    cache = KVCache(cfg.n_layer, 1, cfg.n_head, cfg.block_size, cfg.n_embd // cfg.n_head)
    logits, _ = fused(torch.tensor([ids], dtype=torch.long, device=device), context, weight=scaffold_weight,
                      kv_cache=cache, last_only=True)
    new = []
    for _ in range(max_new_tokens):
        nxt = int(sample_next(logits[:, -1, :], temperature, top_k or None, None, generator)[0])
        if nxt == stop_token:
            break
        new.append(nxt)
        if ngram and len(new) >= 2 * ngram and new[-2 * ngram:-ngram] == new[-ngram:]:
            return cut_repetition(new, ngram)  # checked every step, so this is the first repeat
        if cache.pos >= cfg.block_size:  # no room for another position in the base
            break
        x = torch.tensor([[nxt]], dtype=torch.long, device=device)
        logits, _ = fused(x, context, weight=scaffold_weight, kv_cache=cache)
    return new


def answer(fused, base_tok, scaffold_tok, ex, **kw):
    """The completion text for an example {"prompt"} or {"turns"} (see prompt_ids)."""
    new = generate(fused, prompt_ids(base_tok, ex), prompt_ids(scaffold_tok, ex), stop_token=base_tok.eot_token, **kw)
    return base_tok.decode(new)


def exact_match(fused, base_tok, scaffold_tok, examples, weight, max_new_tokens):
    """Fraction of examples whose greedy completion is exactly the expected one."""
    fused.eval()
    hits = sum(answer(fused, base_tok, scaffold_tok, ex, max_new_tokens=max_new_tokens, scaffold_weight=weight)
               == ex["completion"] for ex in examples)
    return hits / max(len(examples), 1)


# ---------------------------------------------------------------------------------------------------------------
# training: the run state built once (setup), then the loop (train) of short paragraphs

class ScaffoldError(GPTLabError, RuntimeError):
    """A scaffold run that cannot go on as configured: the message says what and how to fix it."""


# settings a resumed run must share with the run it continues (the model, the data split, the batches);
# the rest (learning rate, num_epochs, patience, intervals, ...) may change, as in train.py
RESUME_KEYS = ("base_model", "scaffold_model", "cross_attn_layers", "fuser_n_head", "train_fuser", "lora_rank",
               "lora_alpha", "lora_target", "train_file", "valid_split_ratio", "seed", "batch_size",
               "gradient_accumulation_steps")


def lr_at(step, cfg, total_steps):
    """The main stack's schedule (runtime.get_lr): linear warmup over warmup_ratio of all steps, then cosine
    decay to min_lr at the last step."""
    return get_lr(step, cfg.learning_rate, cfg.min_lr, int(cfg.warmup_ratio * total_steps), total_steps)


@torch.no_grad()
def evaluate_loss(fused, val_batches, weight, ctx, base_alone=False):
    """Mean loss over the completion tokens of every validation batch (summed, then divided by their count).
    base_alone: the frozen base through its own GPT.forward, without the fused model's code at all."""
    was_training = fused.training
    fused.eval()
    total, count = 0.0, 0
    for X, Y, M, S, SM in val_batches:
        with ctx:
            if base_alone:
                _, loss_sum = fused.base(X, Y, M, loss_reduction="sum")
            else:
                _, loss_sum = fused(X, fused.encode_scaffold(S, SM), Y, M, weight=weight, loss_reduction="sum")
        total += loss_sum.item()
        count += int(M.sum())
    fused.train(was_training)
    return total / max(count, 1)


def make_optimizer(fused, cfg, device_type):
    """The main stack's AdamW (model.configure_adamw: decay on 2-D weights, the fused kernel on CPU and CUDA) over
    what trains: the fusers (unless train_fuser is false) and the scaffold's adapters."""
    if not any(p.requires_grad for p in fused.parameters()):
        raise ConfigError("nothing to train: the fusers are frozen (train_fuser false) and the scaffold has no "
                          "adapters")
    return configure_adamw(fused.parameters(), cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2), device_type)


@dataclass
class Run:
    """Everything a training run holds. setup() builds it once; the loop changes only the progress fields, which
    are what the training state (scaffold_ckpt.pt) saves and --init_from resume restores."""
    cfg: ScaffoldConfig
    log: object
    device: str
    ctx: object  # autocast (or nothing in fp32)
    scaler: object  # fp16's GradScaler (a no-op otherwise)
    fused: ScaffoldFusion
    base_tok: object
    scaffold_tok: object
    info: dict  # build_fused's: where the models come from, the fusers' and adapters' settings
    data_format: str  # "chat" or "text"
    train_set: list
    val_batches: list
    val_examples: list  # answered after every epoch
    optimizer: object
    total_steps: int
    folder: str
    metrics: MetricsLog
    base_val: float = float("nan")  # the frozen base's val loss
    # --- progress ---
    step: int = 0  # optimizer steps done
    epoch: int = 1  # the epoch under way (num_epochs + 1 once all are done)
    position: int = 0  # micro-batches of this epoch's order already trained on
    order_rng: object = None  # the order generator's state at this epoch's start: draws this epoch's shuffle
    best_val: float = float("inf")
    best_state: dict = None  # the trainable tensors at best_val
    best_epoch: int = 0
    bad_evals: int = 0  # evaluations in a row without a better val loss (patience)
    bad_steps: int = 0  # non-finite steps in a row (max_bad_steps)
    stopped_early: bool = False
    history: list = field(default_factory=list)  # [{"epoch", "step", "val_loss"}, ...]
    saved_at: tuple = None  # (epoch, position) of the last training state saved

    @property
    def path(self):  # the best model: what generate / evaluate load
        return os.path.join(self.folder, "scaffold.pt")

    @property
    def state_path(self):  # the latest training state: what --init_from resume continues from
        return os.path.join(self.folder, "scaffold_ckpt.pt")


def setup(cfg, log):
    """The whole run state, once: device and precision, the fused model, the data, the optimizer, and with
    init_from "resume" everything the saved training state holds."""
    device = pick_device(cfg.device)
    device_type = device_type_of(device)
    torch.manual_seed(cfg.seed)
    dtype = pick_dtype(cfg.dtype, device_type)
    folder = os.path.join(cfg.out_dir, cfg.model_name)
    saved = load_training_state(cfg, os.path.join(folder, "scaffold_ckpt.pt")) if cfg.init_from == "resume" else None

    fused, base_tok, scaffold_tok, info = build_fused(cfg, device, log)
    examples, train_set, val_set = load_split(cfg, fused, base_tok, scaffold_tok, log)
    steps_per_epoch = math.ceil(len(train_set) / (cfg.batch_size * cfg.gradient_accumulation_steps))
    run = Run(cfg=cfg, log=log, device=device, ctx=autocast_context(device_type, dtype),
              scaler=torch.amp.GradScaler("cuda", enabled=(dtype == "float16" and device_type == "cuda")),
              fused=fused, base_tok=base_tok, scaffold_tok=scaffold_tok, info=info,
              data_format="chat" if any(ex["turns"] is not None for ex in examples) else "text",
              train_set=train_set, val_batches=batches(val_set, cfg.batch_size, device),
              val_examples=[item[3] for item in val_set[:cfg.num_samples]],
              optimizer=make_optimizer(fused, cfg, device_type), total_steps=steps_per_epoch * cfg.num_epochs,
              folder=folder, metrics=None, order_rng=torch.Generator().manual_seed(cfg.seed).get_state())
    trainable, total = lora.count_parameters(fused)
    log(f"base {cfg.base_model} ({fused.base.config.n_layer}x{fused.base.config.n_embd}, frozen), scaffold "
        f"{cfg.scaffold_model} ({fused.scaffold.config.n_layer}x{fused.scaffold.config.n_embd}, LoRA rank "
        f"{cfg.lora_rank}), fusers after layers {fused.cross_attn_layers}; trainable {trainable:,} of {total:,} params")
    log(f"data: {cfg.train_file}: {len(train_set)} train / {len(val_set)} val records ({run.data_format}); "
        f"{steps_per_epoch} steps per epoch; dtype {dtype} on {device}")
    if saved is not None:
        restore(run, saved)
        log(f"resuming {cfg.model_name} from step {run.step} (epoch {run.epoch}, {run.position} micro-batches in)")
    # start_iter -1 on a fresh run: a metrics.jsonl left by an earlier run of this name is dropped whole
    run.metrics = MetricsLog(folder, run.step if saved is not None else -1, True)
    if saved is None:
        os.makedirs(folder, exist_ok=True)
        run.base_val = evaluate_loss(fused, run.val_batches, 0.0, run.ctx, base_alone=True)
        run.metrics.write(iter=0, base_val_loss=run.base_val)
    log(f"frozen base alone: val loss {run.base_val:.4f}")
    return run


def load_training_state(cfg, path):
    """The training state a resumed run continues from, checked against this config."""
    if not os.path.exists(path):
        raise MissingFileError(f"--init_from resume: no training state at {path} (train '{cfg.model_name}' first, "
                               f"without init_from resume)")
    ckpt = load_checkpoint(path)
    if ckpt.get("kind") != "scaffold" or "optimizer" not in ckpt:
        raise CheckpointError(f"{path}: not a scaffold training state (no optimizer state to resume from)")
    old = ckpt["config"]
    for key in RESUME_KEYS:
        if key in old and old[key] != getattr(cfg, key):
            raise CheckpointError(f"{path}: resuming with a different setting: '{key}' is {getattr(cfg, key)!r} now "
                                  f"but {old[key]!r} in the saved run; use the config the run started with")
    return ckpt


def restore(run, ckpt):
    """Put a saved training state into a freshly set-up run: weights, optimizer, scaler, the data position and
    the order generator, the random state, the best model and the patience counters."""
    if ckpt["train_records"] != len(run.train_set):
        raise CheckpointError(f"{run.state_path}: the saved run trained on {ckpt['train_records']} records, "
                              f"{run.cfg.train_file} now gives {len(run.train_set)}: resume with the file it started "
                              f"with")
    load_trainable(run.fused, ckpt, run.state_path)
    run.optimizer.load_state_dict(ckpt["optimizer"])
    if run.scaler.is_enabled() and ckpt.get("scaler"):
        run.scaler.load_state_dict(ckpt["scaler"])
    for key in ("epoch", "position", "order_rng"):
        setattr(run, key, ckpt["loader"][key])
    torch.set_rng_state(ckpt["rng"]["torch"])
    if ckpt["rng"].get("cuda") is not None and run.device.startswith("cuda"):
        torch.cuda.set_rng_state(ckpt["rng"]["cuda"], run.device)
    run.step, run.base_val, run.best_state = ckpt["iter_num"], ckpt["base_val_loss"], ckpt["best_model"]
    run.best_val = ckpt["best_val_loss"] if ckpt["best_val_loss"] is not None else float("inf")
    for key in ("best_epoch", "bad_evals", "bad_steps", "stopped_early", "history"):
        setattr(run, key, ckpt[key])


def scaffold_checkpoint(run, val_loss, with_state):
    """The scaffold's checkpoint (checkpoint.make_checkpoint's layout): the fusers and adapters, where the base and
    the scaffold come from, both tokenizers. with_state: the whole training state too (for --init_from resume)."""
    cfg, info = run.cfg, run.info
    ck = make_checkpoint(run.fused.trainable_state_dict(), info["model_args"], asdict(cfg),
                         run.base_tok.state_dict(), run.step, None if run.best_val == float("inf") else run.best_val,
                         info["lora"], info["base"], run.data_format, kind="scaffold", scaffold=info["scaffold"],
                         scaffold_tokenizer=run.scaffold_tok.state_dict(), epoch=run.epoch, step=run.step,
                         val_loss=val_loss, base_val_loss=run.base_val)
    if with_state:
        rng = {"torch": torch.get_rng_state(),
               "cuda": torch.cuda.get_rng_state(run.device) if run.device.startswith("cuda") else None}
        ck.update(optimizer=run.optimizer.state_dict(),
                  scaler=run.scaler.state_dict() if run.scaler.is_enabled() else None,
                  loader={"epoch": run.epoch, "position": run.position, "order_rng": run.order_rng}, rng=rng,
                  best_model=run.best_state, best_epoch=run.best_epoch, bad_evals=run.bad_evals,
                  bad_steps=run.bad_steps, stopped_early=run.stopped_early, history=run.history,
                  train_records=len(run.train_set))
    return ck


def save_training_state(run):
    last_val = run.history[-1]["val_loss"] if run.history else None
    atomic_save(scaffold_checkpoint(run, last_val, with_state=True), run.state_path)
    run.saved_at = (run.epoch, run.position)


def epoch_order(run):
    """This epoch's micro-batches (a seeded shuffle of the train records) and the order generator's state for the
    next epoch. Drawn from run.order_rng, so a resumed run draws the same order as the run it continues."""
    gen = torch.Generator()
    gen.set_state(run.order_rng)
    order = torch.randperm(len(run.train_set), generator=gen).tolist()
    bs = run.cfg.batch_size
    micro = [collate([run.train_set[i] for i in order[j:j + bs]], run.device) for j in range(0, len(order), bs)]
    return micro, gen.get_state()


def train_step(run, group):
    """One optimizer step over the micro-batches in `group` -> (the step's loss per completion token, whether it
    was taken). A step whose loss or gradient is not finite is skipped: the weights and Adam's state stay as they
    were."""
    fused, scaler, optimizer = run.fused, run.scaler, run.optimizer
    count = sum(int(b[2].sum()) for b in group)  # completion tokens of the whole step
    loss_total = 0.0
    for X, Y, M, S, SM in group:
        with run.ctx:
            _, loss_sum = fused(X, fused.encode_scaffold(S, SM), Y, M, weight=run.cfg.influence_weight,
                                loss_reduction="sum")
        # divided by the step's token count: accumulated micro-batches equal one big batch
        scaler.scale(loss_sum / max(count, 1)).backward()
        loss_total += loss_sum.item()
    scaler.unscale_(optimizer)
    params = [p for p in fused.parameters() if p.requires_grad]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, run.cfg.grad_clip or float("inf"))  # inf: the norm, no clip
    ok = math.isfinite(loss_total) and bool(torch.isfinite(grad_norm))
    if ok:
        scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss_total / max(count, 1), ok


def count_bad_step(run, ok, loss):
    """Non-finite steps are skipped and counted; max_bad_steps of them in a row stop the run."""
    if ok:
        run.bad_steps = 0
        return
    cfg = run.cfg
    run.bad_steps += 1
    run.log(f"step {run.step}: non-finite loss or gradient ({loss}); step skipped "
            f"({run.bad_steps}/{cfg.max_bad_steps})")
    run.metrics.write(iter=run.step, epoch=run.epoch, skipped=True)
    if run.bad_steps >= cfg.max_bad_steps:
        raise ScaffoldError(f"{run.bad_steps} non-finite steps in a row at step {run.step} (epoch {run.epoch}): lower "
                            f"learning_rate ({cfg.learning_rate}) or use dtype float32; the best model so far is kept "
                            f"at {run.path}, the last training state at {run.state_path}")


def evaluate_and_keep(run):
    """Evaluate, keep (and save) the best, count evaluations without improvement. Returns True to stop early."""
    cfg = run.cfg
    val = evaluate_loss(run.fused, run.val_batches, cfg.influence_weight, run.ctx)
    run.history.append({"epoch": run.epoch, "step": run.step, "val_loss": val})
    run.metrics.write(iter=run.step, epoch=run.epoch, val_loss=val)
    run.metrics.plot()
    mem = f", max mem {torch.cuda.max_memory_allocated() / 2**30:.2f}GiB" if run.device.startswith("cuda") else ""
    run.log(f"epoch {run.epoch} step {run.step}: val loss {val:.4f} (frozen base {run.base_val:.4f}){mem}")
    if val < run.best_val:
        run.best_val, run.best_epoch, run.bad_evals = val, run.epoch, 0
        run.best_state = {k: v.detach().clone() for k, v in run.fused.trainable_state_dict().items()}
        atomic_save(scaffold_checkpoint(run, val, with_state=False), run.path)
        return False
    run.bad_evals += 1
    return bool(cfg.patience) and run.bad_evals >= cfg.patience


def log_samples(run):
    """Answers to a few validation prompts. temperature > 0 draws from a generator of its own, so the run's
    random state (dropout) is the same with or without samples."""
    cfg, fused = run.cfg, run.fused
    fused.eval()
    gen = torch.Generator(device=run.device).manual_seed(cfg.seed)
    for ex in run.val_examples:
        got = answer(fused, run.base_tok, run.scaffold_tok, ex, max_new_tokens=cfg.max_new_tokens,
                     scaffold_weight=cfg.influence_weight, temperature=cfg.temperature, top_k=cfg.top_k, generator=gen)
        shown = ex["prompt"] if ex["prompt"] is not None else ex["turns"][-1][1]
        run.log(f"  sample: {shown!r} -> {got!r} (expected {ex['completion']!r})")
    fused.train()


def end_epoch(run, next_order_rng):
    """The end of an epoch (or of an early-stopped one): evaluate, answer sample prompts, maybe stop early; the
    training state saved then points at the next epoch."""
    cfg = run.cfg
    if not run.stopped_early:
        run.stopped_early = evaluate_and_keep(run)
    log_samples(run)
    if run.stopped_early:
        run.log(f"early stop: no better val loss in {cfg.patience} evaluations (best {run.best_val:.4f}, epoch "
                f"{run.best_epoch})")
    run.epoch, run.position, run.order_rng = run.epoch + 1, 0, next_order_rng
    save_training_state(run)


def train(cfg, log=print):
    """Train the fusers and the scaffold's adapters as configured; the best model (val loss) is saved to
    scaffold.pt, the latest training state to scaffold_ckpt.pt (after every evaluation, and on SIGINT/SIGTERM).
    Returns a summary dict: base_val_loss, best_val_loss, val_loss_by_weight, epochs, steps, stopped_early,
    stopped_by_signal, history, path, state_path, and the fused model itself (the best state, in eval mode)."""
    run = setup(cfg, log)
    ga = cfg.gradient_accumulation_steps
    t0 = time.time()
    run.fused.train()
    with stop_signals() as stop:
        while run.epoch <= cfg.num_epochs and not run.stopped_early and not stop:
            micro, next_order_rng = epoch_order(run)
            while run.position < len(micro) and not stop:
                group = micro[run.position:run.position + ga]
                run.position += len(group)
                epoch_done = run.position >= len(micro)

                # the learning rate: warmup, then cosine decay (runtime.get_lr)
                lr = lr_at(run.step, cfg, run.total_steps)
                for g in run.optimizer.param_groups:
                    g["lr"] = lr

                # forward, backward, step (or skip it when the loss or the gradient is not finite)
                loss, ok = train_step(run, group)
                run.step += 1
                count_bad_step(run, ok, loss)

                # log
                if ok and run.step % cfg.log_interval == 0:
                    cuda = run.device.startswith("cuda")
                    mem = f", mem {torch.cuda.max_memory_allocated() / 2**30:.2f}GiB" if cuda else ""
                    log(f"epoch {run.epoch} step {run.step}/{run.total_steps}: loss {loss:.4f}, lr {lr:.2e}, "
                        f"{time.time() - t0:.0f}s{mem}")
                    run.metrics.write(iter=run.step, epoch=run.epoch, loss=loss, lr=lr, time=time.time() - t0)

                # evaluate every eval_interval steps (the epoch's last step is evaluated below), save the state
                if cfg.eval_interval and run.step % cfg.eval_interval == 0 and not epoch_done:
                    run.stopped_early = evaluate_and_keep(run)
                    save_training_state(run)
                    if run.stopped_early:
                        break
            if run.position < len(micro) and not run.stopped_early:
                break  # stopped by a signal mid-epoch: saved below
            end_epoch(run, next_order_rng)
        if stop:
            if run.saved_at != (run.epoch, run.position):
                save_training_state(run)
            log(f"stopped by signal {stop[0]} at step {run.step}; training state saved to {run.state_path} "
                f"(go on with --init_from resume)")
            return summary(run, None, stopped_by_signal=True)
    return finish(run)


def finish(run):
    """The best model back in place, its figures at several influence weights, the summary."""
    if run.best_state is None:
        raise ScaffoldError(f"the validation loss was never finite ({run.history[-1]['val_loss']}): lower "
                            f"learning_rate or use dtype float32")
    run.fused.load_state_dict(run.best_state, strict=False)
    run.fused.eval()
    by_weight = {w: evaluate_loss(run.fused, run.val_batches, w, run.ctx) for w in (1.0, 0.5, 0.0)}
    run.log(f"best model (epoch {run.best_epoch}) saved to {run.path}")
    run.log("val loss by scaffold_weight: " + ", ".join(f"{w:g}: {v:.4f}" for w, v in by_weight.items())
            + f"; frozen base alone: {run.base_val:.4f}")
    run.metrics.plot()
    return summary(run, by_weight)


def summary(run, by_weight, stopped_by_signal=False):
    return {"base_val_loss": run.base_val, "best_val_loss": run.best_val, "val_loss_by_weight": by_weight,
            "epochs": min(run.epoch, run.cfg.num_epochs) if stopped_by_signal else run.epoch - 1, "steps": run.step,
            "stopped_early": run.stopped_early, "stopped_by_signal": stopped_by_signal, "history": run.history,
            "path": run.path, "state_path": run.state_path, "model": run.fused}


# ---------------------------------------------------------------------------------------------------------------
# command line

def settings(config_file=None):
    """The preset's settings (or the defaults when the default preset is missing): where generate/evaluate look
    for the saved model and their generation defaults."""
    if config_file or os.path.exists(DEFAULT_CONFIG):
        return load_scaffold_config(config_file or DEFAULT_CONFIG)
    return ScaffoldConfig()


def parse_generate_args(argv, command):
    p = argparse.ArgumentParser(prog=f"scaffold.py {command}")
    p.add_argument("--config_file", default=None, help="preset naming model_name/out_dir (default configs/scaffold.json)")
    p.add_argument("--model_name", default=None, help="saved scaffold model (default: the preset's model_name)")
    p.add_argument("--out_dir", default=None)
    p.add_argument("--scaffold_weight", default=None,
                   help="influence in [0, 1] (default: the trained influence_weight); evaluate takes a list: 1,0.5,0")
    if command == "generate":
        p.add_argument("--prompt", required=True, help="the prompt (for a chat-trained model: the user's message)")
        p.add_argument("--max_new_tokens", type=int, default=None)
        p.add_argument("--temperature", type=float, default=None, help="0 = greedy")
        p.add_argument("--top_k", type=int, default=None)
        p.add_argument("--seed", type=int, default=1337)
    else:
        p.add_argument("--exact_match", action="store_true", help="also the share of greedy completions exactly right")
    p.add_argument("--device", default=None)
    return p.parse_args(argv)


def parse_weights(text):
    try:
        return [check_weight(float(w)) for w in str(text).split(",") if w.strip()]
    except ValueError:
        raise InputError(f"scaffold_weight {text!r} is outside [0, 1] or not a number: 0 is the base model alone, "
                         f"1 the full scaffold influence") from None


def example_from_prompt(text, data_format):
    """A prompt typed by the user, shaped like the training records: plain text, or one user turn for chat."""
    if data_format == "chat":
        return {"prompt": None, "turns": [("user", text)], "completion": ""}
    return {"prompt": text, "turns": None, "completion": ""}


def cmd_generate(args, out=sys.stdout):
    weight = parse_weights(args.scaffold_weight)[0] if args.scaffold_weight is not None else None
    cfg = settings(args.config_file)
    device = pick_device(args.device or cfg.device)
    fused, base_tok, scaffold_tok, ckpt = load_fused(args.model_name or cfg.model_name, args.out_dir or cfg.out_dir,
                                                     device)
    saved = ckpt["config"]
    weight = saved["influence_weight"] if weight is None else weight
    gen = torch.Generator(device=device).manual_seed(args.seed)
    text = answer(fused, base_tok, scaffold_tok, example_from_prompt(args.prompt, ckpt.get("data_format")),
                  max_new_tokens=args.max_new_tokens or saved["max_new_tokens"], scaffold_weight=weight,
                  temperature=saved["temperature"] if args.temperature is None else args.temperature,
                  top_k=saved["top_k"] if args.top_k is None else args.top_k, generator=gen)
    out.write(text + "\n")
    return text


def cmd_evaluate(args, log=print):
    """Validation loss of a saved model at the given weights, on the split its training run held out."""
    cfg = settings(args.config_file)
    device = pick_device(args.device or cfg.device)
    fused, base_tok, scaffold_tok, ckpt = load_fused(args.model_name or cfg.model_name, args.out_dir or cfg.out_dir,
                                                     device)
    saved = ScaffoldConfig(**{k: v for k, v in ckpt["config"].items() if k in {f.name for f in fields(ScaffoldConfig)}})
    _, _, val_set = load_split(saved, fused, base_tok, scaffold_tok, log)
    val_batches = batches(val_set, saved.batch_size, device)
    ctx = autocast_context("cuda" if device.startswith("cuda") else device, pick_dtype(saved.dtype, device.split(":")[0]))
    weights = parse_weights(args.scaffold_weight) if args.scaffold_weight is not None else [1.0, 0.5, 0.0]
    result = {w: evaluate_loss(fused, val_batches, w, ctx) for w in weights}
    base = evaluate_loss(fused, val_batches, 0.0, ctx, base_alone=True)
    log(f"{saved.train_file}: {len(val_set)} validation records; val loss by scaffold_weight: "
        + ", ".join(f"{w:g}: {v:.4f}" for w, v in result.items()) + f"; frozen base alone: {base:.4f}")
    if args.exact_match:
        matches = {w: exact_match(fused, base_tok, scaffold_tok, [item[3] for item in val_set], w, saved.max_new_tokens)
                   for w in weights}
        log("greedy completions exactly right by scaffold_weight: "
            + ", ".join(f"{w:g}: {100 * v:.1f}%" for w, v in matches.items()))
    return result, base


def interactive(config_file=None):
    """The loop of `python scaffold.py`: 'train' trains with the preset, 'weight X' sets the influence, any other
    line is a prompt to answer, 'quit' / 'exit' (or Ctrl-D) ends."""
    cfg = settings(config_file)
    device = pick_device(cfg.device)
    loaded, weight = None, cfg.influence_weight
    print("scaffold fusion: 'train' trains with the preset, 'weight X' sets the scaffold weight (0..1), any other "
          "line is a prompt, 'quit' ends", file=sys.stderr)
    while True:
        try:
            line = input(f"\nscaffold[{weight:g}]> ").strip()
        except EOFError:
            break
        if line in ("quit", "exit"):
            break
        if not line:
            continue
        try:
            if line == "train":
                train(cfg)
                loaded = None  # reload the freshly saved model before the next prompt
            elif line.startswith("weight "):
                weight = parse_weights(line.split(None, 1)[1])[0]
            else:
                if loaded is None:
                    loaded = load_fused(cfg.model_name, cfg.out_dir, device)
                fused, base_tok, scaffold_tok, ckpt = loaded
                print(answer(fused, base_tok, scaffold_tok, example_from_prompt(line, ckpt.get("data_format")),
                             max_new_tokens=cfg.max_new_tokens, scaffold_weight=weight, temperature=cfg.temperature,
                             top_k=cfg.top_k))
        except GPTLabError as e:  # a bad prompt, weight or setting: say so and carry on; anything else is a bug
            print(f"error: {first_line(e)}", file=sys.stderr)


@one_line_errors
def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    command = argv[0] if argv and not argv[0].startswith("--") else "interactive"
    rest = argv[1:] if command != "interactive" else argv
    if command == "train":
        config_file, overrides = parse_cli(rest)
        train(load_scaffold_config(config_file or DEFAULT_CONFIG, overrides))
    elif command in ("generate", "evaluate"):
        args = parse_generate_args(rest, command)
        cmd_generate(args) if command == "generate" else cmd_evaluate(args)
    elif command == "interactive":
        config_file = rest[1] if rest[:1] == ["--config_file"] and len(rest) > 1 else None
        if rest and config_file is None:
            raise InputError(f"unexpected arguments {' '.join(rest)}: use train, generate, evaluate, or "
                             f"--config_file FILE alone for the interactive loop")
        interactive(config_file)
    else:
        raise InputError(f"unknown command '{command}': use train, generate, evaluate, or no command for the "
                         f"interactive loop")


if __name__ == "__main__":
    main()
