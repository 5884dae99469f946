"""The model: KV-cache decoding equals full recompute, masked loss, gradient accumulation, sampling options."""

import math

import pytest
import torch

from model import GPT, GPTConfig, KVCache, cross_entropy_loss, sample_next
from runtime import forward_backward


def tiny(bias=False, **kw):
    torch.manual_seed(0)
    cfg = GPTConfig(block_size=48, vocab_size=97, n_layer=3, n_head=4, n_embd=32, bias=bias, **kw)
    return GPT(cfg).eval()


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("new_tokens", [1, 7, 30])
def test_kv_cache_greedy_equals_full_recompute(bias, new_tokens):
    model = tiny(bias)
    prompt = torch.randint(0, 97, (3, 9), generator=torch.Generator().manual_seed(1))  # batch > 1
    with_cache = model.generate(prompt, new_tokens, temperature=0)
    recompute = model.generate(prompt, new_tokens, temperature=0, use_kv_cache=False)
    assert with_cache.shape == (3, 9 + new_tokens)
    assert torch.equal(with_cache, recompute)


def test_kv_cache_logits_equal_full_forward_including_chunked_prefill():
    model = tiny(True)
    idx = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(2))
    full, _ = model(idx)
    cache = KVCache(3, 2, 4, 48, 8)
    a, _ = model(idx[:, :8], kv_cache=cache)  # prefill
    b, _ = model(idx[:, 8:13], kv_cache=cache)  # a chunk after a cached prefix (masked SDPA path)
    steps = [model(idx[:, t:t + 1], kv_cache=cache)[0] for t in range(13, 20)]  # one token at a time
    inc = torch.cat([a, b] + steps, dim=1)
    assert cache.pos == 20
    torch.testing.assert_close(inc, full, atol=1e-5, rtol=1e-5)


def test_explicit_attention_path_matches_sdpa_and_returns_weights():
    model = tiny()
    idx = torch.randint(0, 97, (2, 16))
    fused, _ = model(idx)  # on CPU at 16 tokens also written out (see below); on GPU the fused kernel
    maps = []
    explicit, _ = model(idx, attn_out=maps)
    torch.testing.assert_close(explicit, fused, atol=1e-5, rtol=1e-5)
    assert len(maps) == 3 and maps[0].shape == (2, 4, 16, 16)
    torch.testing.assert_close(maps[0].sum(-1), torch.ones(2, 4, 16))
    assert torch.all(maps[1].triu(diagonal=1) == 0)  # causal: no weight on the future


