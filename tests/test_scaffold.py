"""scaffold.py: the fuser and fused model on small random GPTs saved as real checkpoints (tmp_path) — weight 0 is
the base exactly, a scaffold of another width works, padding is masked, the KV cache agrees with full recompute,
training leaves the base bit-for-bit unchanged and its save reloads (today's layout and the old one), the repetition
guard, bad input, the CLI; the training loop: an interrupted and resumed run equals a straight one bit for bit,
non-finite steps are skipped and counted, SIGTERM saves the training state and exits cleanly."""

import io
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import scaffold
from checkpoint import atomic_save, load_checkpoint
from conftest import ROOT, make_hf_gpt2, run_cli
from checkpoint import CheckpointError
from config import ConfigError
from errors import MissingFileError
from data import DataError
from model import GPT, GPTConfig
from runtime import read_metrics
from tokenizer import Tokenizer

LETTERS = "abcdefghijklmnopqrstuvwxyz"
torch.set_num_threads(1)  # tiny models: one thread is fastest, and the machine's cores are shared


def char_tok():
    return Tokenizer.char_from_texts([LETTERS + "="])


def save_gpt(out_dir, name, n_layer, n_embd, n_head, seed, block_size=32):
    """A random GPT with the toy's char tokenizer, saved as a project checkpoint out_dir/name/ckpt.pt."""
    torch.manual_seed(seed)
    tok = char_tok()
    model = GPT(GPTConfig(block_size=block_size, vocab_size=64, n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                          dropout=0.0, bias=True))
    ckpt = {"model": model.state_dict(), "model_args": dict(vars(model.config)), "tokenizer": tok.state_dict(),
            "config": {}, "iter_num": 0, "lora": None, "base": None}
    atomic_save(ckpt, os.path.join(out_dir, name, "ckpt.pt"))
    return model


def shift(word):
    return "".join(LETTERS[(LETTERS.index(c) + 1) % 26] for c in word)


def write_toy(path, n, seed=0, length=4):
    g = torch.Generator().manual_seed(seed)
    with open(path, "w") as f:
        for _ in range(n):
            word = "".join(LETTERS[i] for i in torch.randint(0, 26, (length,), generator=g).tolist())
            f.write(json.dumps({"prompt": word + "=", "completion": shift(word)}) + "\n")
    return str(path)


@pytest.fixture()
def models(tmp_path):
    """out_dir with a 4-layer 32-wide base and a 2-layer 48-wide scaffold (another width and head count)."""
    out = str(tmp_path / "ck")
    save_gpt(out, "base", n_layer=4, n_embd=32, n_head=4, seed=1)
    save_gpt(out, "scaf", n_layer=2, n_embd=48, n_head=3, seed=2)
    return out


def make_cfg(tmp_path, out, **kw):
    values = dict(base_model="base", scaffold_model="scaf", out_dir=out, model_name="fused", cross_attn_layers=[1, 3],
                  train_file=write_toy(tmp_path / "toy.jsonl", 48), batch_size=8, num_epochs=1, device="cpu",
                  dtype="float32", num_samples=1, max_new_tokens=8, log_interval=1)
    values.update(kw)
    return scaffold.load_scaffold_config(None, values)


