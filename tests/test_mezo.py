"""MeZO (mezo.py): one step equals the formula computed independently, the perturbation is undone bit for bit,
it trains (full, LoRA, masked loss, BOS zero) through train.py, and bad settings are clear errors."""

import copy
import json

import pytest
import torch

import lora
import mezo
from config import ConfigError, load_config
from conftest import run_cli
from model import GPT, GPTConfig
from train import train


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.one_thread: tiny shapes


def tiny_model(seed=0, dropout=0.1, bias=True):
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=16, vocab_size=40, n_layer=2, n_head=2, n_embd=16, dropout=dropout, bias=bias))


def tiny_batch(seed=1, masked=True):
    g = torch.Generator().manual_seed(seed)
    X = torch.randint(0, 40, (3, 16), generator=g)
    Y = torch.randint(0, 40, (3, 16), generator=g)
    M = (torch.rand(3, 16, generator=g) < 0.4).long()
    return (X, Y, M) if masked else (X, Y)


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_bit_identical(model, before):
    for k, v in model.state_dict().items():
        assert torch.equal(v.view(torch.int32), before[k].view(torch.int32)), k  # bits: -0.0 vs 0.0, NaN payloads


def reference_step(model, batch, lr, eps, weight_decay, seed, chunk, use_loss_mask, autocast=False):
    """The issue's formula written out on copies, independently of mezo.py: z drawn per parameter in order from one
    generator seeded with `seed` (in `chunk`-sized draws, as mezo documents), p+ = p + eps z, p- = p+ - 2 eps z,
    g = (L(p+) - L(p-)) / (2 eps), p' = p - lr (g z + wd p) with wd only on dim >= 2."""
    ref = copy.deepcopy(model).eval()
    params = [p for p in ref.parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(seed)
    zs = []
    for p in params:
        n = p.numel()
        zs.append(torch.cat([torch.randn(min(chunk, n - s), generator=gen) for s in range(0, n, chunk)]).view_as(p))
    originals = [p.detach().clone() for p in params]

    def loss_at(values):  # each forward in an autocast region of its own (when asked): fresh bf16 weight copies
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            for p, v in zip(params, values):
                p.copy_(v)
            M = batch[2] if use_loss_mask else None
            _, s = ref(batch[0], batch[1], M, loss_reduction="sum")
            return s.item() / (M.sum().item() if M is not None else batch[1].numel())

    plus = [p0 + eps * z for p0, z in zip(originals, zs)]
    minus = [pp - 2 * eps * z for pp, z in zip(plus, zs)]
    loss_plus, loss_minus = loss_at(plus), loss_at(minus)
    g = (loss_plus - loss_minus) / (2 * eps)
    new = [p0 - lr * (g * z + (weight_decay if p0.dim() >= 2 else 0.0) * p0) for p0, z in zip(originals, zs)]
    return new, 0.5 * (loss_plus + loss_minus), g


@pytest.mark.parametrize("use_loss_mask,chunk", [(True, 1 << 20), (False, 100)])
def test_one_step_equals_independent_reference(monkeypatch, use_loss_mask, chunk):
    monkeypatch.setattr(mezo, "CHUNK", chunk)  # 100: every matrix is drawn in several chunks
    model = tiny_model()
    model.train()  # zo_step must switch to eval itself (dropout 0.1 here) and switch back
    batch = tiny_batch(masked=use_loss_mask)
    new, ref_loss, g = reference_step(model, batch, lr=0.05, eps=1e-3, weight_decay=0.1, seed=1234, chunk=chunk,
                                      use_loss_mask=use_loss_mask)
    assert abs(g) > 0.01  # a real step, not a no-op
    loss = mezo.zo_step(model, batch, lr=0.05, eps=1e-3, weight_decay=0.1, seed=1234, use_loss_mask=use_loss_mask)
    assert model.training
    assert loss == ref_loss
    params = mezo.trainable_parameters(model)
    assert len(params) == len(new)
    for p, want in zip(params, new):
        assert torch.equal(p.detach(), want)  # bit for bit: same perturbed points, same losses, same update
    # the reference decays only dim >= 2 tensors: bit-equality covers "no decay on biases and norms" too
    assert any(p.dim() < 2 for p in params) and any(p.dim() >= 2 for p in params)


def test_step_inside_one_autocast_region_sees_each_perturbation():
    """train.py runs the whole MeZO step inside one bf16 autocast region, whose cache of bf16 weight copies would
    hide the in-place perturbations from the second forward (loss- computed with the +eps weights)."""
    model, batch = tiny_model(), tiny_batch()
    model.eval()  # (so the forward after the step has no dropout either)
    new, ref_loss, g = reference_step(model, batch, lr=0.05, eps=1e-2, weight_decay=0.0, seed=5, chunk=mezo.CHUNK,
                                      use_loss_mask=True, autocast=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = mezo.zo_step(model, batch, lr=0.05, eps=1e-2, weight_decay=0.0, seed=5, use_loss_mask=True)
        after, _ = model(batch[0], batch[1])  # the caller's next forward, same region: sees the updated weights
    assert loss == ref_loss
    for p, want in zip(mezo.trainable_parameters(model), new):
        assert torch.equal(p.detach(), want)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(after, model(batch[0], batch[1])[0])


@pytest.mark.parametrize("eps", [1e-3, 1e-1, 30.0])
def test_restore_is_bit_for_bit(monkeypatch, eps):
    monkeypatch.setattr(mezo, "CHUNK", 64)
    model = tiny_model(bias=True)
    with torch.no_grad():  # awkward values: zeros, -0.0, subnormals, tiny, huge, both signs
        w = model.transformer.h[0].attn.c_attn.weight.view(-1)
        w[:6] = torch.tensor([0.0, -0.0, 1e-42, -1e-30, 3e4, -7.5])
    before = snapshot(model)
    params = mezo.trainable_parameters(model)

    # the naive inverse arithmetic is NOT exact: that is why mezo records corrections
    naive = [p.detach().clone() for p in params]
    gen = torch.Generator().manual_seed(9)
    off_by_rounding = 0
    for p0 in naive:
        n = p0.numel()
        z = torch.cat([torch.randn(min(64, n - s), generator=gen) for s in range(0, n, 64)]).view_as(p0)
        off_by_rounding += int(((p0 + z * eps - z * eps * 2 + z * eps) != p0).sum())
    assert off_by_rounding > 0

    record = mezo.perturb_first(params, 9, eps)
    first = [p.detach().clone() for p in params]
    mezo.perturb_second(params, 9, eps)
    assert not any(torch.equal(a, p) for a, p in zip(first, params) if p.numel() > 1)  # it really moved
    mezo.restore_and_update(params, 9, eps, record)
    assert_bit_identical(model, before)
    if eps == 30.0:
        assert sum(t.numel() for t in record[1].values()) > 0  # the saved-original path was exercised
    # and the whole step with lr 0
    mezo.zo_step(model, tiny_batch(), lr=0.0, eps=eps, weight_decay=0.1, seed=3, use_loss_mask=True)
    assert_bit_identical(model, before)


def test_failing_forward_leaves_weights_untouched():
    model = tiny_model()
    before = snapshot(model)
    X, Y, M = tiny_batch()
    X[0, 0] = 999  # out of the vocabulary: the embedding raises inside the first forward
    with pytest.raises(IndexError):
        mezo.zo_step(model, (X, Y, M), lr=0.1, eps=1e-3, seed=0, use_loss_mask=True)
    assert_bit_identical(model, before)


def test_lowers_the_loss_and_touches_only_lora_adapters():
    torch.manual_seed(0)
    batch = tiny_batch(masked=True)
    model = tiny_model(dropout=0.0)
    first = [mezo.zo_step(model, batch, lr=3e-3, eps=1e-3, seed=s, use_loss_mask=True) for s in range(120)]
    assert sum(first[-20:]) / 20 < sum(first[:20]) / 20 - 0.15, (first[:5], first[-5:])  # measured: 3.65 -> 3.32

    model = tiny_model(dropout=0.0)
    lora.apply_lora(model, rank=2, alpha=4.0, targets="all")
    base = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    adapters = {k: v.clone() for k, v in lora.lora_state_dict(model).items()}
    losses = [mezo.zo_step(model, batch, lr=3e-2, eps=1e-3, seed=s, use_loss_mask=True) for s in range(120)]
    assert sum(losses[-20:]) / 20 < sum(losses[:20]) / 20 - 0.03  # measured: 3.71 -> 3.63
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in base.items())  # the frozen base, bit for bit
    assert all(not torch.equal(state[k], v) for k, v in adapters.items())


def test_train_zo_with_masked_loss_bos_and_resume(tmp_path, sample_chat):
    """trainer zo through train.py on chat data, fine-tuning a briefly pretrained base: masked loss, BOS zero,
    the masked val loss falls, and a resumed run takes exactly the same steps."""
    small = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, batch_size=8, eval_iters=4, log_interval=1,
                 dataset_dir=sample_chat, out_dir=str(tmp_path / "ckpt"))
    train(load_config(None, {**small, "model_name": "base", "max_iters": 40, "eval_interval": 40,
                             "learning_rate": 1e-2}), log=lambda *a: None)
    common = dict(small, init_from_model="base", trainer="zo", zo_eps=1e-3, learning_rate=1e-3, min_lr=1e-4,
                  warmup_iters=0, use_loss_mask=True, use_bos_zero_training=True, dropout=0.1, max_iters=100,
                  lr_decay_iters=100, eval_interval=25)
    lines = []
    summary = train(load_config(None, {**common, "model_name": "zo"}), log=lines.append)
    evals = [float(line.split("val loss ")[1]) for line in lines if line.startswith("step ")]
    assert len(evals) == 5 and evals[-1] < evals[0], evals  # MeZO moves slowly: measured 3.6126 -> 3.6086
    train(load_config(None, {**common, "model_name": "halves", "max_iters": 50}), log=lambda *a: None)
    train(load_config(None, {**common, "model_name": "halves", "init_from": "resume"}), log=lambda *a: None)

    def losses(name):
        with open(tmp_path / "ckpt" / name / "metrics.jsonl") as f:
            return [(r["iter"], r["loss"]) for r in map(json.loads, f) if "loss" in r]
    assert len(losses("zo")) == 100 and losses("zo") == losses("halves")  # seed per iteration: resume is exact
    assert summary["iter_num"] == 100


@pytest.mark.parametrize("overrides,key", [
    ({"trainer": "zo", "zo_eps": 0}, "zo_eps"),
    ({"trainer": "zo", "zo_eps": -1e-3}, "zo_eps"),
    ({"trainer": "zo", "gradient_accumulation_steps": 2}, "gradient_accumulation_steps"),
    ({"trainer": "sgd"}, "trainer"),
])
def test_bad_settings_are_clear_errors(overrides, key):
    with pytest.raises(ConfigError, match=key):
        load_config(None, overrides)


def test_cli_bad_eps_is_one_line_error():
    r = run_cli("train.py", "--trainer", "zo", "--zo_eps", "0")
    assert r.returncode == 1
    assert r.stderr.startswith("error: ") and "zo_eps" in r.stderr and len(r.stderr.strip().splitlines()) == 1
