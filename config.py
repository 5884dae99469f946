"""
Training settings: one dataclass, JSON presets that map onto it one to one, command-line overrides, validation.

    python train.py --config_file configs/tiny.json --max_iters 500 --learning_rate 3e-4

Every field can come from the JSON preset and be overridden as --field value. Values are type-checked; an
unknown key is refused with the closest valid name; out-of-range values are refused with the allowed range.
Configs are data (JSON), never executed.
"""

import difflib
import json
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Optional

from errors import GPTLabError


class ConfigError(GPTLabError, ValueError):
    """A bad setting: the message names the key (and the file) and what would be valid."""


@dataclass
class TrainConfig:
    # --- run and I/O ---
    model_name: str = "tiny"  # checkpoints go to <out_dir>/<model_name>/
    out_dir: str = "checkpoints"
    dataset_dir: str = ""  # prepared shards (prepare_dataset.py); empty: the preset's shipped sample dataset
    init_from: str = "scratch"  # scratch | resume | a Hugging Face GPT-2 directory or hub id (e.g. gpt2)
    init_from_model: str = ""  # start from another project model's weights + architecture, with this config's training settings
    device: str = "auto"  # auto | cpu | cuda | mps
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16 (auto: bf16 autocast where it is fast, else fp32)
    compile: Optional[bool] = None  # torch.compile the model; None = auto (on for CUDA); on CPU needs a C++ compiler (g++)
    activation_checkpointing: bool = False  # recompute each block in backward: 124M at 8 x 1024 peaks at 0.23x memory, 1.14x time
    seed: int = 1337
    eval_interval: int = 250  # evaluate every N iterations (and at the end)
    eval_iters: int = 20  # batches per split for each evaluation
    log_interval: int = 10  # print a log line every N iterations
    checkpoint_interval: int = 0  # save the latest state every N iterations; 0 = at each evaluation
    sample_interval: int = 0  # print a short sample every N iterations; 0 = only at the end
    max_bad_steps: int = 5  # stop after this many non-finite losses/gradients in a row
    # --- model (ignored when the architecture comes from a checkpoint or Hugging Face) ---
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 64
    vocab_size: int = 0  # 0 = from the dataset's tokenizer (gpt2: 50257 padded to 50304)
    dropout: float = 0.0
    bias: bool = False
    activation_function: str = "gelu_new"  # gelu_new: GPT-2's tanh GELU | gelu: exact, nanoGPT's (2x-3x faster on AVX2 CPUs)
    # --- data and loss ---
    batch_size: int = 12
    gradient_accumulation_steps: int = 1
    use_loss_mask: bool = False  # chat SFT: only mask-1 targets (the assistant's tokens) count in the loss
    packing: bool = False  # rows of whole conversations (best-fit packed, each attending only to itself); else random windows
    align_windows: bool = False  # random windows that each start at a conversation's (document's) BOS, not at any token
    # --- optimizer and schedule (AdamW, linear warmup, cosine decay to min_lr) ---
    max_iters: int = 2000
    learning_rate: float = 1e-3
    min_lr: float = 1e-4
    warmup_iters: int = 100
    lr_decay_iters: int = 0  # 0 = max_iters
    decay_lr: bool = True
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0  # 0 disables clipping
    # --- fine-tuning: full | lora | xgblora (xgblora defaults: lora_rank 1, lora_target q,v, as the paper) ---
    finetuning_type: str = "full"
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_target: list = field(default_factory=lambda: ["c_attn", "attn.c_proj", "c_fc", "mlp.c_proj"])  # or "all"; q/k/v are slices of c_attn
    merge_lora: bool = False  # at the end of a LoRA run also write a plain merged model (<model_name>_merged)
    xgblora_steps_per_iteration: int = 0  # merge the rank-1 booster every N optimizer steps; 0 = by epochs
    xgblora_merge_frequency: int = 1  # with steps_per_iteration 0: merge at the end of every N epochs
    xgblora_layers_per_iteration: int = 0  # 0 = boosters on every layer; K = K random layers per booster
    # --- trainer: regular (backprop + AdamW) | zo (MeZO zeroth-order) ---
    trainer: str = "regular"
    zo_eps: float = 1e-3  # MeZO perturbation size
    # --- BOS zero training ---
    use_bos_zero_training: bool = False  # every window starts with BOS and its input is scaled by the factor
    bos_scaling_factor: float = 0.01  # in [0, 1]
    # --- distributed (torchrun) ---
    backend: str = "auto"  # auto (nccl on CUDA, gloo on CPU) | nccl | gloo
    fsdp: bool = False  # shard parameters, gradients and optimizer state across ranks (FSDP) instead of DDP


