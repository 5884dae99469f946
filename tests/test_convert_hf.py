"""convert_hf.py against transformers' GPT2LMHeadModel: random tiny GPT-2s saved in every HF format, converted,
compared logit by logit, exported back and reloaded; GPT-2 tokenizer files; bad directories; the CLI."""

import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"

transformers = pytest.importorskip("transformers")
from transformers import AutoTokenizer, GPT2LMHeadModel  # noqa: E402

import convert_hf  # noqa: E402
from hf import export_hf, load_hf_gpt2, write_gpt2_tokenizer_files  # noqa: E402
from conftest import make_hf_gpt2  # noqa: E402
import lora  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402

transformers.logging.set_verbosity_error()


def make_hf(vocab_size=1000, n_positions=64, n_embd=32, n_layer=2, n_head=2, seed=0):
    """A seeded GPT-2 the tests build themselves (conftest.make_hf_gpt2), read back by transformers: the reference."""
    with tempfile.TemporaryDirectory() as d:
        make_hf_gpt2(d, vocab_size=vocab_size, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                     seed=seed, eos_token_id=0)
        return GPT2LMHeadModel.from_pretrained(d).eval()


def save_bin(model, d, legacy=False, shards=1):
    """The pytorch_model.bin format(s) (transformers 5 writes only safetensors): a pickled state dict. legacy:
    as the original GPT-2 hub files, keys without the 'transformer.' prefix plus the attn.bias / masked_bias
    buffers, and lm_head.weight stored as well."""
    model.config.save_pretrained(d)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    if legacy:
        sd = {k.removeprefix("transformer."): v for k, v in sd.items()}
        P = model.config.n_positions
        for i in range(model.config.n_layer):
            sd[f"h.{i}.attn.bias"] = torch.tril(torch.ones(P, P)).view(1, 1, P, P)
            sd[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    if shards == 1:
        torch.save(sd, os.path.join(d, "pytorch_model.bin"))
        return
    keys = sorted(sd)
    weight_map = {}
    for s in range(shards):
        fname = f"pytorch_model-{s + 1:05d}-of-{shards:05d}.bin"
        part = {k: sd[k] for k in keys[s::shards]}
        torch.save(part, os.path.join(d, fname))
        weight_map.update({k: fname for k in part})
    with open(os.path.join(d, "pytorch_model.bin.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


def save_hf(model, d, fmt):
    d.mkdir(parents=True, exist_ok=True)
    if fmt == "safetensors":
        model.save_pretrained(d)
    elif fmt == "safetensors_sharded":
        model.save_pretrained(d, max_shard_size="40KB")
        assert (d / "model.safetensors.index.json").exists()
    elif fmt == "bin":
        save_bin(model, d)
    elif fmt == "bin_legacy":
        save_bin(model, d, legacy=True)
    elif fmt == "bin_sharded":
        save_bin(model, d, shards=3)
    return d


def hf_logits(model, idx):
    with torch.no_grad():
        return model(idx).logits


def gpt_logits(model, idx):
    model.eval()
    with torch.no_grad():
        return model(idx)[0]


# --------------------------------------------------------------------------------------------------------------
SHAPES = [  # (n_layer, n_head, n_embd, vocab_size, n_positions, format)
    (2, 2, 32, 1000, 64, "safetensors"),
    (1, 4, 64, 777, 128, "bin_legacy"),
    (3, 3, 48, 1000, 64, "safetensors_sharded"),
    (2, 1, 16, 777, 64, "bin"),
    (1, 2, 24, 64, 128, "bin_sharded"),
]


@pytest.mark.parametrize("n_layer,n_head,n_embd,vocab,n_pos,fmt", SHAPES)
def test_convert_matches_transformers_and_exports_back(tmp_path, n_layer, n_head, n_embd, vocab, n_pos, fmt):
    hf = make_hf(vocab, n_pos, n_embd, n_layer, n_head, seed=n_layer * 7 + n_embd)
    d = save_hf(hf, tmp_path / "hf", fmt)
    model, tok = load_hf_gpt2(str(d))

    c = model.config
    assert (c.n_layer, c.n_head, c.n_embd, c.block_size, c.bias) == (n_layer, n_head, n_embd, n_pos, True)
    assert c.vocab_size % 64 == 0 and vocab <= c.vocab_size < vocab + 64
    wte = model.transformer.wte.weight
    assert model.lm_head.weight is wte  # still tied after loading
    if c.vocab_size > vocab:  # pad rows hold the mean real row (see pad_vocab)
        torch.testing.assert_close(wte[vocab:], wte[:vocab].mean(0, keepdim=True).expand(c.vocab_size - vocab, -1))

    idx = torch.randint(0, vocab, (2, n_pos))
    ref = hf_logits(hf, idx)
    ours = gpt_logits(model, idx)
    assert ours.shape == (2, n_pos, c.vocab_size)
    assert (ours[..., :vocab] - ref).abs().max().item() <= 1e-4

    out = tmp_path / "export"
    export_hf(model, tok, str(out), vocab_size=vocab)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["vocab_size"] == vocab and cfg["n_positions"] == n_pos and cfg["model_type"] == "gpt2"
    back, info = GPT2LMHeadModel.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert (hf_logits(back.eval(), idx) - ref).abs().max().item() <= 1e-4
    assert not list(tmp_path.glob("export.*")), "temp dirs left behind"


def test_export_merges_lora_into_a_copy(tmp_path):
    hf = make_hf()
    model, tok = load_hf_gpt2(str(save_hf(hf, tmp_path / "hf", "safetensors")))
    lora.apply_lora(model, rank=4, alpha=8, dropout=0.0, targets=["q", "v", "attn.c_proj", "c_fc", "mlp.c_proj"])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    idx = torch.randint(0, 1000, (2, 32))
    ours = gpt_logits(model, idx)[..., :1000]
    assert (ours - hf_logits(hf, idx)).abs().max().item() > 1e-3  # the adapters really change the model
    before = {k: v.clone() for k, v in model.state_dict().items()}

    export_hf(model, tok, str(tmp_path / "out"), vocab_size=1000)
    back = GPT2LMHeadModel.from_pretrained(tmp_path / "out").eval()
    assert (hf_logits(back, idx) - ours).abs().max().item() <= 1e-4
    assert lora.lora_layers(model) and not any(m.merged for m in lora.lora_layers(model))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "export changed the caller's model"


@pytest.mark.parametrize("activation", ["gelu_new", "gelu"])
def test_export_bias_free_char_model(tmp_path, activation):
    tok = Tokenizer.char_from_texts(["to be or not to be"])
    torch.manual_seed(1)
    model = GPT(GPTConfig(block_size=32, vocab_size=64, n_layer=2, n_head=2, n_embd=32, bias=False,
                          activation_function=activation)).eval()
    with torch.no_grad():  # an MLP that matters: pre-activations of order 1, where the two GELUs differ by ~1e-3
        for block in model.transformer.h:
            block.mlp.c_fc.weight.mul_(8)
            block.mlp.c_proj.weight.mul_(20)
        model.transformer.wte.weight.mul_(5)  # (tied to lm_head) logits of order 1, not 0.02
    out = export_hf(model, tok, str(tmp_path / "char"))
    cfg = json.loads(Path(out, "config.json").read_text())
    assert cfg["vocab_size"] == tok.vocab_size  # padding rows cut back to the tokenizer's vocabulary
    assert cfg["activation_function"] == activation
    assert not Path(out, "vocab.json").exists()  # GPT-2 BPE files only for the gpt2 tokenizer
    assert Tokenizer.load(os.path.join(out, "tokenizer_state.json")).chars == tok.chars
    back = GPT2LMHeadModel.from_pretrained(out).eval()
    idx = torch.tensor([tok.encode("to be or not")])
    ours = gpt_logits(model, idx)[..., :tok.vocab_size]
    assert (hf_logits(back, idx) - ours).abs().max().item() <= 1e-5
    again, _ = load_hf_gpt2(out)  # and back in: the same activation, the same logits
    assert again.config.activation_function == activation
    assert (gpt_logits(again, idx)[..., :tok.vocab_size] - ours).abs().max().item() <= 1e-5
    other = "gelu" if activation == "gelu_new" else "gelu_new"
    back_other = GPT2LMHeadModel.from_pretrained(out, activation_function=other).eval()
    assert (hf_logits(back_other, idx) - ours).abs().max().item() > 1e-4  # the test tells the two apart

    # re-export over the previous export replaces it; a foreign non-empty directory is refused
    export_hf(model, tok, out)
    foreign = tmp_path / "precious"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="precious: exists and is not a previous export"):
        export_hf(model, tok, str(foreign))
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_export_refuses_bos_zero_model(tmp_path):
    model = GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=1, n_head=1, n_embd=8, use_bos_zero_training=True))
    with pytest.raises(ValueError, match="use_bos_zero_training"):
        export_hf(model, Tokenizer.char_from_texts(["ab"]), str(tmp_path / "x"))
    assert not (tmp_path / "x").exists()


