"""lora.py against peft on a converted tiny GPT-2: same adapters, same logits; merge / unmerge / remove; q/k/v
slices; frozen base under training; parameter counts; checkpoint replay."""

import copy
import re

import pytest
import torch
from torch.nn import functional as F

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from transformers import GPT2LMHeadModel  # noqa: E402

from hf import load_hf_gpt2  # noqa: E402
import lora  # noqa: E402
from conftest import make_hf_gpt2  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers 5 deprecations inside peft
transformers.logging.set_verbosity_error()

V, C, L, R, ALPHA = 1000, 32, 2, 4, 8.0


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(HF model, its directory): a random tiny GPT-2 with non-trivial biases and LayerNorms."""
    d = make_hf_gpt2(tmp_path_factory.mktemp("hf"), vocab_size=V, n_positions=64, n_embd=C, n_layer=L, n_head=2)
    return GPT2LMHeadModel.from_pretrained(d).eval(), d


def converted(pair):
    return load_hf_gpt2(pair[1])[0].eval()


def logits(model, idx):
    with torch.no_grad():
        out = model(idx)
    return (out.logits if hasattr(out, "logits") else out[0])[..., :V]


def idx_batch(seed=0):
    return torch.randint(0, V, (2, 24), generator=torch.Generator().manual_seed(seed))


# peft names HF modules by path; "attn.c_proj" / "mlp.c_proj" match as name suffixes, so the two c_proj stay apart
PEFT_TARGETS = ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]


def peft_and_ours(pair):
    """peft LoRA and lora.py on the same four layers of the same model, with the same random A and non-zero B."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    pm = get_peft_model(copy.deepcopy(pair[0]), LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0,
                                                           target_modules=PEFT_TARGETS, fan_in_fan_out=True)).eval()
    ours = converted(pair)
    names = lora.apply_lora(ours, rank=R, alpha=ALPHA, dropout=0.0, targets="all")
    assert names == [f"h.{i}.{t}" for i in range(L) for t in PEFT_TARGETS]
    peft_params = dict(pm.named_parameters())
    with torch.no_grad():
        for name in names:
            p = f"base_model.model.transformer.{name}"
            B = peft_params[f"{p}.lora_B.default.weight"]
            B.normal_(0, 0.1)  # B starts at zero in both: make the adapters do something
            module = ours.get_submodule(f"transformer.{name}")
            # peft's lora_A / lora_B are nn.Linear(in, r) / nn.Linear(r, out) even on a Conv1D: weights (r, in)
            # and (out, r), our layout; fan_in_fan_out only transposes the merged delta
            module.lora_A.copy_(peft_params[f"{p}.lora_A.default.weight"])
            module.lora_B.copy_(B)
    return pm, ours


def test_matches_peft_and_merge_unmerge(pair):
    pm, ours = peft_and_ours(pair)
    idx = idx_batch()
    base = logits(pair[0], idx)
    ref = logits(pm, idx)
    assert (ref - base).abs().max().item() > 1e-2  # the adapters change the output
    assert (logits(ours, idx) - ref).abs().max().item() <= 1e-5

    weights = {k: v.clone() for k, v in ours.state_dict().items()}
    lora.merge_lora(ours)
    assert all(m.merged for m in lora.lora_layers(ours))
    assert (logits(ours, idx) - ref).abs().max().item() <= 1e-5
    merged_peft = pm.merge_and_unload()  # peft's merge, Conv1D transposes included
    assert (logits(merged_peft, idx) - ref).abs().max().item() <= 1e-5
    lora.merge_lora(ours)  # a second merge is a no-op, not a double merge
    assert (logits(ours, idx) - ref).abs().max().item() <= 1e-5

    lora.unmerge_lora(ours)
    for k, v in ours.state_dict().items():
        torch.testing.assert_close(v, weights[k], rtol=0, atol=1e-6)
    assert (logits(ours, idx) - ref).abs().max().item() <= 1e-5