def randomise_fusers(fused, seed=0):
    """Trained-looking fusers: a non-zero output projection, so weight > 0 really changes the logits."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for f in fused.fusers.values():
            f.c_proj.weight.normal_(0, 0.5)


def batch_of(fused_tokens, texts, prompts):
    base_tok, scaffold_tok = fused_tokens
    exs = [{"where": "t", "prompt": p, "turns": None, "completion": c} for p, c in zip(prompts, texts)]
    items = [(*scaffold.encode_example(ex, base_tok, scaffold_tok), ex) for ex in exs]
    return scaffold.collate(items, "cpu")


def test_weight_zero_is_exactly_the_base(tmp_path, models):
    cfg = make_cfg(tmp_path, models)
    fused, base_tok, scaffold_tok, _ = scaffold.build_fused(cfg, log=lambda *a: None)
    fused.eval()
    X, Y, M, S, SM = batch_of((base_tok, scaffold_tok), ["bcde", "zab"], ["abcd=", "yza="])
    ctx = fused.encode_scaffold(S, SM)
    base_logits, _ = fused.base(X)
    fresh, _ = fused(X, ctx, weight=1.0)
    assert torch.equal(fresh, base_logits)  # zero-initialised output projection: starts exactly at the base
    randomise_fusers(fused)
    for w in (0.0, 0):
        fused_logits, _ = fused(X, ctx, weight=w)
        assert torch.equal(fused_logits, base_logits)
    half, _ = fused(X, ctx, weight=0.5)
    full, _ = fused(X, ctx, weight=1.0)
    assert not torch.allclose(half, base_logits) and not torch.allclose(full, half)
    _, loss0 = fused(X, ctx, Y, M, weight=0.0)
    _, base_loss = fused.base(X, Y, M)
    assert torch.equal(loss0, base_loss)


def test_width_mismatched_scaffold_trains_and_padding_is_masked(tmp_path, models):
    cfg = make_cfg(tmp_path, models)
    fused, base_tok, scaffold_tok, _ = scaffold.build_fused(cfg, log=lambda *a: None)
    assert fused.scaffold.config.n_embd == 48 and fused.base.config.n_embd == 32
    randomise_fusers(fused)
    fused.train()
    X, Y, M, S, SM = batch_of((base_tok, scaffold_tok), ["bcdef", "b"], ["abcde=", "a="])
    assert SM[1].tolist() == [1, 1, 1, 0, 0, 0, 0]  # the short prompt is padded
    _, loss = fused(X, fused.encode_scaffold(S, SM), Y, M)
    loss.backward()
    assert math.isfinite(loss.item())
    for f in fused.fusers.values():
        assert f.c_kv.weight.shape == (64, 48)  # scaffold width 48 -> keys and values of base width 32
        assert f.c_kv.weight.grad.abs().sum() > 0 and f.c_proj.weight.grad.abs().sum() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in fused.scaffold.named_parameters() if "lora_B" in n)
    assert all(p.grad is None for p in fused.base.parameters())
    # padding masked: the padded row gives the same logits as that example alone, without padding
    fused.eval()
    padded, _ = fused(X, fused.encode_scaffold(S, SM))
    X1, _, _, S1, SM1 = batch_of((base_tok, scaffold_tok), ["b"], ["a="])
    alone, _ = fused(X1, fused.encode_scaffold(S1, SM1))
    torch.testing.assert_close(padded[1, :X1.size(1)], alone[0], rtol=1e-5, atol=1e-5)


def test_kv_cache_generation_matches_full_recompute(tmp_path, models):
    cfg = make_cfg(tmp_path, models)
    fused, base_tok, scaffold_tok, _ = scaffold.build_fused(cfg, log=lambda *a: None)
    randomise_fusers(fused)
    fused.eval()
    ex = {"prompt": "abc=", "turns": None, "completion": ""}
    ids, sids = scaffold.prompt_ids(base_tok, ex), scaffold.prompt_ids(scaffold_tok, ex)
    got = scaffold.generate(fused, ids, sids, 10, scaffold_weight=0.7, ngram=0)
    sidx = torch.tensor([sids])
    ctx = fused.encode_scaffold(sidx, torch.ones_like(sidx))
    seq = list(ids)
    with torch.no_grad():
        for _ in range(10):
            logits, _ = fused(torch.tensor([seq]), ctx, weight=0.7)
            seq.append(int(logits[0, -1].argmax()))
    assert got == seq[len(ids):]


def test_repetition_guard_on_crafted_sequences():
    cut = scaffold.cut_repetition
    assert cut([1, 2, 3, 1, 2, 3, 4]) == [1, 2, 3]
    assert cut([9, 1, 2, 3, 1, 2, 3]) == [9, 1, 2, 3]  # the repeat at the very end
    assert cut([7, 7, 7, 7, 7, 7, 7, 7]) == [7, 7, 7]
    assert cut([1, 2, 1, 2, 1, 2]) == [1, 2, 1, 2, 1, 2]  # a repeated 2-gram is not a repeated 3-gram
    assert cut([1, 2, 3, 4, 1, 2, 3]) == [1, 2, 3, 4, 1, 2, 3]  # repeated, but not immediately
    assert cut([1, 2, 3, 1, 2]) == [1, 2, 3, 1, 2]  # the second copy is cut short by the end: no repeat
    assert cut([]) == [] and cut([5]) == [5] and cut([1, 1, 1, 1, 1]) == [1, 1, 1, 1, 1]
    assert cut([4, 5, 6, 1, 2, 3, 1, 2, 3, 1, 2, 3]) == [4, 5, 6, 1, 2, 3]  # the first repeat wins
    assert cut([1, 2, 1, 2, 9], n=2) == [1, 2]


def test_generation_stops_at_the_first_repeat(tmp_path, models):
    """Greedy decoding of a random model loops quickly: the guarded output is the unguarded one cut at its first
    immediately repeated 3-gram, and has none left."""
    cfg = make_cfg(tmp_path, models)
    fused, base_tok, scaffold_tok, _ = scaffold.build_fused(cfg, log=lambda *a: None)
    randomise_fusers(fused)
    fused.eval()
    checked = 0
    for prompt in ("abc=", "zz=", "q=", "hello="):
        ex = {"prompt": prompt, "turns": None, "completion": ""}
        ids, sids = scaffold.prompt_ids(base_tok, ex), scaffold.prompt_ids(scaffold_tok, ex)
        free = scaffold.generate(fused, ids, sids, 24, ngram=0)
        guarded = scaffold.generate(fused, ids, sids, 24)
        assert guarded == scaffold.cut_repetition(free)
        assert scaffold.cut_repetition(guarded) == guarded
        checked += guarded != free
    assert checked >= 1  # at least one generation really was cut


def test_training_keeps_the_base_bit_for_bit_and_the_save_reloads(tmp_path, models):
    cfg = make_cfg(tmp_path, models, num_epochs=2, learning_rate=3e-3, gradient_accumulation_steps=2, batch_size=4)
    logs = []
    summary = scaffold.train(cfg, log=logs.append)
    assert any(line.startswith("frozen base alone: val loss") for line in logs)
    assert any("sample:" in line for line in logs)
    assert summary["steps"] == 2 * math.ceil(43 / 8)  # 48 records, 5 held out; 2 micro-batches of 4 per step
    saved_base = load_checkpoint(os.path.join(models, "base", "ckpt.pt"))["model"]
    trained = summary["model"].base.state_dict()
    assert set(trained) == set(saved_base)
    for k, v in saved_base.items():
        assert torch.equal(trained[k], v), k  # the base the run trained against, after all its steps
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in summary["model"].trainable_state_dict().items()
               if k.endswith("c_proj.weight"))
    fused, base_tok, scaffold_tok, ckpt = scaffold.load_fused("fused", models)
    assert set(ckpt["model"]) == set(fused.trainable_state_dict())
    assert not any(k.startswith("base.") for k in ckpt["model"])
    assert any(k.startswith("scaffold.") and "lora_B" in k for k in ckpt["model"])
    assert summary["val_loss_by_weight"][0.0] == summary["base_val_loss"]  # weight 0 is the base, exactly
    # the reloaded model computes what the trained one did
    X, Y, M, S, SM = batch_of((base_tok, scaffold_tok), ["bcde"], ["abcd="])
    summary["model"].eval()
    assert torch.equal(fused(X, fused.encode_scaffold(S, SM), weight=0.8)[0],
                       summary["model"](X, summary["model"].encode_scaffold(S, SM), weight=0.8)[0])
    text = scaffold.answer(fused, base_tok, scaffold_tok, {"prompt": "abc=", "turns": None, "completion": ""},
                           max_new_tokens=5, scaffold_weight=0.7)
    assert isinstance(text, str) and len(text) <= 5
    # the one checkpoint layout (checkpoint.make_checkpoint) plus the scaffold's keys; no training state in the best
    assert ckpt["format_version"] == 1 and ckpt["iter_num"] == ckpt["step"]
    assert ckpt["best_val_loss"] == ckpt["val_loss"]
    assert ckpt["kind"] == "scaffold" and "scaffold_tokenizer" in ckpt and "optimizer" not in ckpt
    # a scaffold.pt in the layout written before make_checkpoint (no iter_num / best_val_loss) still loads
    legacy = {k: v for k, v in ckpt.items() if k not in ("iter_num", "best_val_loss")}
    atomic_save(legacy, os.path.join(models, "legacy", "scaffold.pt"))
    old, _, _, _ = scaffold.load_fused("legacy", models)
    assert torch.equal(old(X, old.encode_scaffold(S, SM), weight=0.8)[0],
                       fused(X, fused.encode_scaffold(S, SM), weight=0.8)[0])
    # train_fuser false: a run that starts from these fusers trains only the scaffold's adapters
    cfg2 = make_cfg(tmp_path, models, model_name="adapters_only", init_from="fused", train_fuser=False,
                    learning_rate=3e-3, num_samples=0)
    again = scaffold.train(cfg2, log=lambda *a: None)["model"].trainable_state_dict()
    first = ckpt["model"]
    assert all(torch.equal(again[k], first[k]) for k in first if k.startswith("fusers."))
    assert any(not torch.equal(again[k], first[k]) for k in first if k.startswith("scaffold."))


def test_training_step_does_not_touch_the_base(tmp_path, models):
    """The in-memory base after optimizer steps, weight decay included, equals a fresh copy bit for bit."""
    cfg = make_cfg(tmp_path, models, weight_decay=0.5)
    fused, base_tok, scaffold_tok, _ = scaffold.build_fused(cfg, log=lambda *a: None)
    before = {k: v.clone() for k, v in fused.base.state_dict().items()}
    opt = scaffold.make_optimizer(fused, cfg, "cpu")
    X, Y, M, S, SM = batch_of((base_tok, scaffold_tok), ["bcde", "zab"], ["abcd=", "yza="])
    for _ in range(3):
        _, loss = fused(X, fused.encode_scaffold(S, SM), Y, M)
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert all(torch.equal(before[k], v) for k, v in fused.base.state_dict().items())
    assert not torch.equal(fused.fusers["1"].c_proj.weight, torch.zeros_like(fused.fusers["1"].c_proj.weight))


def test_bad_input_errors(tmp_path, models):
    # a cross-attention layer the base does not have
    with pytest.raises(ConfigError, match=r"layer 4 does not exist: base model 'base' has layers 0\.\.3"):
        scaffold.build_fused(make_cfg(tmp_path, models, cross_attn_layers=[1, 4]), log=lambda *a: None)
    with pytest.raises(ConfigError, match="cross_attn_layers"):
        make_cfg(tmp_path, models, cross_attn_layers=[-1])
    # records without prompt or completion: file and line named
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ab=", "completion": "bc"}\n\n{"prompt": "cd="}\n')
    with pytest.raises(DataError, match=rf"{bad}:3: record has no 'completion' string"):
        scaffold.read_examples(str(bad))
    bad.write_text('{"completion": "bc"}\n')
    with pytest.raises(DataError, match=rf"{bad}:1: record has no 'prompt' string"):
        scaffold.read_examples(str(bad))
    bad.write_text('{"prompt": "ab=", "completion": "bc"}\n{"prompt": "ab=", "completion": \n')
    with pytest.raises(DataError, match=rf"{bad}:2: not valid JSON"):
        scaffold.read_examples(str(bad))
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    with pytest.raises(DataError, match=rf"{bad}:1: unusable chat record \(no assistant turn\)"):
        scaffold.read_examples(str(bad))
    # scaffold_weight outside [0, 1]
    cfg = make_cfg(tmp_path, models)
    fused, base_tok, scaffold_tok, _ = scaffold.build_fused(cfg, log=lambda *a: None)
    X, Y, M, S, SM = batch_of((base_tok, scaffold_tok), ["bc"], ["ab="])
    for w in (1.5, -0.1, float("nan")):
        with pytest.raises(ValueError, match=r"scaffold_weight .* is outside \[0, 1\]"):
            fused(X, fused.encode_scaffold(S, SM), weight=w)
        with pytest.raises(ValueError, match=r"is outside \[0, 1\]"):
            scaffold.generate(fused, [0, 1], [0, 1], 3, scaffold_weight=w)
    with pytest.raises(ConfigError, match="influence_weight"):
        make_cfg(tmp_path, models, influence_weight=1.2)
    # config keys: unknown (with the closest name), frozen fusers with nothing to start from
    with pytest.raises(ConfigError, match="unknown scaffold config key 'cross_attn_layer' \\(did you mean 'cross_attn_layers'"):
        make_cfg(tmp_path, models, cross_attn_layer=[1])
    with pytest.raises(ConfigError, match="train_fuser"):
        make_cfg(tmp_path, models, train_fuser=False)


def test_chat_records_mask_only_the_reply(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "ab"}, {"role": "assistant", "content": "bc"}]})
                    + "\n" + json.dumps({"prompt": "ab=", "completion": "bc"}) + "\n")
    chat, plain = scaffold.read_examples(str(path))
    assert chat["turns"] == [("user", "ab")] and chat["completion"] == "bc" and plain["prompt"] == "ab="
    tok = Tokenizer.char_from_texts(["abc="])
    for ex in (chat, plain):
        ids, mask, sids = scaffold.encode_example(ex, tok, tok)
        assert tok.decode([t for t, m in zip(ids, mask) if m]) == "bc<|endoftext|>"
        assert sids == ids[:len(sids)] and len(sids) == mask.index(1)  # the scaffold reads exactly the prompt


def test_every_chat_schema_is_a_chat_record_and_prompt_completion_is_plain(tmp_path):
    """scaffold.py reads chat records through prepare_dataset's table of schemas: ShareGPT and Alpaca records are
    chat like OpenAI's; a prompt/completion pair stays plain text."""
    records = [{"conversations": [{"from": "human", "value": "ab"}, {"from": "gpt", "value": "bc"}]},
               {"instruction": "ab", "output": "bc"},
               {"prompt": "ab=", "completion": "bc"}]
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    sharegpt, alpaca, plain = scaffold.read_examples(str(path))
    assert sharegpt["turns"] == alpaca["turns"] == [("user", "ab")] and sharegpt["completion"] == alpaca["completion"] == "bc"
    assert plain["turns"] is None and plain["prompt"] == "ab="