# --------------------------------------------------------------------------------------------------------------
def _cache_file(url):  # tiktoken names each cached download sha1(url)
    return SHARED / "tiktoken_cache" / hashlib.sha1(url.encode()).hexdigest()


def test_gpt2_tokenizer_files_are_gpt2s_own_and_encode_like_tiktoken(tmp_path):
    base = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"
    encoder_json, vocab_bpe = _cache_file(base + "encoder.json"), _cache_file(base + "vocab.bpe")
    if not encoder_json.exists():
        pytest.skip("shared tiktoken cache not found")
    tiktoken_tok = Tokenizer("gpt2")
    write_gpt2_tokenizer_files(tiktoken_tok, str(tmp_path))
    # rebuilt from tiktoken's ranks, the files are byte for byte GPT-2's released encoder.json / vocab.bpe
    assert (tmp_path / "vocab.json").read_bytes() == encoder_json.read_bytes()
    assert (tmp_path / "merges.txt").read_bytes() == vocab_bpe.read_bytes()

    text = (SHARED / "corpora" / "pride_and_prejudice_pg1342.txt").read_text(encoding="utf-8")[:60000]
    text += " naïve café — “quotes” 12345 \n\n  tabs\tand emoji 🙂"
    expected = tiktoken_tok.encode(text)
    hf_dir_tok = Tokenizer("gpt2", hf_dir=str(tmp_path))
    assert hf_dir_tok.encode(text) == expected
    assert hf_dir_tok.decode(expected) == text
    hf_tok = AutoTokenizer.from_pretrained(tmp_path)  # transformers' own BPE over the same files
    assert hf_tok(text)["input_ids"] == expected
    assert hf_tok.eos_token_id == 50256


