"""Decode-time weight layouts (decode_weights.py): fp32 packed weights compute the plain model's numbers, int8
weight-only weights are the rounded matrix applied as documented, LoRA adapters are merged first, and sample.py /
serve.py take --dtype int8."""

import copy

import pytest
import torch

import lora
from conftest import run_cli
import decode_weights
from decode_weights import Int8Linear, PackedLinear, fbgemm_available, for_decoding, packing_available
from engine import Engine, Request
from model import GPT, GPTConfig
from tokenizer import Tokenizer

TOK = Tokenizer.char_from_texts(["abcdefghijklmnopqrstuvwxyz .,!?"])
needs_packing = pytest.mark.skipif(not packing_available(), reason="this torch build has no oneDNN packed linear")
needs_fbgemm = pytest.mark.skipif(not fbgemm_available(), reason="this torch build has no fbgemm int8 GEMM")


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.one_thread: tiny shapes


def tiny(seed=0, bias=True):
    torch.manual_seed(seed)
    cfg = GPTConfig(block_size=32, vocab_size=TOK.vocab_size, n_layer=2, n_head=2, n_embd=32, bias=bias)
    model = GPT(cfg).eval()
    with torch.no_grad():  # sharp logits: greedy tokens without near-ties
        model.transformer.wte.weight.mul_(10)
    return model


def prompt(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [TOK.eot_token] + torch.randint(0, TOK.vocab_size - 1, (n - 1,), generator=g).tolist()


@needs_packing
@pytest.mark.parametrize("bias", [True, False])
def test_packed_fp32_computes_the_plain_models_logits_and_tokens(bias):
    plain = tiny(bias=bias)
    packed = for_decoding(copy.deepcopy(plain), "float32", max_batch_size=4)
    linears = [m for m in packed.modules() if isinstance(m, PackedLinear)]
    assert len(linears) == 2 * 4 + 1  # c_attn, attn.c_proj, c_fc, mlp.c_proj per block, and lm_head
    assert packed.transformer.wte.weight.data_ptr() == plain.transformer.wte.weight.data_ptr() or \
        torch.equal(packed.transformer.wte.weight, plain.transformer.wte.weight)
    x = torch.tensor([prompt(20, s) for s in range(3)])  # (3, 20): a batch of prompts, all positions
    with torch.no_grad():
        assert torch.allclose(packed(x)[0], plain(x)[0], atol=1e-5, rtol=0)
    for n in (1, 9, 20):  # KV-cache decoding past block_size (the context re-read) through the engine
        p = prompt(n)
        r = Request(p, 50, temperature=0)
        list(Engine(packed, TOK, max_batch_size=1).run([r]))
        assert r.tokens == plain.generate(torch.tensor([p]), 50, temperature=0)[0, n:].tolist()


def batched_and_alone_tokens(model, lengths, limits):
    """Greedy tokens of prompts of these lengths through the engine at batch 4, and each one alone."""
    ps = [prompt(n, n) for n in lengths]
    alone = []
    for p, n in zip(ps, limits):
        r = Request(p, n, temperature=0)
        list(Engine(model, TOK, max_batch_size=1).run([r]))
        alone.append(r.tokens)
    reqs = [Request(p, n, temperature=0) for p, n in zip(ps, limits)]
    list(Engine(model, TOK, max_batch_size=4).run(reqs))
    return [r.tokens for r in reqs], alone


@needs_packing
def test_packed_rows_in_a_batch_get_their_alone_tokens():
    packed = for_decoding(tiny(), "float32", max_batch_size=4)
    batched, alone = batched_and_alone_tokens(packed, (3, 12, 1, 25, 7, 30), (20, 9, 40, 15, 33, 5))
    assert batched == alone


@pytest.mark.parametrize("bias", [True, False])
def test_int8_weights_are_each_rows_rounded_matrix(bias):
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48, bias=bias)
    q8 = Int8Linear(lin)
    assert q8.kernel == "int8pack"  # a small matrix: fbgemm's extra ops would cost more than its faster read
    assert q8.q.dtype == torch.int8 and q8.q.shape == (48, 64) and q8.scale.shape == (48,)
    assert int(q8.q.abs().max(dim=1).values.min()) == 127  # every row's largest |w| maps to 127
    dequant = q8.q.float() * q8.scale[:, None]
    assert (dequant - lin.weight).abs().max() <= q8.scale.max() / 2 + 1e-7  # rounding: half a step at most
    with torch.no_grad():
        for rows in (1, 3, 40):  # decode rows: bf16 inputs on the int8 kernel; a prompt: fp32 on the dequantized
            x = torch.randn(2, rows, 64)
            xin = x.to(torch.bfloat16).float() if rows * 2 <= 16 else x
            want = xin @ dequant.t() + (lin.bias if bias else 0)
            got = q8(x)
            assert got.shape == (2, rows, 48) and got.dtype == torch.float32
            assert torch.allclose(got, want, atol=2e-3, rtol=1e-2), (rows, (got - want).abs().max())