def test_hf_gpt2_directory_as_scaffold(tmp_path, models):
    make_hf_gpt2(tmp_path / "hf", vocab_size=64, n_positions=32, n_embd=24, n_layer=2, n_head=2)
    assert scaffold.is_hf_dir(str(tmp_path / "hf")) and not scaffold.is_hf_dir(os.path.join(models, "base"))
    cfg = make_cfg(tmp_path, models, scaffold_model=str(tmp_path / "hf"))
    fused, base_tok, scaffold_tok, info = scaffold.build_fused(cfg, log=lambda *a: None)
    assert info["scaffold"]["kind"] == "hf" and fused.scaffold.config.n_embd == 24
    sidx = torch.tensor([[0, 5, 6], [0, 7, 0]])
    ctx = fused.encode_scaffold(sidx, torch.tensor([[1, 1, 1], [1, 1, 0]]))
    assert ctx[1][0].shape == (2, 4, 3, 8)  # (B, nh, Ts, hs) in the base's width


def test_cli_train_generate_evaluate_interactive(tmp_path, models, capsys, monkeypatch):
    cfg_path = tmp_path / "scaffold.json"
    cfg_path.write_text(json.dumps({"base_model": "base", "scaffold_model": "scaf", "out_dir": models,
                                    "model_name": "cli", "cross_attn_layers": [3], "train_file":
                                    write_toy(tmp_path / "toy.jsonl", 24), "batch_size": 8, "num_epochs": 1,
                                    "device": "cpu", "dtype": "float32", "max_new_tokens": 6}))
    scaffold.main(["train", "--config_file", str(cfg_path), "--num_samples", "1"])
    out = capsys.readouterr().out
    assert "frozen base alone: val loss" in out and "val loss by scaffold_weight" in out
    assert os.path.exists(os.path.join(models, "cli", "scaffold.pt"))
    scaffold.main(["evaluate", "--config_file", str(cfg_path), "--scaffold_weight", "1,0"])
    assert "val loss by scaffold_weight: 1:" in capsys.readouterr().out
    # bad input on the command line: one line on stderr, exit status 1
    for argv, expected in ((["generate", "--config_file", str(cfg_path), "--prompt", "abc=", "--scaffold_weight", "1.5"],
                            "error: scaffold_weight '1.5' is outside [0, 1]"),
                           (["train", "--config_file", str(cfg_path), "--cross_attn_layers", "[3, 9]"],
                            "error: cross_attn_layers: layer 9 does not exist")):
        with pytest.raises(SystemExit) as e:
            scaffold.main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 1 and err.startswith(expected) and len(err.strip().splitlines()) == 1
    # the interactive loop: prompts, a bad weight, a good one, exit
    monkeypatch.setattr(sys, "stdin", io.StringIO("abc=\nweight 2\nweight 0\nabc=\nexit\n"))
    scaffold.main(["--config_file", str(cfg_path)])
    captured = capsys.readouterr()
    assert "error: scaffold_weight '2' is outside [0, 1]" in captured.err and "scaffold[0]>" in captured.out
    # the documented command, as a real process
    r = run_cli("scaffold.py", "generate", "--config_file", str(cfg_path), "--prompt", "abc=", "--scaffold_weight", "0.7")
    assert r.returncode == 0 and r.stderr == "", r.stderr


