"""The training loop end to end: prepare -> train -> loss falls -> sample; exact resume; two-phase training;
configuration and data errors."""

import json
import os

import numpy as np
import pytest

from config import ConfigError, load_config
from conftest import SAMPLE_CHAT, run_cli
from data import BatchLoader, DataError
from train import TrainError, train

SMALL = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, batch_size=4, eval_iters=2, log_interval=1,
             warmup_iters=2, learning_rate=3e-3, min_lr=3e-4)


def run(tmp_path, dataset, **overrides):
    cfg = load_config(None, {**SMALL, "out_dir": str(tmp_path / "ckpt"), "dataset_dir": dataset, **overrides})
    lines = []
    summary = train(cfg, log=lines.append)
    return summary, lines


def step_losses(tmp_path, name):
    with open(tmp_path / "ckpt" / name / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    return [(r["iter"], r["loss"]) for r in rows if "loss" in r]


def test_end_to_end_chat_prepare_train_sample(tmp_path):
    subset = tmp_path / "chat.jsonl"
    with open(SAMPLE_CHAT) as f:
        subset.write_text("".join(f.readlines()[:600]))
    data = tmp_path / "data"
    r = run_cli("prepare_dataset.py", "--format", "chat", "--input_files", str(subset), "--out_dir", str(data),
                "--tokenization", "char")
    assert r.returncode == 0, r.stderr
    out = tmp_path / "ckpt"
    r = run_cli("train.py", "--config_file", "configs/quickstart_sft.json", "--dataset_dir", str(data), "--out_dir", str(out),
                "--model_name", "e2e", "--n_layer", "2", "--n_embd", "64", "--n_head", "2", "--max_iters", "60",
                "--eval_interval", "30", "--eval_iters", "4", "--batch_size", "8", "--log_interval", "10")
    assert r.returncode == 0, r.stderr
    evals = [line for line in r.stdout.splitlines() if line.startswith("step ")]
    first = float(evals[0].split("val loss ")[1])
    last = float(evals[-1].split("val loss ")[1])
    assert last < 0.75 * first, evals
    assert "tok/s" in r.stdout and "ETA" in r.stdout
    for fname in ("ckpt.pt", "best.pt", "config.json", "tokenizer_state.json", "metrics.jsonl"):
        assert (out / "e2e" / fname).exists(), fname
    r = run_cli("sample.py", "--out_dir", str(out), "--prompt", "Say hello to Ada.", "--max_new_tokens", "40")
    assert r.returncode == 0, r.stderr
    assert "the model trained last" in r.stderr and r.stdout.strip()


def test_resume_is_exact(tmp_path, shakespeare_char):
    common = dict(max_iters=16, lr_decay_iters=16, eval_interval=8, dropout=0.1, seed=7)
    run(tmp_path, shakespeare_char, model_name="straight", **common)
    run(tmp_path, shakespeare_char, model_name="halves", **{**common, "max_iters": 8})
    summary, lines = run(tmp_path, shakespeare_char, model_name="halves", init_from="resume", **common)
    assert any("resuming halves from iteration 8" in line for line in lines)
    straight, halves = step_losses(tmp_path, "straight"), step_losses(tmp_path, "halves")
    assert len(straight) == 16 and straight == halves  # bit-identical, every step


def test_same_seed_gives_bit_identical_losses(tmp_path, shakespeare_char):
    run(tmp_path, shakespeare_char, model_name="a", max_iters=6, eval_interval=6)
    run(tmp_path, shakespeare_char, model_name="b", max_iters=6, eval_interval=6)
    assert step_losses(tmp_path, "a") == step_losses(tmp_path, "b")


def test_two_phase_pretrain_then_sft_keeps_architecture(tmp_path, sample_chat):
    run(tmp_path, sample_chat, model_name="base", max_iters=4, eval_interval=4)
    summary, lines = run(tmp_path, sample_chat, model_name="chat", init_from_model="base", max_iters=4,
                         eval_interval=4, n_layer=6, n_embd=384, n_head=6, dropout=0.1, use_loss_mask=True,
                         batch_size=2, block_size=16)
    text = "\n".join(lines)
    assert "n_layer: config says 6, kept the base model's 2" in text
    assert "dropout: 0.0 -> 0.1 in every layer" in text
    assert "block_size: cropped the base's 32 to 16" in text
    assert summary["iter_num"] == 4


def test_fine_tune_block_size_larger_than_base_is_refused(tmp_path, sample_chat):
    run(tmp_path, sample_chat, model_name="base", max_iters=1, eval_interval=1)
    with pytest.raises(RuntimeError, match="block_size 64 is larger than the base model's 32"):
        run(tmp_path, sample_chat, model_name="ft", init_from_model="base", block_size=64)


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="unknown config key 'learning_rat'.*did you mean 'learning_rate'"):
        load_config(None, {"learning_rat": "1e-3"})
    with pytest.raises(ConfigError, match="'batch_size' must be int, got 'many'"):
        load_config(None, {"batch_size": "many"})
    with pytest.raises(ConfigError, match="'learning_rate' = 0.0 is out of range: must be > 0"):
        load_config(None, {"learning_rate": "0"})
    with pytest.raises(ConfigError, match="'dropout' = 1.0 is out of range"):
        load_config(None, {"dropout": 1.0})
    with pytest.raises(ConfigError, match="'bos_scaling_factor'.*must lie in \\[0, 1\\]"):
        load_config(None, {"bos_scaling_factor": "1.5"})
    with pytest.raises(ConfigError, match="'bias' must be true or false"):
        load_config(None, {"bias": "maybe"})