def test_tokenizer_comes_from_the_dir_when_it_has_files(tmp_path):
    hf = make_hf(vocab_size=50257, n_embd=8, n_layer=1, n_head=1, n_positions=16)
    d = save_hf(hf, tmp_path / "hf", "safetensors")
    assert load_hf_gpt2(str(d))[1].hf_dir is None  # no files: tiktoken's gpt2
    write_gpt2_tokenizer_files(Tokenizer("gpt2"), str(d))
    model, tok = load_hf_gpt2(str(d))
    assert tok.hf_dir == str(d) and tok.vocab_size == 50257 and model.config.vocab_size == 50304
    (d / "merges.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"merges.txt: not found, but vocab.json is"):
        load_hf_gpt2(str(d))


# --------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def good_dir(tmp_path_factory):
    return save_hf(make_hf(vocab_size=100, n_embd=16, n_layer=1, n_head=2), tmp_path_factory.mktemp("good"),
                   "safetensors")


def _copy(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _edit_config(d, **changes):
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))


def test_bad_directories_give_clear_errors(tmp_path, good_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "README.md").write_text("hi")
    with pytest.raises(FileNotFoundError, match=r"empty/config.json: not found \(the directory holds: README.md\)"):
        load_hf_gpt2(str(empty))

    llama = _copy(good_dir, tmp_path / "llama")
    _edit_config(llama, model_type="llama")
    with pytest.raises(ValueError, match=r"config.json: model_type is 'llama', expected 'gpt2'"):
        load_hf_gpt2(str(llama))

    relu = _copy(good_dir, tmp_path / "relu")
    _edit_config(relu, activation_function="relu")
    with pytest.raises(ValueError, match=r"activation_function is 'relu'.*tanh GELU"):
        load_hf_gpt2(str(relu))

    eps = _copy(good_dir, tmp_path / "eps")
    _edit_config(eps, layer_norm_epsilon=1e-6)
    with pytest.raises(ValueError, match=r"layer_norm_epsilon is 1e-06.*1e-5"):
        load_hf_gpt2(str(eps))

    no_weights = _copy(good_dir, tmp_path / "noweights")
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"noweights: no weights file \(found: config.json.*expected model.sa"):
        load_hf_gpt2(str(no_weights))

    truncated = _copy(good_dir, tmp_path / "truncated")
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"truncated/model.safetensors: not a readable safetensors file, truncated"):
        load_hf_gpt2(str(truncated))

    shape = _copy(good_dir, tmp_path / "shape")
    _edit_config(shape, vocab_size=128)  # the file's wte has 100 rows
    with pytest.raises(ValueError, match=r"tensor 'wte.weight' has shape \(100, 16\), expected \(128, 16\)"):
        load_hf_gpt2(str(shape))

    deeper = _copy(good_dir, tmp_path / "deeper")
    _edit_config(deeper, n_layer=2)  # config promises a layer the file lacks
    with pytest.raises(ValueError, match=r"tensor 'h.1.ln_1.weight' is missing"):
        load_hf_gpt2(str(deeper))

    with pytest.raises(FileNotFoundError, match="no such directory"):
        load_hf_gpt2(str(tmp_path / "nowhere"))


