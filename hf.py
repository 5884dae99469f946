"""
Hugging Face GPT-2 <-> this project's GPT: state dicts, config.json, tokenizer files, a chat model's chat template
and generation config, peft adapter directories (convert_hf.py is the command line on top of it; checkpoint.py
reads a Hugging Face base through it; hf_adapters.py maps adapters and renders the chat template).

The two models compute the same function; only the storage differs:
- HF's attention and MLP layers are Conv1D, whose weight is (in, out); ours are nn.Linear, (out, in). Every
  c_attn / c_proj / c_fc weight is transposed on the way in and on the way out. Footgun: attn.c_proj is square,
  so a forgotten transpose there passes every shape check and only shows up in the logits (the tests compare them).
- Our vocabulary is padded up to a multiple of 64 (faster matmuls). See pad_vocab() for what the pad rows hold;
  export cuts them off again.
- GPT-2 ties lm_head to wte; so do we. HF files may hold lm_head.weight as a copy or leave it out.
- HF also stores attn.bias / attn.masked_bias in older files: causal-mask buffers, not weights. Ignored.
Only GPT-2's architecture: the tanh-approximated GELU (gelu_new / gelu_pytorch_tanh) or the exact one (gelu: a model
trained here with activation_function gelu), layer norm eps 1e-5 (model.py hardcodes it), 4 * n_embd MLP, plain
1/sqrt(hs) attention scaling. Anything else is refused, not approximated.
"""

import copy
import functools
import json
import math
import os
import pickle
import re
import shutil
import zipfile

import torch

import hf_adapters
import lora
from errors import ExistsError, InputError, MissingFileError
from model import GPT, GPTConfig
from tokenizer import EOT_TEXT, Tokenizer, bytes_to_unicode

SAFETENSORS, SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"
TORCH_BIN, TORCH_BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
LINEARS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")  # Conv1D in HF: weights transposed
NORMS = ("ln_1", "ln_2")
HF_BUFFER = re.compile(r"^h\.\d+\.attn\.(bias|masked_bias)$")  # causal-mask buffers in older HF files
# HF's activation_function names -> ours (model.ACTIVATIONS); gelu_pytorch_tanh is gelu_new with a fused kernel
HF_ACTIVATIONS = {"gelu_new": "gelu_new", "gelu_pytorch_tanh": "gelu_new", "gelu": "gelu"}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")  # "gpt2", "openai-community/gpt2"


# ---------------------------------------------------------------------------------------------------------------
# reading a Hugging Face directory

def _first_line(e):
    """An exception's message cut to one short line, for the one-line errors."""
    return str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__


def resolve_hf_dir(hf_dir_or_id):
    """A local directory as is; a hub id (e.g. "gpt2") downloaded with huggingface_hub when that is possible."""
    if os.path.isdir(hf_dir_or_id):
        return hf_dir_or_id
    if os.path.exists(hf_dir_or_id):
        raise InputError(f"{hf_dir_or_id}: is a file; expected a Hugging Face GPT-2 directory "
                                 f"(config.json + model.safetensors or pytorch_model.bin)")
    if not HUB_ID.match(hf_dir_or_id):
        raise MissingFileError(f"{hf_dir_or_id}: no such directory (expected a Hugging Face GPT-2 directory "
                                f"with config.json + model.safetensors or pytorch_model.bin)")
    how = (f"download it where there is network (huggingface-cli download {hf_dir_or_id} --local-dir DIR) "
           f"and pass that local DIR")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise MissingFileError(f"'{hf_dir_or_id}' is not a local directory and huggingface_hub is not installed "
                                f"to download it: {how}") from None
    files = ["config.json", "vocab.json", "merges.txt"]
    try:
        path = snapshot_download(hf_dir_or_id, allow_patterns=files + ["model.safetensors*"])
        if not any(os.path.exists(os.path.join(path, f)) for f in (SAFETENSORS, SAFETENSORS_INDEX)):
            path = snapshot_download(hf_dir_or_id, allow_patterns=files + ["pytorch_model.bin*"])  # older repos
    except Exception as e:  # offline, unknown repo, auth...: huggingface_hub raises many types
        raise MissingFileError(f"'{hf_dir_or_id}' is not a local directory and could not be downloaded from the "
                                f"Hugging Face hub ({type(e).__name__}: {_first_line(e)}): {how}") from None
    return path


