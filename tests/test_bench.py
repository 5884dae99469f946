"""bench.py's ceiling rows: the calls recorded from one training step hold the step's whole arithmetic (its
products are exactly 6N + attention FLOPs, backward included, and GPT-2's GELU, layer norms and log-softmax are
there for every layer), their replay reproduces each input's layout, and the update replayed with them is the
real optimizer's step."""

import collections

import torch

import bench
from model import GPT, GPTConfig

aten = torch.ops.aten


def product_flops(calls):
    total = 0
    for op, args, _ in calls:
        if op in bench.MATMUL_OPS:
            a, b = args[-2].shape, args[-1].shape  # addmm's first input is the bias
            total += 2 * a.numel() * b[-1]  # (..., m, k) @ (..., k, n): 2 m k n per batch entry
    return total


def test_recorded_calls_of_a_training_step_are_its_whole_arithmetic():
    torch.manual_seed(0)
    cfg = GPTConfig(block_size=32, vocab_size=96, n_layer=2, n_head=2, n_embd=32, bias=False)
    model = GPT(cfg)
    opt = bench.adamw(model)
    B, T = 3, cfg.block_size
    get_batch = bench.random_batches(cfg.vocab_size, B, T)
    # bf16 autocast on the CPU writes attention out (model.py), so its products are bmm's the recorder sees
    calls = bench.recorded_ops(lambda: bench.our_step(model, opt, get_batch, bench.autocast("bfloat16")))
    C, L = cfg.n_embd, cfg.n_layer
    matmul_params = L * 12 * C * C + cfg.vocab_size * C  # every Linear weight, lm_head (tied with wte) included
    attention = 12 * L * T * C  # per token: q k^T and att v, forward and twice in backward (PaLM's count)
    assert product_flops(calls) == B * T * (6 * matmul_params + attention)
    assert {a.dtype for op, args, _ in calls if op in bench.MATMUL_OPS for a in args} == {torch.bfloat16}
    counts = collections.Counter(op for op, _, _ in calls if op not in bench.MATMUL_OPS)
    assert counts == {aten.gelu.default: L, aten.gelu_backward.default: L, aten.native_layer_norm.default: 2 * L + 1,
                      aten.native_layer_norm_backward.default: 2 * L + 1, aten._log_softmax.default: 1}


def test_ops_alone_reproduce_each_inputs_layout_and_arguments():
    w = torch.randn(24, 16)
    x = torch.randn(5, 16)
    calls = bench.recorded_ops(lambda: torch.nn.functional.gelu(torch.nn.functional.linear(x, w, torch.zeros(24)),
                                                                approximate="tanh"))
    S = bench.Spec
    assert [(op, [tuple(a) if isinstance(a, S) else a for a in args], kw) for op, args, kw in calls] == [
        (aten.addmm.default, [((24,), (1,), torch.float32), ((5, 16), (16, 1), torch.float32),
                              ((16, 24), (1, 16), torch.float32)], {}),  # w.t(): a view
        (aten.gelu.default, [((5, 24), (24, 1), torch.float32)], {"approximate": "tanh"})]
    assert bench.recorded_ops(bench.ops_alone(calls)) == calls


def test_update_alone_takes_the_optimizers_real_step_and_leaves_no_gradients_behind():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=8, vocab_size=32, n_layer=1, n_head=2, n_embd=16))
    opt = bench.adamw(model)
    before = [p.detach().clone() for p in model.parameters()]
    update = bench.update_alone(model, opt)
    for _ in range(3):
        update()
    assert all(p.grad is None for p in model.parameters())  # as after our step's zero_grad(set_to_none=True)
    assert {int(s["step"]) for s in opt.state.values()} == {3}  # every weight got all three AdamW steps
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    # the same gradient in every call: then m = g (1 - b1^3) and v = g^2 (1 - b2^3) for every weight, so m^2 / v
    # is the same constant everywhere
    b1, b2 = opt.param_groups[0]["betas"]
    for s in opt.state.values():
        ratio = s["exp_avg"] ** 2 / s["exp_avg_sq"]
        torch.testing.assert_close(ratio, torch.full_like(ratio, (1 - b1 ** 3) ** 2 / (1 - b2 ** 3)), rtol=1e-4, atol=0)
