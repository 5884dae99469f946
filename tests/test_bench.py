"""bench.py's ceiling rows: the matrix products recorded from one training step are the step's whole arithmetic
(backward included), and their replay reproduces each input's layout."""

import torch

import bench
from model import GPT, GPTConfig


def product_flops(products):
    total = 0
    for op, tensors in products:
        a, b = tensors[-2][0], tensors[-1][0]  # addmm's first input is the bias
        total += 2 * a.numel() * b[-1]  # (..., m, k) @ (..., k, n): 2 m k n per batch entry
    return total


def test_recorded_products_of_a_training_step_are_its_6n_plus_attention_flops():
    torch.manual_seed(0)
    cfg = GPTConfig(block_size=32, vocab_size=96, n_layer=2, n_head=2, n_embd=32, bias=False)
    model = GPT(cfg)
    opt = bench.adamw(model)
    B, T = 3, cfg.block_size
    get_batch = bench.random_batches(cfg.vocab_size, B, T)
    # bf16 autocast on the CPU writes attention out (model.py), so its products are bmm's the recorder sees
    products = bench.recorded_matmuls(lambda: bench.our_step(model, opt, get_batch, bench.autocast("bfloat16")))
    C, L = cfg.n_embd, cfg.n_layer
    matmul_params = L * 12 * C * C + cfg.vocab_size * C  # every Linear weight, lm_head (tied with wte) included
    attention = 12 * L * T * C  # per token: q k^T and att v, forward and twice in backward (PaLM's count)
    assert product_flops(products) == B * T * (6 * matmul_params + attention)
    assert {t[2] for _, tensors in products for t in tensors} == {torch.bfloat16}


def test_products_alone_reproduce_each_inputs_layout():
    w = torch.randn(24, 16)
    x = torch.randn(5, 16)
    products = bench.recorded_matmuls(lambda: torch.nn.functional.linear(x, w, torch.zeros(24)))
    assert [(op, [(tuple(s), st) for s, st, _ in t]) for op, t in products] == [
        (torch.ops.aten.addmm.default, [((24,), (1,)), ((5, 16), (16, 1)), ((16, 24), (1, 16))])]  # w.t(): a view
    seen = bench.recorded_matmuls(bench.matmuls_alone(products))
    assert [(op, [(s, st, d) for s, st, d in t]) for op, t in seen] == products
