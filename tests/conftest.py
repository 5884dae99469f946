"""Shared test setup: the project root on sys.path, the offline tiktoken cache, and small real datasets."""

import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.abspath(os.path.join(ROOT, "..", "shared"))
sys.path.insert(0, ROOT)
if os.path.isdir(os.path.join(SHARED, "tiktoken_cache")):
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", os.path.join(SHARED, "tiktoken_cache"))
SHAKESPEARE = os.path.join(SHARED, "corpora", "tinyshakespeare.txt")
SAMPLE_CHAT = os.path.join(ROOT, "data", "sample_chat.jsonl")
torch.set_num_threads(2)


def run_cli(*args, cwd=ROOT, timeout=300, env=None):
    """Run `python <args>` in the project root; returns the CompletedProcess (stdout, stderr, returncode)."""
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=full_env)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny shapes: one thread is as fast, and it does not stall when the machine's cores are busy. A module opts in
    with pytestmark = pytest.mark.usefixtures("one_thread")."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def shakespeare_char(tmp_path_factory):
    """The first 200 kB of tinyshakespeare, prepared with the char tokenizer (text format)."""
    import prepare_dataset
    folder = tmp_path_factory.mktemp("shk")
    src = folder / "shakespeare.txt"
    with open(SHAKESPEARE) as f:
        src.write_text(f.read()[:200_000])
    out = folder / "data"
    prepare_dataset.prepare([str(src)], str(out), tokenization="char", fmt="text")
    return str(out)


@pytest.fixture(scope="session")
def sample_chat(tmp_path_factory):
    """The project's shipped sample conversations, prepared with the char tokenizer (chat format, masks)."""
    import prepare_dataset
    out = tmp_path_factory.mktemp("chat") / "data"
    prepare_dataset.prepare([SAMPLE_CHAT], str(out), tokenization="char", fmt="chat")
    return str(out)


def make_hf_gpt2(folder, vocab_size=1000, n_positions=64, n_embd=32, n_layer=2, n_head=2, seed=0, wte_std=0.02,
                 tokenizer_files=False, eos_token_id=None):
    """A seeded random GPT-2 written in Hugging Face's format (config.json + model.safetensors) by the tests
    themselves: transformers and peft only read it, so no test depends on how a library initialises weights.
    Every tensor is drawn here from one torch.Generator: linear weights N(0, 0.02), position embeddings
    N(0, 0.01), token embeddings N(0, wte_std), biases N(0, 0.1) and LayerNorms 1 + N(0, 0.1) (non-trivial, so a
    mixed-up tensor shows). tokenizer_files: also write GPT-2's vocab.json + merges.txt (from tiktoken's gpt2).
    Returns the folder as a string."""
    import json

    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    C = n_embd

    def draw(*shape, std=0.02, mean=0.0):
        return torch.randn(*shape, generator=g) * std + mean

    state = {"transformer.wte.weight": draw(vocab_size, C, std=wte_std),
             "transformer.wpe.weight": draw(n_positions, C, std=0.01)}
    for i in range(n_layer):
        p = f"transformer.h.{i}."
        for norm in ("ln_1", "ln_2"):
            state[p + norm + ".weight"], state[p + norm + ".bias"] = draw(C, std=0.1, mean=1.0), draw(C, std=0.1)
        for name, n_in, n_out in (("attn.c_attn", C, 3 * C), ("attn.c_proj", C, C), ("mlp.c_fc", C, 4 * C),
                                  ("mlp.c_proj", 4 * C, C)):
            state[p + name + ".weight"] = draw(n_in, n_out)  # Conv1D layout: (in, out)
            state[p + name + ".bias"] = draw(n_out, std=0.1)
    state["transformer.ln_f.weight"], state["transformer.ln_f.bias"] = draw(C, std=0.1, mean=1.0), draw(C, std=0.1)
    os.makedirs(folder, exist_ok=True)
    save_file(state, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    eos = eos_token_id if eos_token_id is not None else (50256 if vocab_size > 50256 else 0)
    config = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": vocab_size,
              "n_positions": n_positions, "n_ctx": n_positions, "n_embd": n_embd, "n_layer": n_layer,
              "n_head": n_head, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
              "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "bos_token_id": eos, "eos_token_id": eos,
              "tie_word_embeddings": True}
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    if tokenizer_files:
        from hf import write_gpt2_tokenizer_files
        from tokenizer import Tokenizer
        write_gpt2_tokenizer_files(Tokenizer("gpt2"), folder)
    return str(folder)