def test_default_lora_targets_adapt_every_linear_of_the_scaffold(tmp_path, models):
    """The original script's targets ["c_attn", "c_proj", "c_fc"] are suffix matches: "c_proj" adapts attn.c_proj
    and mlp.c_proj. The default and the preset therefore adapt all four Linears of every scaffold block."""
    import lora
    assert scaffold.ScaffoldConfig().lora_target == lora.ALL_TARGETS
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "configs", "scaffold.json")) as f:
        assert json.load(f)["lora_target"] == lora.ALL_TARGETS
    fused, _, _, _ = scaffold.build_fused(make_cfg(tmp_path, models), log=lambda *a: None)
    adapted = {n.rsplit(".lora_A", 1)[0] for n, _ in fused.scaffold.named_parameters() if ".lora_A" in n}
    assert adapted == {f"transformer.h.{i}.{name}" for i in range(2)
                       for name in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}


# ---------------------------------------------------------------------------------------------------------------
# the training loop: resume, non-finite steps, signals

def metric_rows(out, name):
    """metrics.jsonl without the wall-clock times: what must be identical between two runs."""
    with open(os.path.join(out, name, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k != "time"} for line in f]


def sigterm_at(step):
    """A log function that sends this process SIGTERM when the line of optimizer step `step` is logged."""
    def log(line):
        if f" step {step}/" in line:
            os.kill(os.getpid(), signal.SIGTERM)
    return log