def test_config_file_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"n_layer": 2,\n "dropout": }')
    with pytest.raises(ConfigError, match="bad.json:2: not valid JSON"):
        load_config(str(bad))
    wrong = tmp_path / "wrong.json"
    wrong.write_text('{"n_layer": "two"}')
    with pytest.raises(ConfigError, match="wrong.json: 'n_layer' must be int"):
        load_config(str(wrong))
    r = run_cli("train.py", "--config_file", str(wrong))
    assert r.returncode == 1 and r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1


def test_cli_unknown_key_is_one_line_error():
    r = run_cli("train.py", "--config_file", "configs/tiny.json", "--max_iter", "5")
    assert r.returncode == 1
    assert r.stderr.strip() == "error: command line: unknown config key 'max_iter' (did you mean 'max_iters'?)"


def test_missing_dataset_dir_is_clear(tmp_path):
    r = run_cli("train.py", "--config_file", "configs/tiny.json", "--dataset_dir", str(tmp_path / "nope"),
                "--out_dir", str(tmp_path / "ck"))
    assert r.returncode == 1 and "dataset folder not found" in r.stderr
    assert not (tmp_path / "ck").exists()  # nothing half-written


def test_cpu_compile_without_a_cpp_compiler_is_a_one_line_error(tmp_path, shakespeare_char, monkeypatch):
    """torch.compile's CPU kernels are C++ built by the system's compiler: without one, train.py says so before
    the first step (not an inductor traceback from inside it), and writes nothing."""
    from torch._inductor import config as inductor_config
    monkeypatch.setattr(inductor_config.cpp, "cxx", (None, str(tmp_path / "no-such-g++")))
    with pytest.raises(TrainError, match="compile: true on the CPU needs a C\\+\\+ compiler .*no-such-g\\+\\+.*"
                                          "pass --compile false"):
        run(tmp_path, shakespeare_char, compile=True, max_iters=1, device="cpu")
    assert not (tmp_path / "ckpt").exists()


def test_shard_size_disagreeing_with_metadata(tmp_path, shakespeare_char):
    import shutil
    data = tmp_path / "data"
    shutil.copytree(shakespeare_char, data)
    shard = data / "train" / "shard_00000.bin"
    with open(shard, "ab") as f:
        f.write(b"\x00")
    with pytest.raises(DataError, match="shard_00000.bin: .* bytes, but dataset_metadata.json says"):
        BatchLoader(str(data), "train", 2, 8)


def test_use_loss_mask_without_masks_lists_expected_files(tmp_path, shakespeare_char):
    with pytest.raises(DataError, match="use_loss_mask is on but .* has no mask shards \\(expected .*shard_00000_mask.bin"):
        run(tmp_path, shakespeare_char, use_loss_mask=True, max_iters=1)


def test_mask_shard_length_mismatch_names_both_files(tmp_path, sample_chat):
    import shutil
    data = tmp_path / "data"
    shutil.copytree(sample_chat, data)
    with open(data / "train" / "shard_00000_mask.bin", "ab") as f:
        f.write(b"\x01")
    with pytest.raises(DataError, match="shard_00000_mask.bin: .* mask bytes but .*shard_00000.bin holds"):
        BatchLoader(str(data), "train", 2, 8, use_mask=True)


def test_token_id_beyond_vocab_is_refused(tmp_path, shakespeare_char):
    import shutil
    data = tmp_path / "data"
    shutil.copytree(shakespeare_char, data)
    meta = json.loads((data / "dataset_metadata.json").read_text())
    arr = np.memmap(data / "train" / "shard_00000.bin", dtype=meta["token_dtype"], mode="r+")
    arr[:] = 60000
    arr.flush()
    loader = BatchLoader(str(data), "train", 2, 8)
    with pytest.raises(DataError, match="token id 60000 >= vocab_size"):
        loader.get_batch()