def read_hf_config(hf_dir):
    """config.json -> dict, refusing anything that is not exactly the GPT-2 architecture model.py implements."""
    path = os.path.join(hf_dir, "config.json")
    if not os.path.exists(path):
        found = ", ".join(sorted(os.listdir(hf_dir))[:10]) or "nothing"
        raise MissingFileError(f"{path}: not found (the directory holds: {found}); expected a Hugging Face GPT-2 "
                                f"directory with config.json + model.safetensors or pytorch_model.bin")
    try:
        with open(path) as f:
            cfg = json.load(f)
    except json.JSONDecodeError as e:
        raise InputError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if cfg.get("model_type") != "gpt2":
        raise InputError(f"{path}: model_type is {cfg.get('model_type')!r}, expected 'gpt2' (this converter reads "
                         f"GPT-2 checkpoints only)")
    # HF fills keys missing from config.json with GPT2Config's defaults; do the same
    cfg.setdefault("vocab_size", 50257)
    cfg.setdefault("n_positions", cfg.get("n_ctx", 1024))
    cfg.setdefault("n_embd", 768)
    cfg.setdefault("n_layer", 12)
    cfg.setdefault("n_head", 12)
    act = cfg.setdefault("activation_function", "gelu_new")
    if act not in HF_ACTIVATIONS:
        raise InputError(f"{path}: activation_function is '{act}', but model.py implements only GPT-2's tanh GELU "
                         f"(gelu_new / gelu_pytorch_tanh) and the exact one (gelu); converting would silently change "
                         f"the model")
    eps = cfg.get("layer_norm_epsilon", 1e-5)
    if abs(eps - 1e-5) > 1e-12:
        raise InputError(f"{path}: layer_norm_epsilon is {eps}, but model.py hardcodes GPT-2's 1e-5")
    if cfg.get("n_inner") not in (None, 4 * cfg["n_embd"]):
        raise InputError(f"{path}: n_inner is {cfg['n_inner']}, but model.py's MLP is 4 * n_embd = {4 * cfg['n_embd']}")
    if cfg["n_embd"] % cfg["n_head"]:
        raise InputError(f"{path}: n_embd {cfg['n_embd']} is not divisible by n_head {cfg['n_head']}")
    for key, ok in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                    ("add_cross_attention", False)):
        if cfg.get(key, ok) != ok:
            raise InputError(f"{path}: {key} is {cfg[key]}; model.py implements only GPT-2's default ({ok})")
    return cfg


def _load_weights_file(path):
    """One .safetensors or .bin file -> {name: tensor}, with a one-line error for a missing or damaged file."""
    if not os.path.exists(path):
        raise MissingFileError(f"{path}: weights file not found")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        try:
            return load_file(path)
        except Exception as e:  # safetensors raises SafetensorError (truncated header/data) or OSError
            raise InputError(f"{path}: not a readable safetensors file, truncated or corrupt ({_first_line(e)}); "
                             f"re-download or re-save it") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise InputError(f"{path}: refused to load: it holds objects other than tensors, which could run code "
                         f"({_first_line(e)})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise InputError(f"{path}: not a readable PyTorch weights file, truncated or corrupt ({_first_line(e)}); "
                         f"re-download or re-save it") from None
    if not isinstance(state, dict):
        raise InputError(f"{path}: holds a {type(state).__name__}, expected a state dict of tensors")
    return state