def test_remove_lora_leaves_a_plain_gpt(pair):
    _, ours = peft_and_ours(pair)
    idx = idx_batch(1)
    with_adapters = logits(ours, idx)
    lora.remove_lora(ours)
    assert not lora.lora_layers(ours)
    assert all(type(m) is torch.nn.Linear for m in ours.modules() if isinstance(m, torch.nn.Linear))
    plain = GPT(GPTConfig(**vars(ours.config)))
    assert set(ours.state_dict()) == set(plain.state_dict())
    plain.load_state_dict(ours.state_dict(), strict=True)
    assert (logits(plain.eval(), idx) - with_adapters).abs().max().item() <= 1e-5
    assert not lora.lora_state_dict(ours)
    assert all(p.requires_grad for p in ours.parameters())  # a plain GPT again: a full fine-tune trains it all


def test_qv_slices_equal_manual_computation(pair):
    model = converted(pair)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    w = model.transformer.h[1].attn.c_attn.weight
    names = lora.apply_lora(model, rank=R, alpha=ALPHA, dropout=0.0, targets=["q", "v"], layers=[1])
    assert names == ["h.1.attn.c_attn"]
    m = model.transformer.h[1].attn.c_attn
    assert isinstance(m, lora.LoRALinear) and isinstance(m, torch.nn.Linear)
    assert not isinstance(model.transformer.h[0].attn.c_attn, lora.LoRALinear)
    assert m.weight is w  # the base's own tensor, shared, not copied
    keys = set(lora.lora_state_dict(model))
    assert keys == {f"transformer.h.1.attn.c_attn.{n}" for n in ("lora_A_q", "lora_B_q", "lora_A_v", "lora_B_v")}
    assert set(model.state_dict()) == set(base_state) | keys  # the base keeps its keys
    assert m.lora_A_q.shape == (R, C) and m.lora_B_q.shape == (C, R)
    torch.manual_seed(3)
    with torch.no_grad():
        m.lora_B_q.normal_(0, 0.1)
        m.lora_B_v.normal_(0, 0.1)

    x = torch.randn(2, 5, C)
    s = ALPHA / R
    expected = F.linear(x, m.weight, m.bias)  # (2, 5, 3C)
    expected[..., :C] += s * x @ m.lora_A_q.T @ m.lora_B_q.T
    expected[..., 2 * C:] += s * x @ m.lora_A_v.T @ m.lora_B_v.T
    with torch.no_grad():
        got = m(x)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
        torch.testing.assert_close(got[..., C:2 * C], F.linear(x, m.weight, m.bias)[..., C:2 * C], rtol=0, atol=0)
        m.merge()  # merging touches only the q and v rows
        torch.testing.assert_close(m(x), expected, rtol=0, atol=1e-5)
        w0 = base_state["transformer.h.1.attn.c_attn.weight"]
        assert torch.equal(m.weight[C:2 * C], w0[C:2 * C]) and not torch.equal(m.weight[:C], w0[:C])


def test_bad_targets_and_layers_are_clear_errors(pair):
    model = converted(pair)
    with pytest.raises(ValueError, match=r"unknown lora target 'c_proj'.*ambiguous.*valid targets are q, k, v, c_attn"):
        lora.apply_lora(model, rank=R, alpha=ALPHA, dropout=0.0, targets=["c_proj"])
    with pytest.raises(ValueError, match=r"unknown lora target 'query': valid targets are"):
        lora.apply_lora(model, rank=R, alpha=ALPHA, dropout=0.0, targets="q,query")
    with pytest.raises(ValueError, match=r"both c_attn and q/k/v"):
        lora.apply_lora(model, rank=R, alpha=ALPHA, dropout=0.0, targets=["c_attn", "k"])
    with pytest.raises(ValueError, match=r"lora layer 5 does not exist: the model has layers 0..1"):
        lora.apply_lora(model, rank=R, alpha=ALPHA, dropout=0.0, targets="all", layers=[0, 5])
    assert not lora.lora_layers(model)  # nothing was half-applied
    lora.apply_lora(model, rank=R, alpha=ALPHA, dropout=0.0, targets=["c_fc"], layers=[1])
    with pytest.raises(ValueError, match=r"h.1.mlp.c_fc already has LoRA adapters: call remove_lora"):
        lora.apply_lora(model, rank=R, alpha=ALPHA, dropout=0.0, targets=["c_fc"])
    assert type(model.transformer.h[0].mlp.c_fc) is torch.nn.Linear  # layer 0 was not adapted on the way


