"""activation_checkpointing: each block recomputed in backward computes the same loss and the same gradient of every
parameter as the plain model (fp32): with dropout (the recompute replays the same masks), LoRA (a frozen base, so
the first block's input needs no grad), packed rows (a document mask shared by the layers), torch.compile, and
through train.py (its CLI, XGBLoRA across a merge; DDP and FSDP are in test_distributed.py). It is off in
evaluation and generation, and never stored as architecture (checkpoints' model_args). On CPU, train.py's malloc
setting for it hands large freed blocks back to the kernel. Memory and speed are measured in bench.py (act_ckpt)."""

import json
import sys

import pytest
import torch

import lora
from conftest import run_cli
from model import GPT, GPTConfig, KVCache
from runtime import forward_backward

TOL = 1e-6  # fp32; in practice the two agree to the last bit or two


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.one_thread: tiny shapes


def tiny(dropout=0.0, **kw):
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=32, vocab_size=97, n_layer=3, n_head=4, n_embd=32, bias=True, dropout=dropout, **kw))


def batch(B=4, T=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    x, y = (torch.randint(0, 97, (B, T), generator=g) for _ in range(2))
    m = (torch.rand(B, T, generator=g) < 0.6).long()
    return x, y, m


class Recomputes:
    """Counts the forward calls of the model's blocks: with checkpointing a training step runs each twice."""

    def __init__(self, model):
        self.calls = 0
        for block in model.transformer.h:
            block.register_forward_pre_hook(lambda *a: setattr(self, "calls", self.calls + 1))


def step(model, batches, use_mask=True, seed=123):
    """One training step's loss and every trainable parameter's gradient (by name). The RNG is seeded first, so
    two models draw the same dropout masks."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = forward_backward(model, batches, use_mask)
    return loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_same_step(plain, ckpt, batches, use_mask=True):
    ckpt.set_activation_checkpointing(True)
    counter = Recomputes(ckpt)
    loss, grads = step(plain, batches, use_mask)
    loss_ck, grads_ck = step(ckpt, batches, use_mask)
    assert counter.calls == 2 * len(ckpt.transformer.h) * len(batches)  # it really recomputed every block
    assert abs(loss - loss_ck) <= TOL * max(1.0, abs(loss))
    assert grads.keys() == grads_ck.keys() and grads
    for name, g in grads.items():
        assert torch.count_nonzero(g) > 0, name  # a test of something: every compared gradient is live
        torch.testing.assert_close(grads_ck[name], g, atol=TOL, rtol=TOL, msg=name)


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_same_loss_and_gradients_as_without(dropout):
    """With dropout the recompute must draw the masks the forward drew (checkpoint restores the RNG state), else
    the gradients would belong to another forward; two micro-steps (gradient accumulation) too."""
    assert_same_step(tiny(dropout).train(), tiny(dropout).train(), [batch(seed=1), batch(seed=2)])


def test_dropout_masks_differ_between_steps_as_without():
    """Restoring the RNG for the recompute must not rewind it for the next step: the next forward's dropout draws
    new masks, exactly as the plain model's does."""
    plain, ckpt = tiny(0.2).train(), tiny(0.2).train().set_activation_checkpointing(True)
    b = [batch()]
    torch.manual_seed(7)
    losses = [forward_backward(plain, b, True) for _ in range(2)]
    torch.manual_seed(7)
    losses_ck = [forward_backward(ckpt, b, True) for _ in range(2)]
    assert losses[0] != losses[1]  # same weights, same batch: only the masks differ
    assert losses == pytest.approx(losses_ck, abs=TOL)


@pytest.mark.parametrize("targets", [["q", "v"], "all"])
def test_lora_frozen_base(targets):
    """LoRA freezes every base weight, embeddings included: the first block's input does not require grad, which a
    reentrant checkpoint would silently leave without any gradient. Only the adapters (and their dropout) train."""
    models = []
    for _ in range(2):
        m = tiny(0.1)
        lora.apply_lora(m, rank=4, alpha=8.0, dropout=0.1, targets=targets)
        with torch.no_grad():  # trained-looking adapters: B = 0 would leave A's gradient zero
            for layer in lora.lora_layers(m):
                for A, B, _, _ in layer.adapters():
                    B.normal_(0, 0.05, generator=torch.Generator().manual_seed(B.numel()))
        models.append(m.train())
    assert not models[0].transformer.wte.weight.requires_grad
    assert_same_step(*models, [batch()])


def test_packed_rows():
    """Packed rows (position and document ids): the document mask built once per forward is reused by every
    block's recompute."""
    x, y, m = batch(B=2, T=32)
    doc_ids = torch.tensor([[0] * 10 + [1] * 14 + [2] * 8, [0] * 20 + [1] * 9 + [2] * 3])  # (B, T)
    starts = torch.cat([torch.ones(2, 1, dtype=torch.bool), doc_ids[:, 1:] != doc_ids[:, :-1]], dim=1)
    pos = torch.arange(32)[None].expand(2, 32)
    first = torch.where(starts, pos, torch.zeros_like(pos)).cummax(dim=1).values  # each token's document start
    assert_same_step(tiny(0.1).train(), tiny(0.1).train(), [(x, y, m, pos - first, doc_ids)])


def test_off_in_evaluation_generation_and_without_grad():
    """Nothing to recompute when no backward follows: eval mode, no_grad, and the KV cache (generation), where a
    recompute would write the cache twice. The outputs equal the plain model's."""
    plain, ckpt = tiny().eval(), tiny().eval().set_activation_checkpointing(True)
    counter = Recomputes(ckpt)
    x = batch()[0]
    torch.testing.assert_close(ckpt(x)[0], plain(x)[0], atol=0, rtol=0)
    prompt = x[:2, :5]
    assert torch.equal(ckpt.generate(prompt, 8, temperature=0), plain.generate(prompt, 8, temperature=0))
    ckpt.train()
    with torch.no_grad():
        ckpt(x)
    cache = KVCache(3, 2, 4, 32, 8)
    ckpt(prompt, kv_cache=cache)  # training mode, grad on, but with a cache: plain forward
    assert counter.calls == 3 * (1 + 8 + 1 + 1)  # 11 forwards, every block once in each: no recompute anywhere
    assert "activation_checkpointing" not in vars(ckpt.config)  # not architecture: model_args stay as they were


def test_compiled_model_same_loss_and_gradients():
    """torch.compile (inductor, as train.py's compile: true) traces the checkpointed blocks and gives the plain eager
    model's loss and gradients. About 35 s on one CPU thread, most of it compiling."""
    eager = tiny().train()
    compiled_raw = tiny().train().set_activation_checkpointing(True)
    b = [batch()]
    loss, grads = step(eager, b)
    compiled_raw.zero_grad(set_to_none=True)
    loss_c = forward_backward(torch.compile(compiled_raw), b, True)
    assert abs(loss - loss_c) < 1e-5
    for n, p in compiled_raw.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], atol=1e-5, rtol=1e-5, msg=n)


