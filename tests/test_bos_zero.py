"""BOS zero training: position 0 and only position 0 is scaled (training, evaluation, KV-cache decoding, through
DDP and torch.compile), factor 1.0 is the flag off, factor 0.0 trains without NaN, BOS-first windows for text and
chat data, evaluate.py's figures, and bad input."""

import json
import math
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import evaluate
import sample
from checkpoint import atomic_save, load_checkpoint, load_model
from config import ConfigError, load_config
from conftest import ROOT, make_hf_gpt2, run_cli
from data import BatchLoader
from model import GPT, GPTConfig, KVCache
from train import train

torch.set_num_threads(1)  # tiny models; the machine's cores are shared
V = 61
SMALL = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, batch_size=4, eval_iters=2, log_interval=1,
             warmup_iters=2, learning_rate=3e-3, min_lr=3e-4)


def tiny(factor=0.25, use_bos=True, bias=True):
    torch.manual_seed(0)
    cfg = GPTConfig(block_size=32, vocab_size=V, n_layer=2, n_head=2, n_embd=32, bias=bias, dropout=0.0,
                    use_bos_zero_training=use_bos, bos_scaling_factor=factor)
    return GPT(cfg)


def ids(B=3, T=20, seed=1):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def by_hand(model, idx, factor):
    """The forward pass written out: embedding, row 0 (and only row 0) times factor, blocks, head."""
    x = model.transformer.wte(idx) + model.transformer.wpe(torch.arange(idx.size(1)))  # (B, T, C)
    x = torch.cat([x[:, :1] * factor, x[:, 1:]], dim=1)
    for block in model.transformer.h:
        x = block(x)
    return model.lm_head(model.transformer.ln_f(x))


def flag_off(model):
    model.config.use_bos_zero_training = False
    return model


# ---------------------------------------------------------------------------------------------------------------
# the model

def test_embed_scales_absolute_position_zero_only():
    model, idx = tiny(0.25), ids()
    on = model.embed(idx)
    later = model.embed(idx[:, 5:9], start_pos=5)  # a chunk after a cached prefix: nothing to scale
    flag_off(model)
    off = model.embed(idx)
    torch.testing.assert_close(on[:, 0], 0.25 * off[:, 0])
    assert torch.equal(on[:, 1:], off[:, 1:])
    assert torch.equal(later, model.embed(idx[:, 5:9], start_pos=5))


@pytest.mark.parametrize("mode", ["train", "eval", "explicit_attention"])
def test_forward_scales_only_position_zero(mode):
    """Training forward (train mode), full-sequence evaluation and the explicit attention path all equal the
    forward pass written out with only row 0 scaled; the loss is the cross-entropy of those logits."""
    model, idx = tiny(0.25), ids()
    targets = ids(seed=2)
    model.train(mode == "train")
    logits, loss = model(idx, targets, attn_out=[] if mode == "explicit_attention" else None)
    ref = by_hand(model, idx, 0.25)
    torch.testing.assert_close(logits, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss, F.cross_entropy(ref.view(-1, V), targets.view(-1)), atol=1e-5, rtol=1e-5)


def test_factor_zero_makes_the_first_token_invisible_but_not_the_second():
    model = tiny(0.0).eval()
    idx = ids()
    other_first, other_second = idx.clone(), idx.clone()
    other_first[:, 0] = (idx[:, 0] + 1) % V
    other_second[:, 1] = (idx[:, 1] + 1) % V
    assert torch.equal(model(idx)[0], model(other_first)[0])  # position 0's input is exactly zero
    assert not torch.allclose(model(idx)[0][:, 1:], model(other_second)[0][:, 1:])


