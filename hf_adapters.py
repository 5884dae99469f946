"""
What the Hugging Face ecosystem reads besides a model's weights: peft LoRA adapters (both ways), and the chat
template + generation config that an exported chat model carries. Plain data in, plain data out: no files are
read or written here (hf.py does that), and neither transformers nor peft is needed.

peft LoRA on GPT-2. peft wraps each targeted Conv1D and adds, like lora.py,
    y = conv1d(x) + scaling * (dropout(x) @ A.T @ B.T)      A: (r, in), B: (out, r), scaling = alpha / r
so A and B have the shapes of ours; only their names differ:
    ours:  transformer.h.0.attn.c_attn.lora_A                 (a whole-layer adapter)
    peft:  base_model.model.transformer.h.0.attn.c_attn.lora_A.weight
peft has no q/k/v slices. A slice adapter is still exact as one adapter on the whole c_attn: stack the slices'
A's, and put each slice's B into its own rows and its own rank columns of a zero B:
    A = [A_q; A_v]  (2r, C)        B = [[B_q, 0], [0, 0], [0, B_v]]  (3C, 2r)      B @ A = [B_q A_q; 0; B_v A_v]
The rank doubles (k slices: k * r), so alpha doubles too, keeping alpha / r. When the whole-layer targets keep
rank r, peft's rank_pattern / alpha_pattern give c_attn its own.
"""

import json
import math
import re

import torch

import lora
from errors import InputError
from tokenizer import EOT_TEXT, ROLE_MARKERS

PEFT_PREFIX = "base_model.model."  # what PeftModel.save_pretrained puts before the base model's module names
# a module path inside a GPT-2 block -> the project's name for a whole-layer adapter on it (lora.TARGETS)
WHOLE_TARGETS = {path: name for name, (path, piece) in lora.TARGETS.items() if piece is None}
PEFT_NAMES = {"attn.c_attn": "c_attn", "attn.c_proj": "attn.c_proj", "mlp.c_fc": "c_fc", "mlp.c_proj": "mlp.c_proj"}
PEFT_KEY = re.compile(r"^(?:base_model\.model\.)?(?:transformer\.)?h\.(\d+)\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|"
                      r"mlp\.c_proj)\.lora_([AB])\.weight$")
# peft LoraConfig settings with no equivalent in lora.py (each must be off: null, false or empty) -> what they are
UNSUPPORTED = {"use_dora": "DoRA", "lora_bias": "a bias on lora_B", "use_qalora": "QA-LoRA",
               "kasa_config": "KaSA", "use_bdlora": "block-diagonal LoRA", "monteclora_config": "MonteCLoRA",
               "arrow_config": "Arrow routing", "alora_invocation_tokens": "activated LoRA",
               "layer_replication": "layer replication", "modules_to_save": "fully trained extra modules",
               "trainable_token_indices": "trainable token embeddings", "target_parameters": "LoRA on parameters",
               "megatron_config": "Megatron layers"}
# init_lora_weights that are plain (A random, B zero or random): anything else (pissa, olora, loftq, corda, ...)
# changes the base weights themselves at init, so the adapter does not sit on the unchanged base
PLAIN_INITS = (True, False, "gaussian")


# ---------------------------------------------------------------------------------------------------------------
# project LoRA run -> peft adapter

def lora_to_peft(adapters, lora_kwargs, n_layer):
    """A LoRA run's adapter tensors ({'transformer.h.0.attn.c_attn.lora_A_q': ...}) -> (peft state dict,
    {module path: rank}), slice adapters folded into one block-structured c_attn adapter each."""
    targets = lora._check_targets(lora_kwargs["targets"])
    layers = lora_kwargs.get("layers")
    layers = range(n_layer) if layers is None else layers
    slices_of = {}  # module path -> [slice names in row order], [] for a whole-layer adapter
    for t in targets:
        path, piece = lora.TARGETS[t]
        slices_of.setdefault(path, [])
        if piece is not None:
            slices_of[path].append(t)
    out, ranks = {}, {}
    for path, names in slices_of.items():
        names = sorted(names, key=lambda t: lora.TARGETS[t][1])  # q, k, v: row order
        for i in layers:
            ours = f"transformer.h.{i}.{path}.lora_"
            if names:
                A, B = _block_adapter(adapters, ours, names)
            else:
                A, B = adapters[ours + "A"], adapters[ours + "B"]
            out[f"{PEFT_PREFIX}transformer.h.{i}.{path}.lora_A.weight"] = A.detach().cpu().contiguous().clone()
            out[f"{PEFT_PREFIX}transformer.h.{i}.{path}.lora_B.weight"] = B.detach().cpu().contiguous().clone()
            ranks[path] = A.size(0)
    return out, ranks