# ---------------------------------------------------------------------------------------------------------------
# through train.py

SMALL = ["--n_layer", "2", "--n_head", "2", "--n_embd", "32", "--block_size", "32", "--batch_size", "4",
         "--eval_iters", "2", "--log_interval", "1", "--warmup_iters", "2", "--learning_rate", "3e-3",
         "--min_lr", "3e-4", "--dtype", "float32", "--device", "cpu", "--compile", "false"]


def cli_losses(tmp_path, name, dataset, *extra):
    out = tmp_path / "ckpt"
    r = run_cli("train.py", *SMALL, "--dataset_dir", dataset, "--out_dir", str(out), "--model_name", name, *extra,
                env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert ("activation checkpointing: each block" in r.stdout) == ("--activation_checkpointing" in extra)
    with open(out / name / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    with open(out / name / "config.json") as f:
        assert json.load(f)["activation_checkpointing"] == ("--activation_checkpointing" in extra)
    steps = [(row["iter"], row["loss"]) for row in rows if "loss" in row]
    return steps, [row["val_loss"] for row in rows if "val_loss" in row], r


def assert_same_losses(a, b, tol=1e-5):
    assert [i for i, _ in a] == [i for i, _ in b] and a
    for (i, x), (_, y) in zip(a, b):
        assert abs(x - y) < tol, (i, x, y)


def test_train_cli_same_losses_with_and_without(tmp_path, shakespeare_char):
    """A real run through train.py's command line (dropout on, gradient accumulation): every step's loss and every
    evaluation equal a run without checkpointing."""
    common = ["--max_iters", "6", "--eval_interval", "3", "--dropout", "0.1", "--gradient_accumulation_steps", "2"]
    plain, plain_val, _ = cli_losses(tmp_path, "plain", shakespeare_char, *common)
    ckpt, ckpt_val, _ = cli_losses(tmp_path, "ckpt", shakespeare_char, *common, "--activation_checkpointing", "true")
    assert len(plain) == 6
    assert_same_losses(plain, ckpt)
    assert ckpt_val == pytest.approx(plain_val, abs=1e-5)


def test_xgblora_across_a_merge(tmp_path, sample_chat):
    """XGBLoRA rebuilds the adapted layers at every merge: checkpointing (a model attribute) stays on for the new
    boosters, and the losses before and after the merges equal a run without it."""
    common = ["--finetuning_type", "xgblora", "--xgblora_steps_per_iteration", "2", "--max_iters", "6",
              "--eval_interval", "6", "--use_loss_mask", "true", "--lora_dropout", "0.1"]
    plain, _, _ = cli_losses(tmp_path, "plain", sample_chat, *common)
    ckpt, _, r = cli_losses(tmp_path, "ckpt", sample_chat, *common, "--activation_checkpointing", "true")
    assert r.stdout.count("XGBLoRA merge") == 3
    assert_same_losses(plain, ckpt)



MALLOC_CHECK = """
import sys, torch, runtime
def rss_mb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))
runtime.keep_freed_memory(map_large_blocks=sys.argv[1] == "true")
before = rss_mb()
t = torch.ones(64 * 2 ** 20 // 4)  # 64 MB of fp32, touched: resident
grown = rss_mb() - before
del t
print(grown, rss_mb() - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt (Linux) only")
def test_train_py_cpu_malloc_setting_with_checkpointing_hands_large_blocks_back():
    """train.py's CPU malloc setting with activation_checkpointing (runtime.keep_freed_memory(map_large_blocks=True)):
    a freed large block goes back to the kernel at once, so the recompute's temporaries never pile up in a
    fragmented heap; without checkpointing it stays with the process for the next step. A fresh process each: this
    one's heap may hold freed blocks already."""
    for large_apart in (True, False):
        r = run_cli("-c", MALLOC_CHECK, str(large_apart).lower(), env={"OMP_NUM_THREADS": "1"})
        assert r.returncode == 0, r.stderr[-2000:]
        grown, kept = map(float, r.stdout.split())
        assert grown > 60, grown
        assert (kept < 10) if large_apart else (kept > 60), (large_apart, kept)