def _closest(name, options):
    match = difflib.get_close_matches(name, options, n=1)
    return f" (did you mean '{match[0]}'?)" if match else ""


def _coerce(name, value, default, where):
    """Turn a JSON value or a command-line string into the type of the field's default."""
    expected = type(default)
    if isinstance(value, str) and expected is not str:
        text = value.strip()
        if default is None or expected is bool:  # Optional[bool] (compile) or bool
            if text.lower() in ("true", "1", "yes"):
                return True
            if text.lower() in ("false", "0", "no"):
                return False
            if default is None and text.lower() in ("none", "null", "auto"):
                return None
            raise ConfigError(f"{where}: '{name}' must be true or false, got '{value}'")
        if expected is list:
            if text == "all":
                return "all"
            if text.startswith("["):
                try:
                    return json.loads(text)
                except json.JSONDecodeError:
                    raise ConfigError(f"{where}: '{name}' must be a JSON list or comma-separated, got '{value}'") from None
            return [t.strip() for t in text.split(",") if t.strip()]
        try:
            return expected(text) if expected is not int else int(float(text)) if float(text).is_integer() else int(text)
        except ValueError:
            raise ConfigError(f"{where}: '{name}' must be {expected.__name__}, got '{value}'") from None
    if default is None:
        if value is None or isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: '{name}' must be true, false or null, got {value!r}")
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected is list and value == "all":
        return value
    if expected is str and name == "lora_target":
        return value
    if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        raise ConfigError(f"{where}: '{name}' must be {expected.__name__}, got {type(value).__name__} {value!r}")
    return value


def validate(cfg, where="config"):
    """Range checks; each failure names the key and the allowed range."""
    def need(ok, key, what):
        if not ok:
            raise ConfigError(f"{where}: '{key}' = {getattr(cfg, key)!r} is out of range: {what}")
    need(cfg.learning_rate > 0, "learning_rate", "must be > 0")
    need(0 <= cfg.min_lr <= cfg.learning_rate, "min_lr", "must be in [0, learning_rate]")
    need(0 <= cfg.dropout < 1, "dropout", "must be in [0, 1)")
    need(0 <= cfg.lora_dropout < 1, "lora_dropout", "must be in [0, 1)")
    for key in ("n_layer", "n_head", "n_embd", "block_size", "batch_size", "gradient_accumulation_steps", "eval_iters",
                "log_interval", "max_bad_steps", "lora_rank", "xgblora_merge_frequency"):
        need(getattr(cfg, key) >= 1, key, "must be >= 1")
    for key in ("max_iters", "warmup_iters", "lr_decay_iters", "eval_interval", "checkpoint_interval", "vocab_size",
                "xgblora_steps_per_iteration", "xgblora_layers_per_iteration", "sample_interval", "weight_decay",
                "grad_clip"):
        need(getattr(cfg, key) >= 0, key, "must be >= 0")
    need(cfg.n_embd % cfg.n_head == 0, "n_embd", f"must be divisible by n_head ({cfg.n_head})")
    need(0 <= cfg.beta1 < 1, "beta1", "must be in [0, 1)")
    need(0 <= cfg.beta2 < 1, "beta2", "must be in [0, 1)")
    need(cfg.lora_alpha > 0, "lora_alpha", "must be > 0")
    need(cfg.zo_eps > 0, "zo_eps", "must be > 0")
    need(0.0 <= cfg.bos_scaling_factor <= 1.0, "bos_scaling_factor", "must lie in [0, 1]")
    choices = {"finetuning_type": ("full", "lora", "xgblora"), "trainer": ("regular", "zo"),
               "activation_function": ("gelu_new", "gelu"),
               "device": ("auto", "cpu", "cuda", "mps"), "dtype": ("auto", "float32", "bfloat16", "float16"),
               "backend": ("auto", "nccl", "gloo")}
    for key, allowed in choices.items():
        value = getattr(cfg, key)
        if not (value in allowed or (key == "device" and value.startswith("cuda:"))):
            raise ConfigError(f"{where}: '{key}' = '{value}' is not one of {', '.join(allowed)}")
    if cfg.trainer == "zo" and cfg.gradient_accumulation_steps != 1:
        raise ConfigError(f"{where}: 'gradient_accumulation_steps' must be 1 with trainer 'zo' (MeZO takes one "
                          f"batch per step; raise batch_size instead), got {cfg.gradient_accumulation_steps}")
    if cfg.finetuning_type != "xgblora":
        for key, default in (("xgblora_steps_per_iteration", 0), ("xgblora_layers_per_iteration", 0),
                             ("xgblora_merge_frequency", 1)):
            if getattr(cfg, key) != default:
                raise ConfigError(f"{where}: '{key}' only applies with finetuning_type 'xgblora' (got finetuning_type "
                                  f"'{cfg.finetuning_type}'): set finetuning_type to xgblora or drop the key")
    if cfg.xgblora_steps_per_iteration and cfg.xgblora_merge_frequency != 1:
        raise ConfigError(f"{where}: 'xgblora_merge_frequency' (merge every N epochs) and 'xgblora_steps_per_iteration' "
                          f"(merge every N steps) both set: keep one (steps_per_iteration 0 means merge by epochs)")
    if cfg.merge_lora and cfg.finetuning_type == "full":
        raise ConfigError(f"{where}: 'merge_lora' needs finetuning_type lora or xgblora (a full fine-tune has no adapters "
                          f"to merge): drop it")
    if cfg.xgblora_layers_per_iteration > cfg.n_layer and cfg.init_from == "scratch" and not cfg.init_from_model:
        need(False, "xgblora_layers_per_iteration", f"must be <= n_layer ({cfg.n_layer})")
    if cfg.align_windows and cfg.packing:
        raise ConfigError(f"{where}: 'align_windows' and 'packing' both set: a packed row already starts at a "
                          f"conversation's start; drop align_windows")
    if cfg.fsdp and cfg.trainer == "zo":
        raise ConfigError(f"{where}: 'fsdp' is not supported with trainer 'zo' (MeZO already needs only inference memory)")
    return cfg