def load_hf_state_dict(hf_dir):
    """Every tensor of the directory's weights (single file or shards, safetensors preferred) -> (dict, where)."""
    for single, index in ((SAFETENSORS, SAFETENSORS_INDEX), (TORCH_BIN, TORCH_BIN_INDEX)):
        if os.path.exists(os.path.join(hf_dir, single)):
            return _load_weights_file(os.path.join(hf_dir, single)), os.path.join(hf_dir, single)
        index_path = os.path.join(hf_dir, index)
        if os.path.exists(index_path):
            try:
                with open(index_path) as f:
                    weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise InputError(f"{index_path}: not a shard index (expected JSON with a 'weight_map'): "
                                 f"{_first_line(e)}") from None
            state = {}
            for shard in sorted(set(weight_map.values())):
                state.update(_load_weights_file(os.path.join(hf_dir, shard)))
            missing = [k for k in weight_map if k not in state]
            if missing:
                raise InputError(f"{index_path}: the shards lack tensors the index lists, e.g. '{missing[0]}' "
                                 f"(in {weight_map[missing[0]]}): re-download the shards")
            return state, index_path
    found = ", ".join(sorted(os.listdir(hf_dir))[:10])
    raise MissingFileError(f"{hf_dir}: no weights file (found: {found}); expected {SAFETENSORS}, {TORCH_BIN} or a "
                            f"sharded {SAFETENSORS_INDEX} / {TORCH_BIN_INDEX}")


def pad_vocab(wte, multiple=64):
    """(V, C) -> (V', C), V' the next multiple of 64. The pad rows are the MEAN of the real rows, not zero: the
    tied lm_head turns a zero row into a logit of exactly 0, and a pretrained GPT-2's logits sit mostly well below
    0, so zero rows would make the never-seen pad ids the most likely tokens. With the mean row, each pad logit is
    the mean of the real logits, and exp(mean) <= mean(exp) (Jensen): each pad id gets at most the average real
    token's probability, so the (< 64) pad ids together take well under 0.2% of the mass of a 50257 vocab.
    Real-token logits are untouched (exact parity); the pad ids only sit in the softmax denominator."""
    V, C = wte.shape
    padded = math.ceil(V / multiple) * multiple
    if padded == V:
        return wte
    pad = wte.float().mean(dim=0, keepdim=True).to(wte.dtype).expand(padded - V, C)
    return torch.cat([wte, pad], dim=0)  # (V', C)


def hf_shapes(cfg):
    """Every tensor a GPT-2 file must hold (names without the "transformer." prefix) -> its HF shape."""
    C, V, P = cfg["n_embd"], cfg["vocab_size"], cfg["n_positions"]
    shapes = {"wte.weight": (V, C), "wpe.weight": (P, C), "ln_f.weight": (C,), "ln_f.bias": (C,)}
    for i in range(cfg["n_layer"]):
        for norm in NORMS:
            shapes[f"h.{i}.{norm}.weight"] = shapes[f"h.{i}.{norm}.bias"] = (C,)
        for name, (n_in, n_out) in zip(LINEARS, ((C, 3 * C), (C, C), (C, 4 * C), (4 * C, C))):
            shapes[f"h.{i}.{name}.weight"] = (n_in, n_out)  # Conv1D: (in, out)
            shapes[f"h.{i}.{name}.bias"] = (n_out,)
    return shapes


