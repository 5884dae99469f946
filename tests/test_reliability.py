"""Crash safety, signals, non-finite steps, safe checkpoint loading, and the bad-input battery of the CLIs."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from checkpoint import CheckpointError, load_checkpoint
from conftest import ROOT, run_cli
from runtime import read_metrics

TINY = ["--n_layer", "2", "--n_head", "2", "--n_embd", "32", "--block_size", "32", "--batch_size", "4",
        "--eval_iters", "2", "--log_interval", "1", "--warmup_iters", "5", "--seed", "3"]


def train_cmd(data, out, name, *extra):
    return [sys.executable, "train.py", "--config_file", "configs/tiny.json", "--dataset_dir", data, "--out_dir", out,
            "--model_name", name, *TINY, *extra]


def losses(out, name):
    rows = []
    with open(os.path.join(out, name, "metrics.jsonl")) as f:
        for line in f:
            rows.append(json.loads(line))
    return [(r["iter"], r["loss"]) for r in rows if "loss" in r], [(r["iter"], r["val_loss"]) for r in rows if "val_loss" in r]


def wait_for_progress(proc, metrics, timeout=120):
    """Wait until a training process has logged a new step (startup time varies a lot on a busy machine)."""
    start = os.path.getsize(metrics) if os.path.exists(metrics) else 0
    deadline = time.time() + timeout
    while proc.poll() is None and time.time() < deadline:
        if os.path.exists(metrics) and os.path.getsize(metrics) > start + 100:
            return
        time.sleep(0.05)


def last_iter(metrics):
    """The last training step a metrics log records (-1 before the first)."""
    if not os.path.exists(metrics):
        return -1
    return max((r["iter"] for r in read_metrics(metrics) if "loss" in r), default=-1)  # skips a torn last line


def wait_for_iter(proc, metrics, target, timeout=120):
    """Wait until a training process has logged step `target`: the kill point is counted in steps, not seconds,
    so a fast machine cannot finish the run before it is killed."""
    deadline = time.time() + timeout
    while proc.poll() is None and time.time() < deadline and last_iter(metrics) < target:
        time.sleep(0.01)


def test_sigkill_at_random_points_then_resume_ends_like_an_uninterrupted_run(tmp_path, shakespeare_char):
    out = str(tmp_path / "ck")
    run = ["--max_iters", "150", "--lr_decay_iters", "150", "--eval_interval", "50", "--checkpoint_interval", "1"]
    ref = subprocess.run(train_cmd(shakespeare_char, out, "ref", *run), cwd=ROOT, capture_output=True, text=True)
    assert ref.returncode == 0, ref.stderr
    rng = random.Random(0)
    kills = 0
    for attempt in range(5):  # checkpoint every step: many kills land inside a save
        resume = os.path.exists(os.path.join(out, "crash", "ckpt.pt"))
        proc = subprocess.Popen(train_cmd(shakespeare_char, out, "crash", *run, "--init_from",
                                          "resume" if resume else "scratch"),
                                cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        metrics = os.path.join(out, "crash", "metrics.jsonl")
        wait_for_iter(proc, metrics, last_iter(metrics) + rng.randint(3, 20))  # at most 5 x 20 of the 150 steps
        time.sleep(rng.uniform(0.0, 0.05))  # then kill at a random point: mid-step, mid-save, mid-log
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
        if os.path.exists(os.path.join(out, "crash", "ckpt.pt")):
            load_checkpoint(os.path.join(out, "crash", "ckpt.pt"))  # always loadable after a kill
    assert kills >= 3
    final = subprocess.run(train_cmd(shakespeare_char, out, "crash", *run, "--init_from", "resume"), cwd=ROOT,
                           capture_output=True, text=True)
    assert final.returncode == 0, final.stderr
    ref_steps, ref_evals = losses(out, "ref")
    crash_steps, crash_evals = losses(out, "crash")
    assert crash_steps == ref_steps and crash_evals == ref_evals  # bit-identical, final loss included
    assert load_checkpoint(os.path.join(out, "crash", "ckpt.pt"))["iter_num"] == 150
    assert not [f for f in os.listdir(os.path.join(out, "crash")) if ".tmp" in f]


def test_sigterm_finishes_the_step_saves_and_exits_cleanly(tmp_path, shakespeare_char):
    out = str(tmp_path / "ck")
    proc = subprocess.Popen(train_cmd(shakespeare_char, out, "term", "--max_iters", "100000", "--eval_interval", "0"),
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_progress(proc, os.path.join(out, "term", "metrics.jsonl"))
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    assert "stopped by signal" in stdout
    ckpt = load_checkpoint(os.path.join(out, "term", "ckpt.pt"))
    assert ckpt["iter_num"] > 0
    again = subprocess.run(train_cmd(shakespeare_char, out, "term", "--max_iters", str(ckpt["iter_num"] + 3),
                                     "--eval_interval", "0", "--init_from", "resume"), cwd=ROOT, capture_output=True, text=True)
    assert again.returncode == 0 and f"resuming term from iteration {ckpt['iter_num']}" in again.stdout


def test_non_finite_steps_are_skipped_then_training_stops_keeping_the_checkpoint(tmp_path, shakespeare_char):
    out = str(tmp_path / "ck")
    r = subprocess.run(train_cmd(shakespeare_char, out, "nan", "--max_iters", "50", "--eval_interval", "0",
                                 "--checkpoint_interval", "1", "--learning_rate", "1e30", "--min_lr", "0",
                                 "--warmup_iters", "0", "--grad_clip", "0", "--max_bad_steps", "3"),
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 1
    assert "step skipped (1/3)" in r.stdout and "step skipped (3/3)" in r.stdout
    assert r.stderr.startswith("error: 3 non-finite steps in a row") and "learning rate" in r.stderr
    ckpt = load_checkpoint(os.path.join(out, "nan", "ckpt.pt"))
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())  # the last good state, not a NaN one


def test_checkpoint_crafted_to_run_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))
    folder = tmp_path / "ck" / "evil"
    folder.mkdir(parents=True)
    torch.save({"model": Exploit(), "model_args": {}}, folder / "ckpt.pt")
    with pytest.raises(CheckpointError, match="refused to load"):
        load_checkpoint(str(folder / "ckpt.pt"))
    r = run_cli("sample.py", "--out_dir", str(tmp_path / "ck"), "--model_name", "evil")
    assert r.returncode == 1 and "refused to load" in r.stderr
    assert not marker.exists()


def _trained(tmp_path, data, name="m"):
    out = str(tmp_path / "ck")
    r = subprocess.run(train_cmd(data, out, name, "--max_iters", "2", "--eval_interval", "2"), cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return out


def test_truncated_and_foreign_checkpoints(tmp_path, shakespeare_char):
    out = _trained(tmp_path, shakespeare_char)
    path = os.path.join(out, "m", "ckpt.pt")
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    r = run_cli("sample.py", "--out_dir", out, "--model_name", "m")
    assert r.returncode == 1 and "not a readable checkpoint" in r.stderr
    torch.save({"weights": torch.zeros(3)}, path)
    r = run_cli("sample.py", "--out_dir", out, "--model_name", "m")
    assert r.returncode == 1 and "not a checkpoint of this project" in r.stderr


def test_resuming_with_a_different_architecture_is_refused(tmp_path, shakespeare_char):
    out = _trained(tmp_path, shakespeare_char)
    r = subprocess.run(train_cmd(shakespeare_char, out, "m", "--init_from", "resume", "--n_layer", "3"), cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 1
    assert "resuming with a different setting: 'n_layer' is 3 now but 2 in the checkpoint" in r.stderr


def test_resume_without_checkpoint(tmp_path, shakespeare_char):
    r = subprocess.run(train_cmd(shakespeare_char, str(tmp_path / "ck"), "ghost", "--init_from", "resume"), cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 1 and "no checkpoint at" in r.stderr


def test_prompt_longer_than_context_is_cropped_with_notice(tmp_path, shakespeare_char):
    out = _trained(tmp_path, shakespeare_char)
    r = run_cli("sample.py", "--out_dir", out, "--model_name", "m", "--prompt", "To be or not to be " * 10,
                "--max_new_tokens", "5")
    assert r.returncode == 0, r.stderr
    assert "cropped to the last 31" in r.stderr


def test_sample_with_no_trained_model(tmp_path):
    r = run_cli("sample.py", "--out_dir", str(tmp_path / "empty"))
    assert r.returncode == 1 and "no trained model" in r.stderr and "train.py" in r.stderr
    r = run_cli("sample.py", "--out_dir", str(tmp_path / "empty"), "--model_name", "nope")
    assert r.returncode == 1 and "no checkpoint for model 'nope'" in r.stderr


def test_bad_bos_factor_on_the_command_line(tmp_path, shakespeare_char):
    r = subprocess.run(train_cmd(shakespeare_char, str(tmp_path / "ck"), "b", "--use_bos_zero_training", "true",
                                 "--bos_scaling_factor", "-0.5"), cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 1 and "bos_scaling_factor" in r.stderr and "[0, 1]" in r.stderr


def test_checkpoint_format_version_is_checked_on_load(tmp_path):
    """Every writer goes through checkpoint.make_checkpoint, which stamps the format; a file of a newer format is
    refused with one line, and a file from before the version was written (none) loads as format 1."""
    from checkpoint import CKPT_FORMAT, atomic_save, make_checkpoint
    ck = make_checkpoint({"w": torch.zeros(2)}, {"n_layer": 1}, {}, {"kind": "char"}, iter_num=3)
    assert ck["format_version"] == CKPT_FORMAT and ck["iter_num"] == 3 and ck["lora"] is None
    path = str(tmp_path / "ckpt.pt")
    atomic_save({**ck, "format_version": CKPT_FORMAT + 1}, path)
    with pytest.raises(CheckpointError, match=f"format {CKPT_FORMAT + 1} is newer than this code reads"):
        load_checkpoint(path)
    atomic_save({k: v for k, v in ck.items() if k != "format_version"}, path)
    assert load_checkpoint(path)["iter_num"] == 3