def test_kv_cache_decoding_equals_full_recompute_with_the_flag_on():
    """Prefill, a chunk after the prefix and one token at a time give the logits of one full forward pass: only
    absolute position 0 is scaled, never a decoded token."""
    model, idx = tiny(0.05).eval(), ids(2, 24)
    full, _ = model(idx)
    cache = KVCache(2, 2, 2, 32, 16)
    parts = [model(idx[:, :7], kv_cache=cache)[0], model(idx[:, 7:11], kv_cache=cache)[0]]
    parts += [model(idx[:, t:t + 1], kv_cache=cache)[0] for t in range(11, 24)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(full, by_hand(model, idx, 0.05), atol=1e-5, rtol=1e-5)
    prompt = idx[:, :5]
    assert torch.equal(model.generate(prompt, 20, temperature=0),
                       model.generate(prompt, 20, temperature=0, use_kv_cache=False))


def test_sliding_window_keeps_bos_at_position_zero():
    """Past block_size the window slides; a BOS-zero model keeps its first token (BOS) in front so no decoded
    token is ever moved to the scaled position."""
    model = tiny(0.05).eval()
    buf = torch.arange(40).view(1, 40)
    assert model.context_window(buf, 40, 8).tolist() == [[0, 33, 34, 35, 36, 37, 38, 39]]
    assert model.context_window(buf, 6, 8).tolist() == [list(range(6))]
    out = model.generate(torch.tensor([[0, 5, 6]]), 60, temperature=0)  # runs past block_size 32 with the cache
    assert out.shape == (1, 63)
    flag_off(model)
    assert model.context_window(buf, 40, 8).tolist() == [list(range(32, 40))]


def test_factor_one_equals_the_flag_off():
    model, idx = tiny(1.0).eval(), ids()
    on = model(idx, ids(seed=2))
    on_gen = model.generate(idx[:, :4], 10, temperature=0)
    flag_off(model)
    off = model(idx, ids(seed=2))
    assert torch.equal(on[0], off[0]) and torch.equal(on[1], off[1])
    assert torch.equal(on_gen, model.generate(idx[:, :4], 10, temperature=0))


@pytest.mark.parametrize("bias", [False, True])
def test_factor_zero_gives_finite_loss_and_gradients(bias):
    model = tiny(0.0, bias=bias).train()
    _, loss = model(ids(), ids(seed=2))
    loss.backward()
    assert torch.isfinite(loss)
    for name, p in model.named_parameters():
        assert torch.isfinite(p.grad).all(), name
    wpe = model.transformer.wpe.weight.grad
    assert torch.count_nonzero(wpe[0]) == 0 and torch.count_nonzero(wpe[1]) > 0  # position 0 gets no gradient


def test_works_through_ddp_and_torch_compile(tmp_path):
    """DDP (a one-process gloo group) and torch.compile see the flag as part of the model: same logits as the
    plain model, and changing the factor after compiling takes effect (dynamo guards on it). The compile test
    uses the aot_eager backend: the same graph capture as inductor without minutes of C++ compilation."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    model, idx = tiny(0.05).eval(), ids()
    ref = by_hand(model, idx, 0.05)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        torch.testing.assert_close(DDP(model)(idx)[0], ref, atol=1e-5, rtol=1e-5)
    finally:
        dist.destroy_process_group()
    compiled = torch.compile(model, backend="aot_eager")
    torch.testing.assert_close(compiled(idx)[0], ref, atol=1e-5, rtol=1e-5)
    model.config.bos_scaling_factor = 0.5
    torch.testing.assert_close(compiled(idx)[0], by_hand(model, idx, 0.5), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# data and training

def test_chat_windows_start_with_bos_and_masks_align(sample_chat):
    """Every window starts with BOS; Y and M are a stretch of the shard and its mask (M the mask of each target).
    The prepared stream itself starts with the BOS that precedes the first conversation, with mask 0."""
    meta = json.loads(open(os.path.join(sample_chat, "dataset_metadata.json")).read())
    toks = np.fromfile(os.path.join(sample_chat, "train", "shard_00000.bin"), dtype=meta["token_dtype"])
    mask = np.fromfile(os.path.join(sample_chat, "train", "shard_00000_mask.bin"), dtype=np.uint8)
    eot = meta["eot_token"]
    assert toks[0] == eot and mask[0] == 0
    loader = BatchLoader(sample_chat, "train", 8, 48, use_mask=True, prepend_bos=True, bos_token=eot)
    x, y, m = loader.get_batch()
    assert (x[:, 0] == eot).all() and torch.equal(x[:, 1:], y[:, :-1])
    windows = np.lib.stride_tricks.sliding_window_view(toks, 48)
    for row in range(8):
        start = int(np.flatnonzero((windows == y[row].numpy()).all(axis=1))[0])
        assert np.array_equal(m[row].numpy(), mask[start:start + 48])


@pytest.fixture(scope="module")
def bos_model(tmp_path_factory, shakespeare_char):
    """A tiny BOS-zero (0.05) model trained a few steps on shakespeare_char."""
    out = tmp_path_factory.mktemp("bos") / "ckpt"
    cfg = load_config(os.path.join(ROOT, "configs", "tiny_bos_zero.json"),
                      {**SMALL, "out_dir": str(out), "dataset_dir": shakespeare_char, "model_name": "bz",
                       "max_iters": 6, "eval_interval": 6})
    summary = train(cfg, log=lambda *a: None)
    return str(out), summary


def test_bos_zero_config_is_stored_in_the_checkpoint(bos_model):
    out, summary = bos_model
    ckpt = load_checkpoint(os.path.join(out, "bz", "ckpt.pt"))
    assert ckpt["config"]["use_bos_zero_training"] and ckpt["config"]["bos_scaling_factor"] == 0.05
    model, _, _ = load_model("bz", out)
    assert model.config.use_bos_zero_training and model.config.bos_scaling_factor == 0.05
    assert math.isfinite(summary["val_loss"])


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory, sample_chat):
    """Chat SFT (masked loss) of a tiny model with BOS zero at factor 0.0 and a high learning rate."""
    out = tmp_path_factory.mktemp("chat") / "ckpt"
    cfg = load_config(None, {**SMALL, "out_dir": str(out), "dataset_dir": sample_chat, "model_name": "c0",
                             "use_loss_mask": True, "use_bos_zero_training": True, "bos_scaling_factor": 0.0,
                             "max_iters": 6, "eval_interval": 6, "learning_rate": 1e-2})
    lines = []
    summary = train(cfg, log=lines.append)
    return str(out), summary, lines


def test_factor_zero_chat_sft_trains_without_nan(chat_model):
    out, summary, lines = chat_model
    assert summary["iter_num"] == 6 and not any("non-finite" in line for line in lines)
    assert math.isfinite(summary["last_step_loss"]) and math.isfinite(summary["val_loss"])
    for p in load_model("c0", out)[0].parameters():
        assert torch.isfinite(p).all()


# ---------------------------------------------------------------------------------------------------------------
# evaluate.py

def test_evaluate_cli_figures(tmp_path, bos_model, shakespeare_char):
    out, _ = bos_model
    js, png = tmp_path / "eval.json", tmp_path / "att.png"
    r = run_cli("evaluate.py", "--model_name", "bz", "--out_dir", out, "--dataset_dir", shakespeare_char,
                "--max_windows", "40", "--sweep", "0.05,1.0", "--attention", "--attention_png", str(png),
                "--generate_samples", "--num_samples", "1", "--max_new_tokens", "5", "--json", str(js))
    assert r.returncode == 0, r.stderr
    rep = json.loads(js.read_text())
    assert [x["setting"] for x in rep["results"]] == ["0.05", "none"]
    assert rep["data"]["prepend_bos"] and rep["data"]["windows"] == 40 and rep["data"]["targets"] == 40 * 32
    # the loss by hand: the same 40 windows (targets tok[a : a+32], a = 1 + 32k, spread evenly), BOS first
    meta = json.loads(open(os.path.join(shakespeare_char, "dataset_metadata.json")).read())
    toks = np.fromfile(os.path.join(shakespeare_char, "val", "shard_00000.bin"), dtype=meta["token_dtype"]).astype(np.int64)
    starts = list(range(1, len(toks) - 32 + 1, 32))
    starts = [starts[i] for i in np.linspace(0, len(starts) - 1, 40).round().astype(int)]
    Y = torch.tensor(np.stack([toks[a:a + 32] for a in starts]))
    X = torch.cat([torch.full((40, 1), meta["eot_token"]), Y[:, :-1]], dim=1)
    model = load_model("bz", out)[0].eval()
    with torch.no_grad():
        logits = model(X)[0]
        scaled = F.cross_entropy(logits.reshape(-1, logits.size(-1)), Y.reshape(-1)).item()
        rest = F.cross_entropy(logits[:, 1:].reshape(-1, logits.size(-1)), Y[:, 1:].reshape(-1)).item()
        flag_off(model)
        unscaled = F.cross_entropy(model(X)[0].reshape(-1, model.config.vocab_size), Y.reshape(-1)).item()
    assert rep["results"][0]["loss"] == pytest.approx(scaled, rel=1e-5)
    assert rep["results"][0]["loss_excl_first"] == pytest.approx(rest, rel=1e-5)  # targets 1..T-1 of each window
    assert rep["results"][1]["loss"] == pytest.approx(unscaled, rel=1e-5)
    for row in rep["results"] + rep["sweep"]:
        assert row["perplexity"] == pytest.approx(math.exp(row["loss"]))
    assert rep["sweep"][0]["loss"] == pytest.approx(scaled, rel=1e-6)
    assert rep["sweep"][1]["loss"] == pytest.approx(unscaled, rel=1e-6)  # factor 1.0 = no scaling
    att = rep["attention"]
    assert att["setting"] == "0.05" and np.array(att["per_head"]).shape == (2, 2)
    assert all(0.0 <= v <= 1.0 for row in att["per_head"] for v in row)
    assert att["per_layer"] == pytest.approx(np.mean(att["per_head"], axis=1).tolist())
    assert png.exists() and png.read_bytes()[:4] == b"\x89PNG"
    assert [s["setting"] for s in rep["samples"]] == ["0.05", "none"]
    assert "attention mass on position 0" in r.stdout and "perplexity" in r.stdout


def test_evaluate_masked_chat_and_text_file(tmp_path, chat_model, sample_chat):
    """Chat data is scored on mask-1 targets only; --text_file scores a plain file; --no_bos_scaling alone gives
    one row."""
    common = ["--model_name", "c0", "--out_dir", chat_model[0]]
    rep = evaluate.run(evaluate.parse_args(common + ["--dataset_dir", sample_chat, "--max_windows", "30"]), log=lambda *a: None)
    assert rep["data"]["masked"] and rep["data"]["prepend_bos"]
    assert [x["setting"] for x in rep["results"]] == ["0", "none"]
    assert 0 < rep["results"][0]["targets"] < 30 * 32 and math.isfinite(rep["results"][0]["loss"])
    text = tmp_path / "t.txt"
    text.write_text("<|user|>\nhello there, how are you today\n" * 5)
    rep = evaluate.run(evaluate.parse_args(common + ["--text_file", str(text), "--no_bos_scaling"]), log=lambda *a: None)
    assert [x["setting"] for x in rep["results"]] == ["none"]
    assert not rep["data"]["masked"] and rep["results"][0]["targets"] == 32 * ((len(text.read_text()) - 1) // 32)


def cli_error(main, argv, capsys):
    """Run a CLI's main in-process (no new interpreter per case); returns its stderr, checking exit status 1."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 1, err
    assert err.startswith("error:") and len(err.strip().splitlines()) == 1, err
    return err


# ---------------------------------------------------------------------------------------------------------------
# bad input

def test_factor_outside_unit_interval_in_config_is_refused(tmp_path):
    preset = tmp_path / "bad.json"
    for factor in (1.5, -0.1, float("nan")):
        preset.write_text(json.dumps({"use_bos_zero_training": True, "bos_scaling_factor": factor}))
        with pytest.raises(ConfigError, match=r"bad.json: 'bos_scaling_factor'.*\[0, 1\]"):
            load_config(str(preset))
    factor = -0.1
    r = run_cli("train.py", "--use_bos_zero_training", "--bos_scaling_factor", str(factor), timeout=120)
    assert r.returncode == 1 and r.stderr.startswith("error:") and "bos_scaling_factor" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_evaluate_bad_input_is_one_line_error(tmp_path, bos_model, shakespeare_char, capsys):
    out, _ = bos_model
    base = ["--model_name", "bz", "--out_dir", out, "--dataset_dir", shakespeare_char, "--max_windows", "2"]
    cases = [
        (["--scaling_factor", "1.5"], "--scaling_factor: BOS scaling factor 1.5 must lie in [0, 1]"),
        (["--scaling_factor", "nan"], "must lie in [0, 1]"),
        (["--sweep", "0.1,abc"], "'abc' is not a number"),
        (["--sweep", "0.1,2"], "--sweep: BOS scaling factor 2.0 must lie in [0, 1]"),
        (["--scaling_factor", "0.1", "--no_bos_scaling"], "not allowed with"),
        (["--attention", "--attention_max_mb", "0.01"], "lower --attention_seq_len"),
        (["--attention", "--attention_seq_len", "64"], "longer than the evaluation windows"),
        (["--block_size", "1000"], "longer than the model's block_size"),
    ]
    for extra, message in cases:
        assert message in cli_error(evaluate.main, base + extra, capsys), extra
    assert "--dataset_dir --text_file is required" in cli_error(evaluate.main, base[:4], capsys)
    # a checkpoint whose factor was edited out of range
    ckpt = load_checkpoint(os.path.join(out, "bz", "ckpt.pt"))
    ckpt["model_args"]["bos_scaling_factor"] = 3.0
    atomic_save(ckpt, str(tmp_path / "ck" / "edited" / "ckpt.pt"))
    err = cli_error(evaluate.main, ["--model_name", "edited", "--out_dir", str(tmp_path / "ck"), "--dataset_dir",
                                    shakespeare_char, "--max_windows", "2"], capsys)
    assert "model 'edited'" in err and "3.0 must lie in [0, 1]" in err
    err = cli_error(sample.main, ["--model_name", "bz", "--out_dir", out, "--bos_scaling_factor", "2"], capsys)
    assert "[0, 1]" in err


def test_gpt2_lora_bos_zero_preset(tmp_path):
    """The LoRA preset fine-tunes a converted GPT-2 (here a tiny random one in Hugging Face format) with BOS zero."""
    import prepare_dataset
    make_hf_gpt2(tmp_path / "hf", vocab_size=50257, n_positions=64, n_embd=16, n_layer=1, n_head=2)
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 200 + "\nAnd so on, again and again.\n" * 40)
    prepare_dataset.prepare([str(text)], str(tmp_path / "data"), tokenization="gpt2", fmt="text")
    cfg = load_config(os.path.join(ROOT, "configs", "gpt2_lora_bos_zero.json"),
                      {"init_from": str(tmp_path / "hf"), "dataset_dir": str(tmp_path / "data"), "out_dir": str(tmp_path / "ckpt"),
                       "block_size": 32, "batch_size": 2, "gradient_accumulation_steps": 1, "max_iters": 2,
                       "eval_interval": 2, "eval_iters": 1})
    summary = train(cfg, log=lambda *a: None)
    assert math.isfinite(summary["val_loss"])
    model, _, ckpt = load_model("gpt2_lora_bos_zero", str(tmp_path / "ckpt"))
    assert ckpt["lora"] and ckpt["base"]["kind"] == "hf"
    assert model.config.use_bos_zero_training and model.config.bos_scaling_factor == 0.05