def test_mask_aligns_with_targets(sample_chat):
    """M[i] is the mask of target Y[i] = tok[i+1]: the first assistant character after the marker is a target
    with mask 1, and every mask-1 target sits inside an assistant turn."""
    loader = BatchLoader(sample_chat, "train", 8, 64, use_mask=True)
    meta = json.loads(open(os.path.join(sample_chat, "dataset_metadata.json")).read())
    toks = np.fromfile(os.path.join(sample_chat, "train", "shard_00000.bin"), dtype=meta["token_dtype"])
    mask = np.fromfile(os.path.join(sample_chat, "train", "shard_00000_mask.bin"), dtype=np.uint8)
    x, y, m = loader.get_batch()
    windows = np.lib.stride_tricks.sliding_window_view(toks, 64)
    for row in range(8):
        # find the window in the shard and check the alignment against the raw arrays
        start = int(np.flatnonzero((windows == x[row].numpy()).all(axis=1))[0])
        assert np.array_equal(y[row].numpy(), toks[start + 1:start + 65])
        assert np.array_equal(m[row].numpy(), mask[start + 1:start + 65])


def test_a_train_split_without_any_target_is_refused_at_start(tmp_path):
    """--mask_role tool on conversations without tool turns: every mask is 0. Training used to run on, logging loss
    0.0000 and saving 0.0 as the best val loss; now it stops before the first step with one line naming the data."""
    subset = tmp_path / "chat.jsonl"
    with open(SAMPLE_CHAT) as f:
        subset.write_text("".join(f.readlines()[:100]))
    data = tmp_path / "data"
    r = run_cli("prepare_dataset.py", "--format", "chat", "--input_files", str(subset), "--out_dir", str(data),
                "--tokenization", "char", "--mask_role", "tool")
    assert r.returncode == 0, r.stderr
    assert json.loads((data / "dataset_metadata.json").read_text())["mask_fraction"] == 0.0
    r = run_cli("train.py", "--config_file", "configs/tiny_sft.json", "--dataset_dir", str(data), "--out_dir",
                str(tmp_path / "ckpt"), "--max_iters", "2")
    assert r.returncode == 1
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and str(data) in err[0] and "hold no 1" in err[0] and "--mask_role" in err[0], err
    assert not (tmp_path / "ckpt").exists() or not any((tmp_path / "ckpt").iterdir())


def test_an_evaluation_without_targets_is_reported_as_such_and_never_best(tmp_path, sample_chat):
    """A val split whose masks are all 0: its loss is "n/a" in the log, null in metrics.jsonl, and no best.pt."""
    import shutil
    data = tmp_path / "data"
    shutil.copytree(sample_chat, data)
    for mask in (data / "val").glob("*_mask.bin"):
        mask.write_bytes(bytes(mask.stat().st_size))
    summary, lines = run(tmp_path, str(data), model_name="novaltarget", use_loss_mask=True, max_iters=4,
                         eval_interval=2)
    evals = [line for line in lines if line.startswith("step ")]
    assert len(evals) == 3 and all("val loss n/a (no target token" in line for line in evals), evals
    assert all(float(line.split("train loss ")[1].split(",")[0]) > 0 for line in evals)
    rows = [json.loads(line) for line in open(tmp_path / "ckpt" / "novaltarget" / "metrics.jsonl")]
    assert [r["val_loss"] for r in rows if "val_loss" in r] == [None, None, None]
    assert not (tmp_path / "ckpt" / "novaltarget" / "best.pt").exists()
    assert summary["val_loss"] is None and summary["best_val_loss"] == float("inf")


def test_sample_interval_prints_and_records_samples(tmp_path, shakespeare_char):
    """sample_interval N: a short sample every N iterations (and one at the end), in the log and metrics.jsonl;
    drawing it leaves the run's random state alone, so the losses equal a run without samples."""
    _, lines = run(tmp_path, shakespeare_char, model_name="sampled", max_iters=6, eval_interval=6, dropout=0.1,
                   sample_interval=2)
    samples = [line for line in lines if line.startswith("sample at iteration")]
    assert [s.split(":")[0] for s in samples] == [f"sample at iteration {i}" for i in (2, 4, 6)]
    rows = [json.loads(line) for line in open(tmp_path / "ckpt" / "sampled" / "metrics.jsonl")]
    recorded = [(r["iter"], r["sample"]) for r in rows if "sample" in r]
    assert [i for i, _ in recorded] == [2, 4, 6] and all(len(t) > 0 for _, t in recorded)
    assert all(repr(t) in line for (_, t), line in zip(recorded, samples))
    run(tmp_path, shakespeare_char, model_name="plain", max_iters=6, eval_interval=6, dropout=0.1)
    assert step_losses(tmp_path, "sampled") == step_losses(tmp_path, "plain")
