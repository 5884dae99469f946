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
