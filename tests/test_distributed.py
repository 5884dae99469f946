"""
Training on 2 CPU processes over gloo, DDP and FSDP, against one process that sees the same global batch.

The reference is honest about what a 2-rank step is: rank r draws its windows from its own BatchLoader (seed +
1000 * r), so the single process is given, at every micro-step, rank 0's batch followed by rank 1's (UnionLoader,
patched in for train.BatchLoader in this process only; evaluation draws the same way). The model init is rank 0's
in both (DDP broadcasts it; FSDP builds it from the same seed). With fp32 and dropout 0 the two runs then compute
the same sums in a different order, so their losses agree to float rounding (1e-5), while a per-rank instead of a
global normalisation of the masked loss would be off by far more (the ranks' mask counts differ; asserted).
"""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp

import train
from checkpoint import load_checkpoint, load_model
from config import load_config
from data import BatchLoader

from conftest import ROOT

WORLD = 2
TOL = 1e-5
SETTINGS = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, batch_size=4, gradient_accumulation_steps=2,
                use_loss_mask=True, dtype="float32", device="cpu", dropout=0.0, max_iters=4, eval_interval=2,
                eval_iters=2, log_interval=1, learning_rate=3e-3, min_lr=3e-4, warmup_iters=0, lr_decay_iters=4,
                grad_clip=1.0, compile=False)  # lr_decay_iters fixed: the 2-iteration run must share the schedule


def overrides(dataset_dir, out_dir, name, **extra):
    return dict(SETTINGS, dataset_dir=dataset_dir, out_dir=out_dir, model_name=name, **extra)


class UnionLoader(BatchLoader):
    """One process's stand-in for WORLD ranks' loaders: each batch is rank 0's batch, then rank 1's, ..."""

    def __init__(self, *args, rank=0, **kwargs):
        assert rank == 0
        self.parts = [BatchLoader(*args, rank=r, **kwargs) for r in range(WORLD)]
        self.data = self.parts[0].data

    def get_batch(self):
        return tuple(torch.cat(ts) for ts in zip(*(p.get_batch() for p in self.parts)))

    def state_dict(self):
        return self.parts[0].state_dict()