def hf_to_gpt_state(hf_state, cfg, where):
    """HF GPT-2 tensors -> our GPT's state dict, checking that every tensor is used and every shape fits.
    Consumes hf_state (emptied once checked): each source tensor is freed as soon as it is converted."""
    state = {k[len("transformer."):] if k.startswith("transformer.") else k: v for k, v in hf_state.items()}
    lm_head = state.pop("lm_head.weight", None)
    expected = hf_shapes(cfg)
    dims = ", ".join(f"{k}={cfg[k]}" for k in ("n_layer", "n_embd", "vocab_size", "n_positions"))
    for name, shape in expected.items():
        if name not in state:
            raise InputError(f"{where}: tensor '{name}' is missing (config.json: {dims}); the file is not this "
                             f"GPT-2 or is incomplete")
        if tuple(state[name].shape) != shape:
            raise InputError(f"{where}: tensor '{name}' has shape {tuple(state[name].shape)}, expected {shape} "
                             f"from config.json ({dims})")
    unused = [k for k in state if k not in expected and not HF_BUFFER.match(k)]
    if unused:
        raise InputError(f"{where}: tensors this GPT-2 ({dims}) has no place for: {', '.join(unused[:5])}"
                         f"{' ...' if len(unused) > 5 else ''}")
    if lm_head is not None and not torch.equal(lm_head, state["wte.weight"]):
        raise InputError(f"{where}: lm_head.weight differs from wte.weight (untied output embedding); model.py ties "
                         f"them as GPT-2 does, so this model cannot be converted exactly")
    del lm_head  # a separate copy of wte in some files: not needed past the check
    hf_state.clear()  # from here `state` holds the only references: a transposed source is freed at once
    out = {}
    for name in expected:
        src = state.pop(name)
        t = src.float()  # fp16/bf16 files are upcast: the model is built in fp32
        if name.endswith(".weight") and any(f".{lin}." in name for lin in LINEARS):
            t = t.t()  # Conv1D (in, out) -> nn.Linear (out, in)
        # always a new tensor of our own: these become the model's parameters (load_hf_gpt2), and safetensors'
        # tensors are maps of the file, which must not stay tied to it
        copied = t.data_ptr() != src.data_ptr()  # .float() of an fp16 tensor is already a copy
        out[f"transformer.{name}"] = t.contiguous() if copied else t.clone(memory_format=torch.contiguous_format)
    out["transformer.wte.weight"] = pad_vocab(out["transformer.wte.weight"])
    out["lm_head.weight"] = out["transformer.wte.weight"]  # tied: the same tensor under both keys
    return out


def hf_tokenizer(hf_dir):
    """The directory's own GPT-2 BPE (vocab.json + merges.txt) when it has one, else tiktoken's gpt2. Footgun: a
    directory without tokenizer files whose model is not GPT-2's vocabulary (a tiny random test model with
    vocab_size 1000) still gets the 50257-id gpt2 tokenizer; it is only right for real GPT-2 vocabularies."""
    have = [f for f in ("vocab.json", "merges.txt") if os.path.exists(os.path.join(hf_dir, f))]
    if len(have) == 1:
        missing = "merges.txt" if have == ["vocab.json"] else "vocab.json"
        raise MissingFileError(f"{os.path.join(hf_dir, missing)}: not found, but {have[0]} is: the GPT-2 tokenizer "
                                f"needs both files (copy both, or remove both to use tiktoken's gpt2)")
    return Tokenizer("gpt2", hf_dir=hf_dir) if have else Tokenizer("gpt2")


def load_hf_gpt2(hf_dir_or_id, device="cpu"):
    """A Hugging Face GPT-2 (local directory or hub id) -> (GPT, Tokenizer). The GPT computes the same logits as
    GPT2LMHeadModel for every real token id (columns [0, vocab_size)); dropout is 0 (set it for training)."""
    hf_dir = resolve_hf_dir(hf_dir_or_id)
    cfg = read_hf_config(hf_dir)
    hf_state, where = load_hf_state_dict(hf_dir)
    state = hf_to_gpt_state(hf_state, cfg, where)
    del hf_state
    gconf = GPTConfig(block_size=cfg["n_positions"], vocab_size=state["lm_head.weight"].size(0),
                      n_layer=cfg["n_layer"], n_head=cfg["n_head"], n_embd=cfg["n_embd"], dropout=0.0, bias=True,
                      activation_function=HF_ACTIVATIONS[cfg["activation_function"]])
    with torch.device("meta"):  # no second copy of the weights, no random init to throw away (124M: -500 MB)
        model = GPT(gconf)
    model.load_state_dict(state, strict=True, assign=True)  # the converted tensors become the parameters
    model.transformer.wte.weight = model.lm_head.weight  # assign made two Parameters of the tied tensor: one again
    return model.to(device), hf_tokenizer(hf_dir)


# ---------------------------------------------------------------------------------------------------------------
# writing a Hugging Face directory