def test_extra_tensor_truncated_bin_and_untied_head(tmp_path):
    hf = make_hf(vocab_size=100, n_embd=16, n_layer=1, n_head=2)
    d = save_hf(hf, tmp_path / "extra", "bin")
    sd = torch.load(d / "pytorch_model.bin", weights_only=True)
    torch.save({**sd, "transformer.h.0.mlp.c_gate.weight": torch.zeros(3)}, d / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"has no place for: h.0.mlp.c_gate.weight"):
        load_hf_gpt2(str(d))

    untied = dict(sd)
    untied["lm_head.weight"] = sd["lm_head.weight"] + 1.0
    torch.save(untied, d / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"lm_head.weight differs from wte.weight"):
        load_hf_gpt2(str(d))

    data = (d / "pytorch_model.bin").read_bytes()
    (d / "pytorch_model.bin").write_bytes(data[:1000])
    with pytest.raises(ValueError, match=r"pytorch_model.bin: not a readable PyTorch weights file, truncated"):
        load_hf_gpt2(str(d))


def test_hub_id_without_network_says_how_to_use_a_local_dir(monkeypatch):
    hub = pytest.importorskip("huggingface_hub")

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(hub, "snapshot_download", offline)
    with pytest.raises(FileNotFoundError, match=r"'gpt2' is not a local directory and could not be downloaded.*"
                                                r"--local-dir DIR\) and pass that local DIR"):
        load_hf_gpt2("gpt2")


# --------------------------------------------------------------------------------------------------------------
def run_cli(*args, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(ROOT / "convert_hf.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_cli_convert_then_export_end_to_end(tmp_path):
    import checkpoint

    hf = make_hf(vocab_size=50257, n_embd=16, n_layer=2, n_head=2, n_positions=32)
    d = save_hf(hf, tmp_path / "hf", "safetensors")
    write_gpt2_tokenizer_files(Tokenizer("gpt2"), str(d))
    ckpts = tmp_path / "ckpts"

    r = run_cli("--hf_dir", str(d), "--model_name", "tiny", "--out_dir", str(ckpts), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "peak memory" in r.stdout
    assert (ckpts / "tiny" / "ckpt.pt").exists() and (ckpts / "tiny" / "tokenizer_state.json").exists()
    model, tok, ckpt = checkpoint.load_model("tiny", out_dir=str(ckpts))
    assert ckpt["iter_num"] == 0 and ckpt["lora"] is None and ckpt["base"] is None and ckpt["format_version"] == 1
    assert ckpt["config"]["n_embd"] == 16 and ckpt["config"]["vocab_size"] == 50304 and ckpt["config"]["bias"]
    ids = tok.encode("It is a truth universally acknowledged")
    idx = torch.tensor([ids])
    ref = hf_logits(hf, idx)
    assert (gpt_logits(model, idx)[..., :50257] - ref).abs().max().item() <= 1e-4

    out = tmp_path / "exported"
    r = run_cli("--model_name", "tiny", "--out_dir", str(ckpts), "--export_dir", str(out), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    back = GPT2LMHeadModel.from_pretrained(out).eval()
    assert back.config.vocab_size == 50257
    assert (hf_logits(back, idx) - ref).abs().max().item() <= 1e-4
    assert AutoTokenizer.from_pretrained(out)("It is a truth universally acknowledged")["input_ids"] == ids



def test_cli_errors_are_one_line_and_exit_1(tmp_path, good_dir, capsys):
    ckpts = ["--out_dir", str(tmp_path / "ckpts")]
    assert convert_hf.main(["--hf_dir", str(good_dir), "--model_name", "m", *ckpts]) == 0
    cases = [
        (["--hf_dir", str(good_dir), "--model_name", "m", *ckpts], "ckpt.pt: already exists; pass --overwrite"),
        (["--hf_dir", str(tmp_path / "missing"), "--model_name", "x", *ckpts], "missing: no such directory"),
        (["--model_name", "nope", "--export_dir", str(tmp_path / "e"), *ckpts], "no checkpoint for model 'nope'"),
        (["--model_name", "m", *ckpts], "exactly one of --hf_dir DIR (convert"),
    ]
    for argv, message in cases:
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:  # every command: `error: <one line>`, exit status 1
            convert_hf.main(argv)
        assert e.value.code == 1, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1, err
    assert convert_hf.main(["--hf_dir", str(good_dir), "--model_name", "m", *ckpts, "--overwrite"]) == 0