def test_training_lora_only_leaves_base_bit_for_bit(pair):
    model = converted(pair)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    lora.apply_lora(model, rank=R, alpha=ALPHA, dropout=0.0, targets=["q", "v", "mlp.c_proj"])
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(re.search(r"\.lora_[AB](_[qv])?$", n) for n in trainable)
    opt = model.configure_optimizers(weight_decay=0.1, learning_rate=1e-2, betas=(0.9, 0.99), device_type="cpu")
    model.train()
    x = idx_batch(2)
    losses = []
    for _ in range(5):
        _, loss = model(x[:, :-1], targets=x[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    state = model.state_dict()
    for k, v in base.items():
        assert torch.equal(state[k], v), f"{k} changed"
    assert any(state[k].abs().sum() > 0 for k in lora.lora_state_dict(model) if ".lora_B" in k)


def test_count_parameters_and_summary(pair):
    model = converted(pair)
    total_base = model.get_num_params()
    assert lora.count_parameters(model) == (total_base, total_base)
    lora.apply_lora(model, rank=R, alpha=ALPHA, dropout=0.0, targets="all")
    # r * (in + out) per adapted Linear: c_attn C->3C, attn.c_proj C->C, c_fc C->4C, mlp.c_proj 4C->C
    per_layer = R * ((C + 3 * C) + (C + C) + (C + 4 * C) + (4 * C + C))
    trainable, total = lora.count_parameters(model)
    assert (trainable, total) == (L * per_layer, total_base + L * per_layer)
    assert lora.parameter_summary(model) == (f"trainable params: {trainable:,} of {total:,} "
                                             f"({100 * trainable / total:.2f}%)")
    assert sum(v.numel() for v in lora.lora_state_dict(model).values()) == trainable


def test_reinit_after_merge_keeps_the_function(pair):
    """XGBLoRA's step: fold the booster into the base, start a fresh one; the model computes the same."""
    _, model = peft_and_ours(pair)
    idx = idx_batch(4)
    before = logits(model, idx)
    lora.merge_lora(model)
    lora.reinit_lora(model)
    for m in lora.lora_layers(model):
        assert not m.merged and not m.lora_B.any() and m.lora_A.abs().sum() > 0  # fresh adapters, live
    assert (logits(model, idx) - before).abs().max().item() <= 1e-5
    # the fresh adapters train: they get gradients (a still-"merged" layer would skip them and get none)
    model.train()
    _, loss = model(idx[:, :-1], targets=idx[:, 1:])
    loss.backward()
    assert all(m.lora_B.grad is not None and m.lora_B.grad.abs().sum() > 0 for m in lora.lora_layers(model))


def test_dropout_only_in_training_mode(pair):
    model = converted(pair)
    lora.apply_lora(model, rank=R, alpha=ALPHA, dropout=0.5, targets=["c_fc"])
    m = model.transformer.h[0].mlp.c_fc
    with torch.no_grad():
        m.lora_B.normal_(0, 0.1)
    x = torch.randn(3, 4, C)
    m.eval()
    a, b = m(x), m(x)
    assert torch.equal(a, b)
    m.train()
    assert not torch.equal(m(x), a)


def test_checkpoint_replays_the_lora_kwargs(pair, tmp_path):
    import checkpoint

    model = converted(pair)
    kwargs = {"rank": R, "alpha": ALPHA, "dropout": 0.0, "targets": ["k", "attn.c_proj"], "layers": [0]}
    lora.apply_lora(model, **kwargs)
    with torch.no_grad():
        for k, p in model.named_parameters():
            if "lora_B" in k:
                p.normal_(0, 0.1)
    ckpt = {"model": model.state_dict(), "model_args": vars(model.config).copy(), "lora": kwargs, "base": None}
    checkpoint.atomic_save(ckpt, str(tmp_path / "ckpt.pt"))
    rebuilt = checkpoint.build_model(checkpoint.load_checkpoint(str(tmp_path / "ckpt.pt"))).eval()
    idx = idx_batch(5)
    assert torch.equal(logits(rebuilt, idx), logits(model, idx))
    assert set(lora.lora_state_dict(rebuilt)) == set(lora.lora_state_dict(model))