def gpt_to_hf_state(model, vocab_size):
    """Our (LoRA-free) GPT -> HF GPT-2 tensors: Conv1D layout, vocab cut to vocab_size, lm_head left out (HF ties
    it to wte on load and its safetensors files store the shared tensor once). Zero biases for bias=False models:
    HF GPT-2 always has biases, and a zero bias computes the same as none."""
    sd = model.state_dict()
    C = model.config.n_embd

    def get(name, out_features):  # a weight or bias, or zeros where a bias=False model has none
        return sd[name] if name in sd else torch.zeros(out_features, dtype=sd["transformer.wpe.weight"].dtype)

    hf = {"transformer.wte.weight": sd["transformer.wte.weight"][:vocab_size],
          "transformer.wpe.weight": sd["transformer.wpe.weight"],
          "transformer.ln_f.weight": sd["transformer.ln_f.weight"],
          "transformer.ln_f.bias": get("transformer.ln_f.bias", C)}
    for i in range(model.config.n_layer):
        p = f"transformer.h.{i}."
        for norm in NORMS:
            hf[f"{p}{norm}.weight"] = sd[f"{p}{norm}.weight"]
            hf[f"{p}{norm}.bias"] = get(f"{p}{norm}.bias", C)
        for lin in LINEARS:
            w = sd[f"{p}{lin}.weight"]  # (out, in)
            hf[f"{p}{lin}.weight"] = w.t()  # (in, out): Conv1D
            hf[f"{p}{lin}.bias"] = get(f"{p}{lin}.bias", w.size(0))
    # safetensors wants contiguous tensors that share no memory (wte[:V] is a view of the tied matrix)
    return {k: v.detach().cpu().contiguous().clone() for k, v in hf.items()}


def hf_config(model, vocab_size, tokenizer):
    c = model.config
    dtype = str(model.transformer.wpe.weight.dtype).replace("torch.", "")
    eot = tokenizer.eot_token if tokenizer.eot_token < vocab_size else None  # a tokenizer that is not the model's
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": vocab_size, "n_positions": c.block_size, "n_ctx": c.block_size,
        "n_embd": c.n_embd, "n_layer": c.n_layer, "n_head": c.n_head, "n_inner": None,
        "activation_function": c.activation_function, "layer_norm_epsilon": 1e-5,
        "resid_pdrop": c.dropout, "embd_pdrop": c.dropout, "attn_pdrop": c.dropout, "initializer_range": 0.02,
        "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
        "bos_token_id": eot, "eos_token_id": eot,
        "tie_word_embeddings": True, "use_cache": True, "torch_dtype": dtype,
    }


def _bpe_parts(ranks, token, max_rank):
    """Byte-level BPE of `token` using only merges ranked below max_rank -> its parts (list of bytes)."""
    parts = [bytes([b]) for b in token]
    while len(parts) > 1:
        best = min(range(len(parts) - 1), key=lambda j: ranks.get(parts[j] + parts[j + 1], math.inf))
        if ranks.get(parts[best] + parts[best + 1], math.inf) >= max_rank:
            break
        parts[best:best + 2] = [parts[best] + parts[best + 1]]
    return parts


@functools.lru_cache(maxsize=4)
def gpt2_bpe_files(enc):
    """A tiktoken GPT-2-style Encoding -> the text of (vocab.json, merges.txt). GPT-2's ids ARE its merge ranks,
    and the merge that created token t is found by running BPE on t's bytes with only the merges ranked below t,
    which stops at exactly two parts. For tiktoken's gpt2 this gives back GPT-2's released files byte for byte.
    About a second of pure Python for 50k tokens, hence the cache (tiktoken hands out one Encoding per name)."""
    special = {enc.encode_single_token(s): s for s in enc.special_tokens_set}
    ranks = {enc.decode_single_token_bytes(i): i for i in range(enc.n_vocab) if i not in special}
    byte_encoder = bytes_to_unicode()
    spell = lambda b: "".join(byte_encoder[x] for x in b)  # noqa: E731  bytes -> vocab.json's characters
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) == 1:
            continue  # the 256 single bytes are the alphabet, not merges
        parts = _bpe_parts(ranks, token, rank)
        if len(parts) != 2:
            raise InputError(f"tokenizer token {rank} ({token!r}) is not a merge of two lower-ranked tokens: "
                             f"not a GPT-2 style BPE, cannot write merges.txt")
        merges.append(f"{spell(parts[0])} {spell(parts[1])}\n")
    vocab = {spell(t): r for t, r in ranks.items()}
    vocab.update({s: i for i, s in special.items()})
    return json.dumps(dict(sorted(vocab.items(), key=lambda kv: kv[1]))), "#version: 0.2\n" + "".join(merges)