def metrics(out_dir, name):
    with open(os.path.join(out_dir, name, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    steps = {r["iter"]: r["loss"] for r in rows if "loss" in r}
    evals = {r["iter"]: (r["train_loss"], r["val_loss"]) for r in rows if "val_loss" in r}
    return steps, evals


def assert_same_run(out_dir, name, ref_dir, ref_name):
    steps, evals = metrics(out_dir, name)
    ref_steps, ref_evals = metrics(ref_dir, ref_name)
    assert sorted(steps) == sorted(ref_steps) == [1, 2, 3, 4]
    assert sorted(evals) == sorted(ref_evals) == [0, 2, 4]
    for it in ref_steps:
        assert abs(steps[it] - ref_steps[it]) < TOL, (it, steps[it], ref_steps[it])
    for it in ref_evals:
        for a, b in zip(evals[it], ref_evals[it]):
            assert abs(a - b) < TOL, (it, evals[it], ref_evals[it])
    assert ref_evals[4][1] < ref_evals[0][1] - 0.05  # the runs really trained: equal because equal, not idle
    ck, ref = load_checkpoint(os.path.join(out_dir, name, "ckpt.pt")), load_checkpoint(os.path.join(ref_dir, ref_name, "ckpt.pt"))
    for k, v in ref["model"].items():
        assert torch.allclose(ck["model"][k], v, atol=TOL, rtol=0), k


@pytest.fixture(scope="module")
def single_process(sample_chat, tmp_path_factory):
    """The reference: one process, every micro-step fed the union of both ranks' batches."""
    out = str(tmp_path_factory.mktemp("single"))
    mp_ = pytest.MonkeyPatch()
    mp_.setattr(train, "BatchLoader", UnionLoader)
    try:
        summary = train.train(load_config(None, overrides(sample_chat, out, "single")), log=lambda *a: None)
    finally:
        mp_.undo()
    assert summary["iter_num"] == 4
    return out, "single"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ddp_worker(rank, port, cfg, report_dir):
    """One rank, as torchrun would start it, recording every file it opens for writing under out_dir."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import builtins
    real_open, writes, logged = builtins.open, [], []

    def spy_open(file, mode="r", *a, **k):
        if any(c in mode for c in "wax") and os.path.abspath(str(file)).startswith(os.path.abspath(cfg["out_dir"])):
            writes.append(os.path.relpath(str(file), cfg["out_dir"]))
        return real_open(file, mode, *a, **k)
    builtins.open = spy_open
    try:
        summary = train.train(load_config(None, cfg), log=logged.append)
    finally:
        builtins.open = real_open
    with open(os.path.join(report_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"writes": writes, "logged": logged, "summary": summary}, f)


def test_ddp_two_ranks_equal_one_process_on_the_union_batch(sample_chat, single_process, tmp_path):
    ref_dir, ref_name = single_process
    out, reports = str(tmp_path / "ckpt"), tmp_path / "reports"
    reports.mkdir()
    cfg = overrides(sample_chat, out, "ddp")
    mp.spawn(ddp_worker, args=(free_port(), cfg, str(reports)), nprocs=WORLD, join=True)
    assert_same_run(out, "ddp", ref_dir, ref_name)

    # rank 0 alone writes (checkpoints, metrics, config) and logs; rank 1 opens nothing for writing
    r0, r1 = (json.loads((reports / f"rank{r}.json").read_text()) for r in range(WORLD))
    assert r1["writes"] == [] and r1["logged"] == []
    assert any(w.startswith(os.path.join("ddp", "ckpt.pt")) for w in r0["writes"])
    assert any(w.startswith(os.path.join("ddp", "best.pt")) for w in r0["writes"])
    assert os.path.join("ddp", "metrics.jsonl") in r0["writes"]
    assert sum("step 4: train loss" in line for line in r0["logged"]) == 1
    assert sorted(os.listdir(os.path.join(out, "ddp"))) == ["best.pt", "ckpt.pt", "config.json", "loss.png",
                                                            "metrics.jsonl", "tokenizer_state.json"]
    # both ranks report the same (globally reduced) losses
    assert r0["summary"]["val_loss"] == pytest.approx(r1["summary"]["val_loss"], abs=1e-7)
    assert r0["summary"]["last_step_loss"] == pytest.approx(r1["summary"]["last_step_loss"], abs=1e-7)
    # the checkpoint holds every rank's loader state (an exact resume on 2 ranks needs both)
    ck = load_checkpoint(os.path.join(out, "ddp", "ckpt.pt"))
    assert len(ck["loader"]) == WORLD and ck["loader"][0] != ck["loader"][1]


def test_the_ranks_mask_counts_differ_so_the_normalisation_is_tested(sample_chat):
    """The equality above proves the masked loss is normalised globally only if the ranks' batches hold different
    numbers of mask-1 targets (else a per-rank mean would give the same result)."""
    args = dict(batch_size=SETTINGS["batch_size"], block_size=SETTINGS["block_size"], use_mask=True, seed=1337)
    counts = [float(BatchLoader(sample_chat, "train", rank=r, **args).get_batch()[2].sum()) for r in range(WORLD)]
    assert counts[0] != counts[1]
    assert abs(counts[0] - counts[1]) / max(counts) > 0.02


def torchrun(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}", "train.py", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)


def cli(settings):
    return [a for k, v in settings.items() for a in (f"--{k}", str(v).lower() if isinstance(v, bool) else str(v))]


def test_fsdp_two_ranks_equal_one_process_and_resume_exactly(sample_chat, single_process, tmp_path):
    """fsdp: true through the real launcher: 2 iterations, then --init_from resume to 4, matches the single
    process's 4 straight iterations; the checkpoint is an ordinary full one (loads without FSDP)."""
    ref_dir, ref_name = single_process
    out = str(tmp_path / "ckpt")
    first = torchrun(*cli(overrides(sample_chat, out, "fsdp", fsdp=True, max_iters=2)))
    assert first.returncode == 0, first.stderr[-2000:]
    assert first.stdout.count("step 2: train loss") == 1  # rank 0 logs, once
    second = torchrun(*cli(overrides(sample_chat, out, "fsdp", fsdp=True, init_from="resume")))
    assert second.returncode == 0, second.stderr[-2000:]
    assert "resuming fsdp from iteration 2" in second.stdout
    assert_same_run(out, "fsdp", ref_dir, ref_name)

    ck = load_checkpoint(os.path.join(out, "fsdp", "ckpt.pt"))
    assert all(isinstance(k, int) for k in ck["optimizer"]["state"])  # torch's usual numbering, not FSDP names
    model, _, _ = load_model("fsdp", out_dir=out)  # plain, unsharded, strict load (tied lm_head included)
    assert model.lm_head.weight is model.transformer.wte.weight
    assert not any(".tmp" in f for f in os.listdir(os.path.join(out, "fsdp")))


def test_activation_checkpointing_under_ddp_and_fsdp_equals_one_process_without(sample_chat, single_process, tmp_path):
    """activation_checkpointing: true on 2 ranks, DDP (spawned as torchrun would) and FSDP (through the real
    launcher; each block is its own FSDP unit, so its weights are gathered again for the recompute): the same
    losses, evaluations and weights as the single process without checkpointing."""
    ref_dir, ref_name = single_process
    out, reports = str(tmp_path / "ckpt"), tmp_path / "reports"
    reports.mkdir()
    cfg = overrides(sample_chat, out, "ddp_ac", activation_checkpointing=True)
    mp.spawn(ddp_worker, args=(free_port(), cfg, str(reports)), nprocs=WORLD, join=True)
    assert_same_run(out, "ddp_ac", ref_dir, ref_name)
    assert any("activation checkpointing" in line for line in json.loads((reports / "rank0.json").read_text())["logged"])
    r = torchrun(*cli(overrides(sample_chat, out, "fsdp_ac", fsdp=True, activation_checkpointing=True)))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "activation checkpointing" in r.stdout
    assert_same_run(out, "fsdp_ac", ref_dir, ref_name)