def read_settings(config_file, overrides, dataclass_type, missing_hint="presets are in configs/", what="config key"):
    """The settings of a JSON preset (optional) and then of a dict of overrides (command-line strings or typed
    values), each key checked against the dataclass's fields and coerced to its type. Keys starting with '_' are
    comments. Returns {field name: value} for the dataclass to be built from."""
    valid = {f.name for f in fields(dataclass_type)}
    defaults = dataclass_type()
    sources = []
    if config_file:
        if not os.path.exists(config_file):
            raise ConfigError(f"{config_file}: config file not found ({missing_hint})")
        try:
            with open(config_file) as f:
                data = json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{config_file}:{e.lineno}: not valid JSON ({e.msg})") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{config_file}: not UTF-8 text (a config file is JSON)") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{config_file}: must hold a JSON object of settings")
        sources.append((config_file, data))
    if overrides:
        sources.append(("command line", overrides))
    values = {}
    for where, data in sources:
        for key, value in data.items():
            if key.startswith("_"):  # "_comment" keys in presets
                continue
            if key not in valid:
                raise ConfigError(f"{where}: unknown {what} '{key}'{_closest(key, sorted(valid))}")
            values[key] = _coerce(key, value, getattr(defaults, key), where)
    return values


def load_config(config_file=None, overrides=None):
    """Build a TrainConfig from an optional JSON preset and a dict of overrides (strings from the command line or
    typed values), checking every key and type. Returns the validated config."""
    values = read_settings(config_file, overrides, TrainConfig)
    if values.get("finetuning_type") == "xgblora":  # XGBLoRA's own defaults: rank-1 boosters on q and v, as the paper
        values.setdefault("lora_rank", 1)
        values.setdefault("lora_target", ["q", "v"])
    cfg = TrainConfig(**values)
    if not cfg.lr_decay_iters:
        cfg.lr_decay_iters = cfg.max_iters
    return validate(cfg, config_file or "config")


def parse_cli(argv):
    """--key value / --key=value pairs -> (config_file, overrides dict). A bare --flag means true."""
    overrides, config_file = {}, None
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"command line: unexpected argument '{arg}' (settings are given as --key value)")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                value = argv[i + 1]
                i += 1
            else:
                value = "true"
        if key == "config_file":
            config_file = value
        else:
            overrides[key] = value
        i += 1
    return config_file, overrides


def config_dict(cfg):
    return asdict(cfg)