def sdpa_reference(attn, x):
    """What one attention layer computes through PyTorch's fused kernel, written from its weights."""
    B, T, C = x.shape
    q, k, v = (t.view(B, T, attn.n_head, C // attn.n_head).transpose(1, 2) for t in attn.c_attn(x).split(C, dim=2))
    y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
    return attn.c_proj(y.transpose(1, 2).reshape(B, T, C))


@pytest.mark.parametrize("T", [16, 256, 300])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_short_sequences_written_out_equal_the_fused_kernel(T, dtype):
    """On CPU, sequences up to 256 tokens (512 in bf16) take the written-out attention (faster there); longer ones
    the fused kernel. Either way: the fused kernel's output and gradients."""
    torch.manual_seed(0)
    attn = tiny().transformer.h[0].attn.to(dtype)
    x = torch.randn(2, T, 32, dtype=dtype, requires_grad=True)
    ref_x = x.detach().clone().requires_grad_()
    out, ref = attn(x), sdpa_reference(attn, ref_x)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(out, ref, **tol)
    g = torch.randn_like(out)
    out.backward(g)
    ref.backward(g)
    torch.testing.assert_close(x.grad, ref_x.grad, **tol)


def test_loss_from_the_counted_rows_equals_the_full_logits_loss():
    """loss_only computes the output layer only where the target counts (mask 1, target not -1): the same loss and
    gradients as the whole (B, T, V) logits, in training (ChunkedCrossEntropy) and without grad (evaluation)."""
    g = torch.Generator().manual_seed(5)
    x = torch.randint(0, 97, (4, 24), generator=g)
    y = torch.randint(0, 97, (4, 24), generator=g)
    y[1, :5] = -1  # ignored targets (padding of packed rows)
    m = (torch.rand(4, 24, generator=g) < 0.2).long()
    model = tiny().double().train()
    logits, _ = model(x)  # (B, T, V): all of them, in double (cross_entropy_loss computes in fp32)
    weight = (m * (y != -1)).reshape(-1).double()
    ce = torch.nn.functional.cross_entropy(logits.view(-1, 97), y.reshape(-1), ignore_index=-1, reduction="none")
    full = (ce * weight).sum() / weight.sum()
    full.backward()
    full_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    _, rows = model(x, y, m, loss_only=True)
    rows.backward()
    # to fp32's precision: both losses take the log-softmax in fp32, whatever the model's dtype
    assert abs(rows.item() - full.item()) < 1e-6
    for p, gf in zip(model.parameters(), full_grads):
        torch.testing.assert_close(p.grad, gf, atol=1e-7, rtol=1e-4)
    with torch.no_grad():
        _, summed = model(x, y, m, loss_reduction="sum", loss_only=True)
    assert abs(summed.item() - full.item() * weight.sum().item()) < 1e-5  # evaluation's path: the loss in fp32


def test_activation_function_is_checked_and_changes_the_mlp():
    with pytest.raises(ValueError, match="activation_function 'relu': must be one of gelu_new, gelu"):
        tiny(activation_function="relu")
    x = torch.linspace(-3, 3, 32).repeat(1, 4, 1)  # (1, 4, 32)
    tanh_mlp, exact_mlp = tiny().transformer.h[0].mlp, tiny(activation_function="gelu").transformer.h[0].mlp
    torch.testing.assert_close(exact_mlp.gelu(x), torch.nn.functional.gelu(x))
    assert (tanh_mlp.gelu(x) - exact_mlp.gelu(x)).abs().max() > 1e-4


def test_generation_stops_at_stop_token_and_seed_is_reproducible():
    model = tiny()
    prompt = torch.zeros(2, 3, dtype=torch.long)
    kw = dict(temperature=1.0, top_k=20, top_p=0.9)
    a = model.generate(prompt, 20, generator=torch.Generator().manual_seed(5), **kw)
    b = model.generate(prompt, 20, generator=torch.Generator().manual_seed(5), **kw)
    assert torch.equal(a, b)
    first = model.generate(prompt, 1, temperature=0)[0, -1].item()
    out = model.generate(prompt[:1], 20, temperature=0, stop_tokens=[first])
    assert out.shape[1] == 4  # stopped right after producing the stop token


def test_top_k_and_top_p_restrict_the_choice():
    logits = torch.tensor([[5.0, 4.0, 1.0, 0.0, -1.0]])
    g = torch.Generator().manual_seed(0)
    picks = {sample_next(logits, 1.0, top_k=2, generator=g).item() for _ in range(200)}
    assert picks <= {0, 1}
    picks = {sample_next(logits, 1.0, top_p=0.5, generator=g).item() for _ in range(200)}
    assert picks == {0}  # token 0 alone holds > 50% of the mass


def test_generation_runs_past_block_size_with_sliding_window():
    model = tiny()
    out = model.generate(torch.zeros(1, 40, dtype=torch.long), 30, temperature=0)  # 40 + 30 > block 48
    assert out.shape == (1, 70)
    long_prompt = model.generate(torch.zeros(1, 60, dtype=torch.long), 5, temperature=0)
    assert long_prompt.shape == (1, 65)  # the prompt is returned whole; generation read its last block_size - 1


def test_masked_loss_equals_hand_computation():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    targets = torch.randint(0, 11, (2, 5))
    mask = torch.tensor([[0, 1, 1, 0, 1], [1, 0, 0, 0, 0]])
    logp = torch.log_softmax(logits, -1)
    picked = [-logp[b, t, targets[b, t]].item() for b in range(2) for t in range(5) if mask[b, t]]
    assert math.isclose(cross_entropy_loss(logits, targets, mask).item(), sum(picked) / len(picked), rel_tol=1e-6)
    unmasked = -logp.gather(-1, targets[..., None]).mean().item()
    assert math.isclose(cross_entropy_loss(logits, targets).item(), unmasked, rel_tol=1e-6)


def test_all_zero_mask_gives_zero_loss_and_zero_grad():
    model = tiny().train()
    x = torch.randint(0, 97, (2, 10))
    _, loss = model(x, x, torch.zeros_like(x))
    loss.backward()
    assert loss.item() == 0.0 and math.isfinite(loss.item())
    assert all(p.grad is None or torch.count_nonzero(p.grad) == 0 for p in model.parameters())
    model.zero_grad()
    loss = forward_backward(model, [(x, x, torch.zeros_like(x))], use_loss_mask=True)
    assert loss == 0.0
    assert all(p.grad is None or torch.count_nonzero(p.grad) == 0 for p in model.parameters())


@pytest.mark.parametrize("use_mask", [True, False])
def test_gradient_accumulation_equals_one_big_batch(use_mask):
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, 97, (8, 16), generator=g)
    y = torch.randint(0, 97, (8, 16), generator=g)
    m = (torch.rand(8, 16, generator=g) < 0.3).long()
    m[2] = 0  # one window with nothing to learn: must not dilute the others
    model = tiny().double()
    big = forward_backward(model, [(x, y, m)], use_mask)
    big_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    # uneven micro-batches (3 + 1 + 4 windows): per-micro-batch means would weight tokens wrongly here
    parts = [(x[a:b], y[a:b], m[a:b]) for a, b in ((0, 3), (3, 4), (4, 8))]
    acc = forward_backward(model, parts, use_mask)
    assert abs(acc - big) < 1e-6
    for p, gb in zip(model.parameters(), big_grads):
        torch.testing.assert_close(p.grad, gb, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
def test_compiled_model_gives_the_same_loss_and_gradients(device):
    """torch.compile (train.py's compile: true, the default on CUDA) must train the same model: the loss and every
    gradient of a masked training step equal eager's. On CUDA the chunked loss once gave all-zero gradients there."""
    g = torch.Generator().manual_seed(5)
    x, y = (torch.randint(0, 97, (4, 16), generator=g).to(device) for _ in range(2))
    m = (torch.rand(4, 16, generator=g) < 0.5).long().to(device)
    model = tiny().train().to(device)
    eager_loss = forward_backward(model, [(x, y, m)], True)
    eager = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    compiled_loss = forward_backward(torch.compile(model), [(x, y, m)], True)
    assert abs(compiled_loss - eager_loss) < 1e-5
    for p, ge in zip(model.parameters(), eager):
        assert p.grad is not None and torch.count_nonzero(p.grad) > 0
        torch.testing.assert_close(p.grad, ge, atol=1e-5, rtol=1e-4)


def test_parameter_counts_of_the_presets_match_their_names():
    expected = {(16, 12, 768, 256): 152.0, (16, 14, 896, 256): 199.5, (16, 16, 1024, 1024): 254.0}
    for (L, H, C, T), millions in expected.items():
        with torch.device("meta"):  # shapes only: no memory, no init time
            model = GPT(GPTConfig(block_size=T, vocab_size=50304, n_layer=L, n_head=H, n_embd=C, bias=False))
        assert abs(model.get_num_params() / 1e6 - millions) < 0.6, (L, H, C)