@needs_fbgemm
@pytest.mark.parametrize("bias", [True, False])
def test_int8_on_fbgemm_is_the_rounded_matrix_times_the_fp32_input_row_by_row(bias):
    """fbgemm rounds its input to 7-bit integers; int8_input_rows makes that exact (~14 bits a row kept), so the
    product is the dequantized matrix's with the fp32 input, and a row's numbers do not depend on its batch."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48, bias=bias)
    q8 = Int8Linear(lin, kernel="fbgemm")
    assert q8.q is None  # fbgemm's packed copy is the only one kept
    twin = Int8Linear(lin, kernel="int8pack")  # the same rounding, q kept
    dequant = twin.q.float() * twin.scale[:, None]
    with torch.no_grad():
        for rows in (1, 3, 40):
            x = torch.randn(2, rows, 64) * 5
            x[0, 0] = 0  # an all-zero row: its bias alone
            want = x @ dequant.t() + (lin.bias if bias else 0)
            got = q8(x)
            assert got.shape == (2, rows, 48) and got.dtype == torch.float32
            assert (got - want).abs().max() <= 2e-4 * x.abs().max(), (rows, (got - want).abs().max())
            alone = torch.stack([torch.cat([q8(x[b, i:i + 1]) for i in range(rows)]) for b in range(2)])
            assert torch.equal(got, alone)


@needs_fbgemm
def test_int8_kernel_follows_the_matrix_size(monkeypatch):
    big = torch.nn.Linear(768, decode_weights.FBGEMM_MIN_WEIGHTS // 768 + 1)
    assert Int8Linear(big).kernel == "fbgemm" and Int8Linear(torch.nn.Linear(768, 768)).kernel == "int8pack"
    monkeypatch.setattr(decode_weights, "fbgemm_available", lambda: False)  # ARM builds, or no quantized API
    assert Int8Linear(big).kernel == "int8pack"


@needs_fbgemm
def test_int8_fbgemm_rows_in_a_batch_get_their_alone_tokens(monkeypatch):
    monkeypatch.setattr(decode_weights, "FBGEMM_MIN_WEIGHTS", 0)  # every matrix on fbgemm
    q = for_decoding(tiny(), "int8")
    assert all(m.kernel == "fbgemm" for m in q.modules() if isinstance(m, Int8Linear))
    batched, alone = batched_and_alone_tokens(q, (3, 12, 1, 25), (20, 9, 40, 15))
    assert batched == alone


def test_int8_model_stays_close_to_fp32_and_leaves_the_embedding_in_fp32():
    plain = tiny()
    q = for_decoding(copy.deepcopy(plain), "int8")
    assert sum(isinstance(m, Int8Linear) for m in q.modules()) == 9
    assert q.transformer.wte.weight.dtype == torch.float32
    x = torch.tensor([prompt(20)])
    with torch.no_grad():
        a, b = plain(x)[0], q(x)[0]
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.9
    assert (a - b).abs().max() < 0.05 * a.abs().max()


@pytest.mark.parametrize("dtype", ["float32", "int8"])
def test_lora_adapters_are_merged_before_the_layout(dtype):
    if dtype == "float32" and not packing_available():
        pytest.skip("no oneDNN packed linear")
    model = tiny()
    lora.apply_lora(model, rank=4, alpha=8)
    with torch.no_grad():
        for m in lora.lora_layers(model):
            m.lora_B.normal_(0, 0.05)  # a trained adapter: not the zero init
    x = torch.tensor([prompt(16)])
    with torch.no_grad():
        want = model(x)[0]
        got = for_decoding(model, dtype)(x)[0]
    assert not lora.lora_layers(model)
    assert torch.allclose(got, want, atol=1e-5 if dtype == "float32" else 0.05 * want.abs().max(), rtol=0)


def test_other_dtypes_are_left_alone():
    model = tiny()
    for dtype in ("bfloat16", "float16"):
        assert not any(isinstance(m, (PackedLinear, Int8Linear)) for m in for_decoding(model, dtype).modules())


def test_sample_py_greedy_in_fp32_and_int8(tmp_path, shakespeare_char):
    """A trained char model through the real CLI: --dtype float32 (packed) prints the plain model's greedy text,
    --dtype int8 the int8 model's."""
    out = str(tmp_path / "ckpt")
    r = run_cli("train.py", "--dataset_dir", shakespeare_char, "--out_dir", out, "--model_name", "m", "--n_layer", "2",
                "--n_head", "2", "--n_embd", "64", "--block_size", "64", "--batch_size", "8", "--max_iters", "40",
                "--eval_interval", "40", "--eval_iters", "2", "--dtype", "float32", "--compile", "false",
                env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    common = ["sample.py", "--out_dir", out, "--model_name", "m", "--prompt", "ROMEO:", "--temperature", "0",
              "--max_new_tokens", "60"]
    fp32 = run_cli(*common, "--dtype", "float32", env={"OMP_NUM_THREADS": "1"})
    int8 = run_cli(*common, "--dtype", "int8", env={"OMP_NUM_THREADS": "1"})
    assert fp32.returncode == 0 and int8.returncode == 0, fp32.stderr + int8.stderr
    from checkpoint import load_model
    model, tok, _ = load_model("m", out)
    ids = [tok.eot_token] + tok.encode("ROMEO:")
    want = tok.decode(model.generate(torch.tensor([ids]), 60, temperature=0)[0, len(ids):].tolist())
    assert fp32.stdout.rstrip("\n") == "ROMEO:" + want
    r = Request(ids, 60, temperature=0)
    list(Engine(for_decoding(model, "int8"), tok).run([r]))
    assert int8.stdout.rstrip("\n") == "ROMEO:" + r.text