def write_gpt2_tokenizer_files(tokenizer, out_dir):
    """vocab.json + merges.txt (+ a small tokenizer_config.json) for a gpt2-kind Tokenizer: copied from the
    tokenizer's own HF directory when it came from one, else rebuilt from its tiktoken ranks."""
    src = tokenizer.hf_dir
    if src and all(os.path.exists(os.path.join(src, f)) for f in ("vocab.json", "merges.txt")):
        for f in ("vocab.json", "merges.txt"):
            shutil.copyfile(os.path.join(src, f), os.path.join(out_dir, f))
    else:
        vocab, merges = gpt2_bpe_files(tokenizer.enc)
        with open(os.path.join(out_dir, "vocab.json"), "w", encoding="utf-8") as f:
            f.write(vocab)
        with open(os.path.join(out_dir, "merges.txt"), "w", encoding="utf-8") as f:
            f.write(merges)
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "GPT2Tokenizer", "bos_token": EOT_TEXT, "eos_token": EOT_TEXT,
                   "unk_token": EOT_TEXT, "add_prefix_space": False}, f, indent=2)


def _replace_dir(tmp, out_dir, marker="config.json", flag="--export_dir"):
    """Move the finished tmp dir to out_dir. A directory cannot be renamed over a non-empty one, so an old export
    is first moved aside, then deleted. Anything at out_dir that is not an old export (holding `marker`) is left
    alone (refused)."""
    old = None
    if os.path.isfile(out_dir):
        raise InputError(f"{out_dir}: is a file; {flag} must be a directory (new, or a previous export)")
    if os.path.exists(out_dir):
        if os.listdir(out_dir) and not os.path.exists(os.path.join(out_dir, marker)):
            raise ExistsError(f"{out_dir}: exists and is not a previous export (no {marker}): choose another "
                             f"{flag} or remove it")
        old = f"{out_dir}.old.{os.getpid()}"
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    if old:
        shutil.rmtree(old)


def export_hf(model, tokenizer, out_dir, vocab_size=None, chat=False):
    """Write `model` as a Hugging Face GPT-2 directory (config.json, model.safetensors, tokenizer files) that
    GPT2LMHeadModel.from_pretrained loads. LoRA adapters are merged into a copy (the caller's model is untouched).
    vocab_size: rows of wte to keep; default the tokenizer's vocab size (50257 for gpt2), cutting our padding,
    or every row when the model has fewer rows than the tokenizer has ids. chat: a chat model, which also gets
    the chat template and a generation config that stops at the end of a turn (write_chat_files)."""
    from safetensors.torch import save_file

    if model.config.use_bos_zero_training and model.config.bos_scaling_factor != 1.0:
        raise InputError(f"model uses use_bos_zero_training (position 0's input scaled by "
                         f"{model.config.bos_scaling_factor}), which Hugging Face GPT-2 cannot express: the export "
                         f"would compute different logits")
    rows = model.transformer.wte.weight.size(0)
    vocab_size = vocab_size or min(tokenizer.vocab_size, rows)
    if not 0 < vocab_size <= rows:
        raise InputError(f"export vocab_size {vocab_size} must be in [1, {rows}] (the model's embedding rows)")
    if lora.lora_layers(model):
        model = lora.remove_lora(copy.deepcopy(model))  # merge into a copy: the caller keeps its adapters
    tmp = f"{out_dir.rstrip(os.sep)}.tmp.{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        save_file(gpt_to_hf_state(model, vocab_size), os.path.join(tmp, SAFETENSORS), metadata={"format": "pt"})
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf_config(model, vocab_size, tokenizer), f, indent=2)
        if tokenizer.kind == "gpt2":
            write_gpt2_tokenizer_files(tokenizer, tmp)
        if chat:
            write_chat_files(tokenizer, tmp)
        tokenizer.save(os.path.join(tmp, "tokenizer_state.json"))  # the project's own view (keeps char vocabs)
        _replace_dir(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


# ---------------------------------------------------------------------------------------------------------------
# chat files, and peft adapter directories (the mapping of their contents is hf_adapters.py)

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def _write_json(obj, path):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)