def test_interrupted_and_resumed_run_equals_a_straight_run(tmp_path, models):
    """Stopped by SIGTERM mid-epoch and again at an epoch's end, resumed twice: per-step losses, val losses, the
    final trainable weights and Adam's state are bit-identical to one uninterrupted run (CPU fp32). Dropout on,
    gradient accumulation, a warmup, evaluations mid-epoch and sampling at temperature > 0 all take part."""
    kw = dict(num_epochs=2, batch_size=4, gradient_accumulation_steps=2, warmup_ratio=0.2, fuser_dropout=0.1,
              lora_dropout=0.1, eval_interval=4, patience=0, temperature=0.8, learning_rate=3e-3)
    straight = scaffold.train(make_cfg(tmp_path, models, model_name="straight", **kw), log=lambda *a: None)
    assert straight["steps"] == 12 and not straight["stopped_by_signal"]  # 43 records, 8 per step: 6 per epoch

    first = scaffold.train(make_cfg(tmp_path, models, model_name="cut", **kw), log=sigterm_at(3))
    assert first["stopped_by_signal"] and first["steps"] == 3 and first["val_loss_by_weight"] is None
    state = load_checkpoint(first["state_path"])
    assert state["iter_num"] == 3 and state["loader"]["epoch"] == 1 and state["loader"]["position"] == 6
    lines = []
    second = scaffold.train(make_cfg(tmp_path, models, model_name="cut", init_from="resume", **kw),
                            log=lambda line: (lines.append(line), sigterm_at(6)(line)))
    assert "resuming cut from step 3 (epoch 1, 6 micro-batches in)" in lines
    assert second["stopped_by_signal"] and second["steps"] == 6  # the epoch's end: evaluated, then saved
    loader = load_checkpoint(second["state_path"])["loader"]
    assert loader["epoch"] == 2 and loader["position"] == 0  # and the order generator moved on to epoch 2's draw:
    assert not torch.equal(loader["order_rng"], state["loader"]["order_rng"])
    third = scaffold.train(make_cfg(tmp_path, models, model_name="cut", init_from="resume", **kw), log=lambda *a: None)
    assert third["steps"] == 12 and third["epochs"] == 2 and not third["stopped_by_signal"]

    assert metric_rows(models, "cut") == metric_rows(models, "straight")  # every step's loss and lr, every val loss
    assert [r["iter"] for r in metric_rows(models, "cut") if "loss" in r] == list(range(1, 13))
    a = load_checkpoint(os.path.join(models, "straight", "scaffold_ckpt.pt"))
    b = load_checkpoint(os.path.join(models, "cut", "scaffold_ckpt.pt"))
    assert a["model"].keys() == b["model"].keys() and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(torch.equal(x, y) for s in a["optimizer"]["state"] for x, y in
               zip(a["optimizer"]["state"][s].values(), b["optimizer"]["state"][s].values()))
    assert third["best_val_loss"] == straight["best_val_loss"] and third["history"] == straight["history"]
    best_a, best_b = straight["model"].trainable_state_dict(), third["model"].trainable_state_dict()
    assert all(torch.equal(best_a[k], best_b[k]) for k in best_a)
    # a finished run resumed: nothing left to train, the same summary
    again = scaffold.train(make_cfg(tmp_path, models, model_name="cut", init_from="resume", **kw), log=lambda *a: None)
    assert again["steps"] == 12 and again["best_val_loss"] == straight["best_val_loss"]
    # what a resume refuses: no saved state; a setting that changes the model or the batches
    with pytest.raises(MissingFileError, match="no training state at .*nothing.*scaffold_ckpt.pt"):
        scaffold.train(make_cfg(tmp_path, models, model_name="nothing", init_from="resume"), log=lambda *a: None)
    with pytest.raises(CheckpointError, match="'batch_size' is 8 now but 4 in the saved run"):
        scaffold.train(make_cfg(tmp_path, models, model_name="cut", init_from="resume", **{**kw, "batch_size": 8}),
                       log=lambda *a: None)