def _block_adapter(adapters, ours, names):
    """The q/k/v slice adapters of one c_attn -> one (A, B) over the whole layer (see the module docstring)."""
    As = [adapters[f"{ours}A_{t}"] for t in names]  # each (r, C)
    Bs = [adapters[f"{ours}B_{t}"] for t in names]  # each (C, r)
    r, C = As[0].shape
    B = torch.zeros(3 * C, r * len(names), dtype=Bs[0].dtype)  # (3C, k*r)
    for j, (t, Bt) in enumerate(zip(names, Bs)):
        row = lora.TARGETS[t][1] * C  # q: rows [0, C), k: [C, 2C), v: [2C, 3C)
        B[row:row + C, j * r:(j + 1) * r] = Bt
    return torch.cat(As, dim=0), B  # (k*r, C), (3C, k*r)


def peft_adapter_config(lora_kwargs, ranks, base_model_name_or_path):
    """adapter_config.json for the tensors of lora_to_peft: what LoraConfig.from_pretrained reads."""
    rank, alpha = lora_kwargs["rank"], lora_kwargs["alpha"]
    scaling = alpha / rank
    # peft matches target_modules against the end of each module's name: c_attn and c_fc are unique in GPT-2,
    # the two c_proj are told apart by their parent (or both named by "c_proj")
    names = [PEFT_NAMES[p] for p in ranks]
    if "attn.c_proj" in names and "mlp.c_proj" in names:
        names = [n for n in names if n not in ("attn.c_proj", "mlp.c_proj")] + ["c_proj"]
    r = min(ranks.values())
    # a module whose rank is not r (a block-structured c_attn) gets its own rank and alpha, same alpha / r
    rank_pattern = {PEFT_NAMES[p]: k for p, k in ranks.items() if k != r}
    alpha_pattern = {name: k * scaling for name, k in rank_pattern.items()}
    layers = lora_kwargs.get("layers")
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "r": r, "lora_alpha": r * scaling, "lora_dropout": lora_kwargs.get("dropout", 0.0),
        "target_modules": names, "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
        "fan_in_fan_out": True,  # GPT-2's Conv1D stores weights (in, out)
        "bias": "none", "use_rslora": False, "use_dora": False, "init_lora_weights": True, "modules_to_save": None,
        "layers_to_transform": list(layers) if layers is not None else None,
        "layers_pattern": "h" if layers is not None else None, "inference_mode": True,
    }


# ---------------------------------------------------------------------------------------------------------------
# peft adapter -> project LoRA run

def check_peft_config(cfg, where):
    """Refuse an adapter_config.json that is not plain LoRA, naming the setting."""
    if cfg.get("peft_type") != "LORA":
        raise InputError(f"{where}: peft_type is {cfg.get('peft_type')!r}: only LoRA adapters have an equivalent in "
                         f"the project (lora.py)")
    for key, what in UNSUPPORTED.items():
        if cfg.get(key):
            raise InputError(f"{where}: '{key}' is set ({what}), which the project's LoRA cannot compute; only plain "
                             f"LoRA adapters can be imported")
    if cfg.get("bias", "none") != "none":
        raise InputError(f"{where}: 'bias' is {cfg['bias']!r} (the adapter also trained the base's biases), which the "
                         f"project's LoRA cannot hold; only bias 'none' can be imported")
    if cfg.get("init_lora_weights", True) not in PLAIN_INITS:
        raise InputError(f"{where}: init_lora_weights is {cfg['init_lora_weights']!r}, which changes the base weights "
                         f"themselves; save it with peft's path_initial_model_for_weight_conversion, then import")


