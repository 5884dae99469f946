"""The batched decoding engine: a row alone computes what GPT.generate computes (KV cache and full recompute), rows
of different lengths joining and leaving a running batch get the tokens they get alone, per-row sampling, stop
tokens, stop strings, limits and cancellation."""

import pytest
import torch

from engine import Engine, Request
from model import GPT, GPTConfig
from tokenizer import Tokenizer



pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.one_thread: tiny shapes


TOK = Tokenizer.char_from_texts(["abcdefghijklmnopqrstuvwxyz .,!?"])


def tiny(bos=False, block_size=32, seed=0):
    torch.manual_seed(seed)
    cfg = GPTConfig(block_size=block_size, vocab_size=TOK.vocab_size, n_layer=2, n_head=2, n_embd=32,
                    use_bos_zero_training=bos, bos_scaling_factor=0.1)
    model = GPT(cfg).eval()
    with torch.no_grad():  # sharper logits than the init's near-uniform ones: no greedy near-ties (see engine.py)
        model.transformer.wte.weight.mul_(10)
    return model


def prompts(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [[TOK.eot_token] + torch.randint(0, TOK.vocab_size - 1, (n - 1,), generator=g).tolist() for n in lengths]


LENGTHS = (3, 7, 12, 1, 20, 31, 5, 9)


def alone(model, p, n, **kw):
    r = Request(p, n, **kw)
    list(Engine(model, TOK, max_batch_size=1).run([r]))
    return r


@pytest.mark.parametrize("bos", [False, True])
def test_a_row_alone_equals_generate_with_cache_and_full_recompute(bos):
    model = tiny(bos)
    for p in prompts((1, 7, 20, 31)):
        r = alone(model, p, 60, temperature=0)  # 60 > block_size 32: the context re-read runs too
        x = torch.tensor([p])
        cached = model.generate(x, 60, temperature=0)[0, len(p):].tolist()
        full = model.generate(x, 60, temperature=0, use_kv_cache=False)[0, len(p):].tolist()
        assert r.tokens == cached == full
        assert r.finish_reason == "length" and r.text == TOK.decode(r.tokens)


@pytest.mark.parametrize("bos", [False, True])
def test_rows_joining_and_leaving_get_their_alone_tokens(bos):
    """8 requests with different prompt lengths and limits through a batch of 4: they join at different steps
    (some while others run, some after a row frees up), and each leaves when its own limit is reached."""
    model = tiny(bos)
    ps, limits = prompts(LENGTHS), (5, 40, 17, 60, 3, 25, 50, 8)
    expected = [alone(model, p, n, temperature=0).tokens for p, n in zip(ps, limits)]
    eng = Engine(model, TOK, max_batch_size=4)
    reqs = [Request(p, n, temperature=0) for p, n in zip(ps, limits)]
    batch_sizes, texts = [], {id(r): "" for r in reqs}
    for k, r in enumerate(reqs):
        eng.submit(r)
        for _ in range(k % 3):  # a few decode steps between arrivals
            for req, delta, _ in eng.step():
                texts[id(req)] += delta
            batch_sizes.append(len(eng.rows))
    while eng.busy:
        for req, delta, _ in eng.step():
            texts[id(req)] += delta
        batch_sizes.append(len(eng.rows))
    assert max(batch_sizes) == 4 and len(set(batch_sizes)) > 2  # it really batched, at changing sizes
    for r, e in zip(reqs, expected):
        assert r.tokens == e and r.finish_reason == "length"
        assert texts[id(r)] == r.text == TOK.decode(e)  # the streamed pieces join to the whole text
    assert not eng.rows and not eng.pending


def test_each_row_samples_with_its_own_settings_and_generator():
    model = tiny()
    p = prompts(LENGTHS)
    seeded = alone(model, p[0], 30, temperature=1.0, seed=5).tokens
    assert alone(model, p[0], 30, temperature=1.0, seed=5).tokens == seeded  # a seed is reproducible
    assert alone(model, p[0], 30, temperature=1.0, seed=6).tokens != seeded
    greedy = alone(model, p[1], 30, temperature=0).tokens
    assert alone(model, p[1], 30, temperature=1.0, top_k=1, seed=9).tokens == greedy  # top_k 1 is greedy
    assert alone(model, p[1], 30, temperature=1.0, top_p=1e-6, seed=9).tokens == greedy  # so is a tiny top_p
    # in one batch: the seeded row draws from its own generator, unmoved by the rows around it
    reqs = [Request(p[0], 30, temperature=1.0, seed=5), Request(p[1], 30, temperature=0),
            Request(p[2], 30, temperature=1.0, seed=123), Request(p[3], 30, temperature=1.0, top_k=1, seed=1)]
    list(Engine(model, TOK, max_batch_size=4).run(reqs))
    assert reqs[0].tokens == seeded and reqs[1].tokens == greedy
    assert reqs[3].tokens == alone(model, p[3], 30, temperature=0).tokens


def test_stop_tokens_stop_strings_and_streamed_pieces():
    model = tiny()
    p = prompts(LENGTHS)[4]
    ref = alone(model, p, 40, temperature=0)
    text = ref.text
    # a stop token: the reply ends before it, finish_reason "stop", the token counted but not in the text
    t = ref.tokens[10]
    k = ref.tokens.index(t)
    r = alone(model, p, 40, temperature=0, stop_tokens=(t,))
    assert r.finish_reason == "stop" and r.tokens == ref.tokens[:k + 1] and r.text == TOK.decode(ref.tokens[:k])
    # a stop string (3 characters from the middle): the text ends just before its first occurrence
    s = text[12:15]
    r = Request(p, 40, temperature=0, stop=("zzzzzz", s))
    pieces = [d for _, d, _ in Engine(model, TOK).run([r])]
    assert r.finish_reason == "stop" and r.text == text[:text.index(s)] == "".join(pieces)
    # the limit: "length"; max_tokens 1 gives exactly the first token
    r = alone(model, p, 1, temperature=0)
    assert r.tokens == ref.tokens[:1] and r.finish_reason == "length"


def test_held_back_text_waits_for_a_stop_string_to_be_ruled_out():
    r = Request([0], 10, stop=("abc",))
    assert Engine._text(r, "xyab", final=False) == ("xy", False)  # "ab" may become "abc"
    r.text = "xy"
    assert Engine._text(r, "xyabd", final=False) == ("xyabd", False)  # it did not
    assert Engine._text(r, "xyabdabc", final=False) == ("xyabd", True)
    r = Request([0], 10)
    assert Engine._text(r, "ok\ufffd", final=False) == ("ok", False)  # half a multi-byte character waits
    assert Engine._text(r, "ok\ufffd", final=True) == ("ok\ufffd", False)


def test_cancel_frees_the_row_and_leaves_the_others_unchanged():
    model = tiny()
    ps = prompts(LENGTHS)[:3]
    expected = [alone(model, p, 30, temperature=0).tokens for p in ps]
    eng = Engine(model, TOK, max_batch_size=3)
    reqs = [Request(p, 30, temperature=0) for p in ps]
    for r in reqs:
        eng.submit(r)
    for _ in range(5):
        eng.step()
    reqs[1].cancel()
    eng.step()
    assert reqs[1] not in eng.rows and reqs[1].finish_reason == "cancelled" and len(eng.rows) == 2
    while eng.busy:
        eng.step()
    assert reqs[0].tokens == expected[0] and reqs[2].tokens == expected[2]
    assert reqs[1].tokens == expected[1][:len(reqs[1].tokens)] and len(reqs[1].tokens) < 30


def test_bf16_autocast_batch_runs_and_bad_requests_are_refused():
    model = tiny(bos=True)
    eng = Engine(model, TOK, max_batch_size=4, autocast=lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    reqs = [Request(p, 40, temperature=0.8, seed=i) for i, p in enumerate(prompts(LENGTHS)[:4])]
    list(eng.run(reqs))
    assert all(len(r.tokens) == 40 for r in reqs) and eng.cache.k.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="prompt of 32 tokens.*at most 31 prompt tokens"):
        eng.submit(Request(list(range(32)), 5))
    with pytest.raises(ValueError, match="max_tokens must be >= 1"):
        eng.submit(Request([0], 0))