def poison_steps(monkeypatch, bad, snapshots):
    """Make the training loss NaN (and so its gradient) at the given 1-based optimizer steps (one micro-batch per
    step); record the trainable weights as each step starts."""
    forward = scaffold.ScaffoldFusion.forward
    calls = []

    def poisoned(self, idx, context, targets=None, loss_mask=None, **kw):
        logits, loss = forward(self, idx, context, targets, loss_mask, **kw)
        if self.training and loss is not None:
            calls.append(1)
            snapshots.append({k: v.clone() for k, v in self.trainable_state_dict().items()})
            if bad(len(calls)):
                loss = loss * float("nan")
        return logits, loss
    monkeypatch.setattr(scaffold.ScaffoldFusion, "forward", poisoned)


def test_non_finite_steps_are_skipped_and_counted_then_stop_the_run(tmp_path, models, monkeypatch, capsys):
    snapshots, logs = [], []
    poison_steps(monkeypatch, lambda step: step == 3, snapshots)
    summary = scaffold.train(make_cfg(tmp_path, models, num_samples=0), log=logs.append)
    assert "step 3: non-finite loss or gradient (nan); step skipped (1/5)" in logs
    assert summary["steps"] == 6 and math.isfinite(summary["best_val_loss"])  # training went on after the skip
    same = lambda a, b: all(torch.equal(a[k], b[k]) for k in a)  # noqa: E731
    assert same(snapshots[2], snapshots[3])  # step 3 changed nothing: weights (and Adam's state) as they were
    assert not same(snapshots[3], snapshots[4]) and not same(snapshots[1], snapshots[2])
    assert {"iter": 3, "epoch": 1, "skipped": True} in metric_rows(models, "fused")
    # max_bad_steps in a row: a one-line error, the best model and the training state are kept
    snapshots.clear()
    poison_steps(monkeypatch, lambda step: True, snapshots)
    cfg_path = tmp_path / "nan.json"
    cfg_path.write_text(json.dumps(dict(base_model="base", scaffold_model="scaf", out_dir=models, model_name="nan",
                                        cross_attn_layers=[1, 3], train_file=write_toy(tmp_path / "toy.jsonl", 48),
                                        batch_size=8, num_epochs=1, device="cpu", dtype="float32", num_samples=0,
                                        max_bad_steps=3)))
    with pytest.raises(scaffold.ScaffoldError, match=r"3 non-finite steps in a row at step 3 \(epoch 1\): lower lear"):
        scaffold.train(scaffold.load_scaffold_config(str(cfg_path)), log=lambda *a: None)
    with pytest.raises(SystemExit) as e:
        scaffold.main(["train", "--config_file", str(cfg_path)])
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.startswith("error: 3 non-finite steps in a row") and len(err.splitlines()) == 1
    assert not os.path.exists(os.path.join(models, "nan", "scaffold.pt"))  # stopped before any evaluation