def _pattern_value(patterns, module, default):
    """peft's rank_pattern / alpha_pattern lookup: the first key that matches the end of the module's name."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def peft_to_lora(cfg, state, n_layer, n_embd, where):
    """adapter_config.json (dict, passed by check_peft_config) + adapter tensors (read from `where`) -> (lora kwargs
    for lora.apply_lora, adapter state dict with the project's keys). Refuses, naming it, anything the project's
    LoRA cannot compute exactly."""
    found = {}  # (layer, path) -> {"A": tensor, "B": tensor}
    for key, t in state.items():
        m = PEFT_KEY.match(key)
        if not m:
            raise InputError(f"{where}: adapter tensor '{key}' has no equivalent in the project's LoRA (it adapts "
                             f"only GPT-2's c_attn, attn.c_proj, c_fc and mlp.c_proj with lora_A / lora_B)")
        found.setdefault((int(m.group(1)), m.group(2)), {})[m.group(3)] = t
    if not found:
        raise InputError(f"{where}: holds no LoRA tensors")
    widths = {"attn.c_attn": (n_embd, 3 * n_embd), "attn.c_proj": (n_embd, n_embd),
              "mlp.c_fc": (n_embd, 4 * n_embd), "mlp.c_proj": (4 * n_embd, n_embd)}  # (in, out)
    layers_of, rank, scaling, first, out = {}, None, None, None, {}
    for (i, path), ab in sorted(found.items()):
        name = f"transformer.h.{i}.{path}"
        if i >= n_layer:
            raise InputError(f"{where}: adapts {name}, but the base has layers 0..{n_layer - 1}: the adapter was made "
                             f"for another model")
        if set(ab) != {"A", "B"}:
            raise InputError(f"{where}: {name} has only lora_{''.join(ab)}; a LoRA adapter needs lora_A and lora_B")
        A, B = ab["A"], ab["B"]
        n_in, n_out = widths[path]
        r = A.size(0)
        if A.shape != (r, n_in) or B.shape != (n_out, r):
            raise InputError(f"{where}: {name} lora_A {tuple(A.shape)} / lora_B {tuple(B.shape)} do not fit the base "
                             f"(expected ({r}, {n_in}) / ({n_out}, {r})): the adapter was made for another model")
        alpha = _pattern_value(cfg.get("alpha_pattern"), name, cfg.get("lora_alpha", 8))
        s = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        if rank is not None and (r != rank or not math.isclose(s, scaling, rel_tol=1e-6)):
            raise InputError(f"{where}: {name} has rank {r} (scaling {s:g}) but {first} has rank {rank} (scaling "
                             f"{scaling:g}): the project's LoRA uses one rank and alpha for every adapted module")
        rank, scaling, first = r, s, name
        layers_of.setdefault(path, []).append(i)
        out[f"{name}.lora_A"], out[f"{name}.lora_B"] = A.float().contiguous(), B.float().contiguous()
    layer_sets = {tuple(v) for v in layers_of.values()}
    if len(layer_sets) > 1:
        detail = "; ".join(f"{p} on layers {v}" for p, v in layers_of.items())
        raise InputError(f"{where}: the adapted layers differ between modules ({detail}): the project's LoRA puts "
                         f"the same targets on each adapted layer")
    layers = list(layer_sets.pop())
    kwargs = {"rank": rank, "alpha": scaling * rank, "dropout": float(cfg.get("lora_dropout", 0.0) or 0.0),
              "targets": [WHOLE_TARGETS[p] for p in widths if p in layers_of]}
    if layers != list(range(n_layer)):
        kwargs["layers"] = layers
    return kwargs, out


# ---------------------------------------------------------------------------------------------------------------
# the chat template for transformers' apply_chat_template, and the generation config

def chat_template():
    """tokenizer.render_chat / chat_prompt as a Jinja template: BOS (the end-of-text token), then each turn as its
    role marker + content, closed by the end-of-text token (assistant) or a newline (every other role);
    add_generation_prompt appends the assistant marker. transformers tokenizes the rendered string in one go,
    the project marker by marker and content by content; GPT-2's pre-tokenizer cuts the string at the same
    places, so the ids agree (tested, with leading and trailing spaces and newlines in the content).
    Footgun: content holding the literal text <|endoftext|> becomes the special token in transformers, plain
    text in the project."""
    markers = "{" + ", ".join(f"{json.dumps(r)}: {json.dumps(m)}" for r, m in ROLE_MARKERS.items()) + "}"
    eot = json.dumps(EOT_TEXT)
    return ("{%- set markers = " + markers + " -%}"
            "{{- " + eot + " -}}"
            "{%- for message in messages -%}"
            "{%- if message['role'] not in markers -%}"
            "{{- raise_exception('unknown role ' + message['role'] + ': the template knows "
            + ", ".join(ROLE_MARKERS) + "') -}}"
            "{%- endif -%}"
            "{{- markers[message['role']] + message['content'] -}}"
            "{%- if message['role'] == 'assistant' -%}{{- " + eot + " -}}{%- else -%}{{- '\\n' -}}{%- endif -%}"
            "{%- endfor -%}"
            "{%- if add_generation_prompt -%}{{- " + json.dumps(ROLE_MARKERS["assistant"]) + " -}}{%- endif -%}")


def generation_config(tokenizer):
    """generation_config.json: generation stops at the end-of-text token, which closes an assistant turn."""
    eot = tokenizer.eot_token
    return {"bos_token_id": eot, "eos_token_id": eot, "pad_token_id": eot}