def write_chat_files(tokenizer, out_dir, generation=True):
    """A chat model's extras in an export being written: the chat template in tokenizer_config.json (gpt2
    tokenizers, which have HF tokenizer files) and generation_config.json, whose eos ends an assistant turn."""
    config_path = os.path.join(out_dir, "tokenizer_config.json")
    if os.path.exists(config_path):
        with open(config_path) as f:
            config = json.load(f)
        config["chat_template"] = hf_adapters.chat_template()
        _write_json(config, config_path)
    if generation:
        _write_json(hf_adapters.generation_config(tokenizer), os.path.join(out_dir, "generation_config.json"))


def has_project_chat_template(*dirs):
    """True when a tokenizer_config.json in one of dirs carries this project's chat template."""
    for d in dirs:
        try:
            with open(os.path.join(d, "tokenizer_config.json")) as f:
                if json.load(f).get("chat_template") == hf_adapters.chat_template():
                    return True
        except (OSError, ValueError, AttributeError):  # no file, not JSON, not an object
            continue
    return False


def write_peft_adapter(state, config, adapter_dir, tokenizer=None):
    """adapter_model.safetensors + adapter_config.json (+ the tokenizer files with the chat template, for a chat
    model: peft users keep them beside an adapter) into adapter_dir, written in a temp dir and renamed."""
    from safetensors.torch import save_file

    tmp = f"{adapter_dir.rstrip(os.sep)}.tmp.{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        save_file(state, os.path.join(tmp, ADAPTER_WEIGHTS), metadata={"format": "pt"})
        _write_json(config, os.path.join(tmp, ADAPTER_CONFIG))
        if tokenizer is not None and tokenizer.kind == "gpt2":
            write_gpt2_tokenizer_files(tokenizer, tmp)
            write_chat_files(tokenizer, tmp, generation=False)
        _replace_dir(tmp, adapter_dir, marker=ADAPTER_CONFIG, flag="--export_adapter_dir")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return adapter_dir


def read_peft_adapter(adapter_dir):
    """A peft adapter directory -> (adapter_config dict, tensors, weights path), with one-line errors; a config
    that is not plain LoRA is refused before the weights are read."""
    config_path = os.path.join(adapter_dir, ADAPTER_CONFIG)
    if not os.path.isdir(adapter_dir):
        raise MissingFileError(f"{adapter_dir}: no such directory (expected a peft adapter directory with "
                               f"{ADAPTER_CONFIG} + {ADAPTER_WEIGHTS})")
    try:
        with open(config_path) as f:
            config = json.load(f)
    except FileNotFoundError:
        raise MissingFileError(f"{config_path}: not found; --adapter_dir must be a peft adapter directory "
                               f"(PeftModel.save_pretrained writes {ADAPTER_CONFIG} + {ADAPTER_WEIGHTS})") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{config_path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(config, dict):
        raise InputError(f"{config_path}: holds a {type(config).__name__}, expected a JSON object")
    hf_adapters.check_peft_config(config, config_path)
    weights = os.path.join(adapter_dir, ADAPTER_WEIGHTS)
    if not os.path.exists(weights) and os.path.exists(os.path.join(adapter_dir, "adapter_model.bin")):
        weights = os.path.join(adapter_dir, "adapter_model.bin")  # older peft
    return config, _load_weights_file(weights), weights