def test_sigterm_saves_the_training_state_and_resume_ends_like_a_straight_run(tmp_path, models):
    """A real `scaffold.py train` process sent SIGTERM mid-run finishes its step, saves and exits with status 0;
    `--init_from resume` then ends with the same per-step losses as an uninterrupted run."""
    values = dict(base_model="base", scaffold_model="scaf", out_dir=models, model_name="term", cross_attn_layers=[1, 3],
                  train_file=write_toy(tmp_path / "toy.jsonl", 48), batch_size=8, num_epochs=6, device="cpu",
                  dtype="float32", num_samples=0, log_interval=1, patience=0, fuser_dropout=0.1)
    cfg_path = tmp_path / "term.json"
    cfg_path.write_text(json.dumps(values))
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")  # one thread, as this process
    proc = subprocess.Popen([sys.executable, "scaffold.py", "train", "--config_file", str(cfg_path)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = os.path.join(models, "term", "metrics.jsonl")
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline:  # until the run has taken a few of its 36 steps
        if os.path.exists(metrics) and sum("loss" in row for row in read_metrics(metrics)) >= 3:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0 and stderr == "", stderr
    assert "stopped by signal 15" in stdout and "go on with --init_from resume" in stdout
    state = load_checkpoint(os.path.join(models, "term", "scaffold_ckpt.pt"))
    assert 3 <= state["iter_num"] < 36 and "optimizer" in state
    r = run_cli("scaffold.py", "train", "--config_file", str(cfg_path), "--init_from", "resume",
                env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    assert f"resuming term from step {state['iter_num']}" in r.stdout
    scaffold.train(scaffold.load_scaffold_config(None, {**values, "model_name": "ref"}), log=lambda *a: None)
    assert metric_rows(models, "term") == metric_rows(models, "ref")
