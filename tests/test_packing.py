"""Packed whole-conversation training (packing: true): prepare_dataset.py records where every record starts; the
packed loader's rows hold whole conversations, each attending only to itself with positions restarting at 0, so a
conversation computes in a row exactly what it computes alone; epochs are real passes; resume is exact through
train.py; gradient accumulation and DDP equal one big batch; BOS zero scales each conversation's own BOS.
Aligned windows (align_windows: true), the random windows' sibling that reads the same starts: each window is the
stream from a conversation's BOS on, its mask aligned with its targets, across shards, resumed exactly."""

import json
import os
import socket
from collections import Counter

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

import prepare_dataset
import train
from config import load_config
from conftest import SAMPLE_CHAT, SHAKESPEARE, run_cli
from data import BatchLoader, DataError, PackedLoader, Split, read_starts
from model import GPT, DocumentMask, GPTConfig, _flex_block_mask, flex_attention, packed_inputs
from runtime import forward_backward

SMALL = dict(n_layer=2, n_head=2, n_embd=32, block_size=48, batch_size=4, eval_iters=2, log_interval=1,
             warmup_iters=2, learning_rate=3e-3, min_lr=3e-4, use_loss_mask=True, packing=True, dtype="float32",
             compile=False)


def run(tmp_path, dataset, **overrides):
    cfg = load_config(None, {**SMALL, "out_dir": str(tmp_path / "ckpt"), "dataset_dir": dataset, **overrides})
    lines = []
    summary = train.train(cfg, log=lines.append)
    return summary, lines


def metrics(tmp_path, name):
    with open(tmp_path / "ckpt" / name / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def step_losses(tmp_path, name):
    return [(r["iter"], r["loss"]) for r in metrics(tmp_path, name) if "loss" in r]


def stream(dataset, split="train"):
    data = Split(dataset, split, use_mask=True)
    return np.concatenate(data.tokens).astype(np.int64), np.concatenate(data.masks).astype(np.int64)


@pytest.fixture(scope="module")
def small_chat(tmp_path_factory):
    """The first 60 shipped conversations: an epoch is a handful of steps, so runs cross epochs."""
    folder = tmp_path_factory.mktemp("small_chat")
    src = folder / "chat.jsonl"
    with open(SAMPLE_CHAT) as f:
        src.write_text("".join(f.readlines()[:60]))
    out = str(folder / "data")
    prepare_dataset.prepare([str(src)], out, tokenization="char", fmt="chat", tokens_per_shard=700)
    return out


def tiny_model(vocab, block_size=48, **kw):
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=block_size, vocab_size=vocab, n_layer=2, n_head=2, n_embd=32, bias=True, **kw))
    return model.eval()


# ---------------------------------------------------------------------------------------------------------------
# prepare_dataset.py: the starts

def test_starts_mark_every_conversation_across_shards(small_chat):
    meta = json.load(open(os.path.join(small_chat, "dataset_metadata.json")))
    assert meta["has_starts"] and len(meta["splits"]["train"]["shards"]) > 3  # conversations cross shard files
    for split in ("train", "val"):
        info = meta["splits"][split]["starts"]
        starts = np.fromfile(os.path.join(small_chat, split, info["file"]), dtype=np.uint64).astype(np.int64)
        assert info["count"] == len(starts) == meta["splits"][split]["conversations"]
        tok, mask = stream(small_chat, split)
        assert starts[0] == 0 and (tok[starts] == meta["eot_token"]).all()  # each conversation's BOS
        ends = np.append(starts[1:], len(tok) - 1)
        # a conversation ends with its answer's end-of-text token, trained on (mask 1): the next one's BOS
        assert (tok[ends] == meta["eot_token"]).all() and (mask[ends] == 1).all()
    assert sum(meta["splits"][s]["starts"]["count"] for s in ("train", "val")) == 60


def test_starts_of_text_documents(tmp_path):
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": f"document number {i} " * (i + 1)}) + "\n" for i in range(20)))
    meta = prepare_dataset.prepare([str(docs)], str(tmp_path / "d"), tokenization="char", fmt="text", val_fraction=0.2)
    data = Split(str(tmp_path / "d"), "train", use_mask=False)
    tok = np.concatenate(data.tokens)
    starts = np.fromfile(str(tmp_path / "d" / "train" / "starts.bin"), dtype=np.uint64).astype(np.int64)
    assert len(starts) == meta["splits"]["train"]["documents"]
    assert starts[0] == 0 and tok[0] != meta["eot_token"]  # the first document has no BOS of its own...
    assert (tok[starts[1:]] == meta["eot_token"]).all()  # ...the others follow the previous one's end-of-text
    loader = PackedLoader(str(tmp_path / "d"), "train", 2, 64, seed=0)
    x, y, m, pos, doc = loader.batch([[int(np.flatnonzero(loader.record == 0)[0])]])
    assert x[0, 0] == meta["eot_token"] and y[0, 0] == tok[0]  # ...so it gets one in front: its first token trains


# ---------------------------------------------------------------------------------------------------------------
# the rows

@pytest.mark.parametrize("explicit", [False, True])
@pytest.mark.parametrize("bos_zero", [False, True])
def test_conversation_in_a_packed_row_equals_it_alone(small_chat, explicit, bos_zero):
    """Logits and masked loss of a conversation are the same (1e-5, fp32) alone and in two rows with different
    neighbours, through SDPA and through the explicit attention path."""
    loader = PackedLoader(small_chat, "train", 2, 48, use_mask=True, seed=0)
    model = tiny_model(loader.data.vocab_size, use_bos_zero_training=bos_zero, bos_scaling_factor=0.3)
    p = int(np.argmax(loader.n[:20] < 20))  # a short piece with room for neighbours
    others = [i for i in range(len(loader.n)) if i != p and loader.n[i] <= 12][:4]
    rows = [[others[0], p, others[1]], [others[2], others[3], p]]
    assert sum(loader.n[rows[0]]) <= 48 and sum(loader.n[rows[1]]) <= 48
    x, y, m, pos, doc = loader.batch(rows)
    kw = dict(attn_out=[]) if explicit else {}
    logits, _ = model(x, position_ids=pos, doc_ids=doc, **kw)
    n = int(loader.n[p])
    alone_x, alone_y, alone_m = x[0][doc[0] == 1][None], y[0][doc[0] == 1][None], m[0][doc[0] == 1][None]
    assert alone_x[0, 0] == loader.bos_token and alone_x.shape == (1, n)
    ref, ref_loss = model(alone_x, alone_y, alone_m, loss_reduction="sum", **kw)  # the plain, unpacked path
    for b, j in ((0, 1), (1, 2)):
        sel = doc[b] == j
        assert torch.equal(x[b][sel], alone_x[0])
        assert (logits[b][sel] - ref[0]).abs().max() < 1e-5
        _, loss = model(x[b:b + 1], y[b:b + 1], m[b:b + 1] * sel, loss_reduction="sum",  # the neighbours' mask: 0
                        position_ids=pos[b:b + 1], doc_ids=doc[b:b + 1])
        assert abs(loss.item() - ref_loss.item()) < 1e-5 * max(1.0, abs(ref_loss.item()))
    # the neighbours changed the row (so the equality is not trivial)
    assert not torch.equal(x[0], x[1])


def test_padding_counts_nowhere(small_chat):
    loader = PackedLoader(small_chat, "train", 8, 100, use_mask=True, seed=0)
    x, y, m, pos, doc = loader.get_batch()
    pad = doc == -1
    assert pad.any() and (y[pad] == -1).all() and (m[pad] == 0).all()
    assert (pos[pad] > 0).all()  # padding keeps its column as its position: never a position 0 to scale
    model = tiny_model(loader.data.vocab_size, block_size=100)
    x2 = x.clone()
    x2[pad] = 3  # whatever the padding holds, the loss is the same
    _, a = model(x, y, m, position_ids=pos, doc_ids=doc)
    _, b = model(x2, y, m, position_ids=pos, doc_ids=doc)
    assert abs(a.item() - b.item()) < 1e-6


def test_bos_zero_scales_each_conversations_first_position_only(small_chat):
    loader = PackedLoader(small_chat, "train", 8, 48, use_mask=True, seed=0)
    x, y, m, pos, doc = loader.get_batch()
    model = tiny_model(loader.data.vocab_size, use_bos_zero_training=True, bos_scaling_factor=0.25)
    scaled = model.embed(x, position_ids=pos)
    plain = model.transformer.wte(x) + model.transformer.wpe(pos)
    first = pos == 0
    assert (x[first] == loader.bos_token).all()  # every position 0 is a BOS ...
    starts = torch.zeros_like(first)
    starts[:, 0] = doc[:, 0] >= 0
    starts[:, 1:] = (doc[:, 1:] != doc[:, :-1]) & (doc[:, 1:] >= 0)
    assert torch.equal(first, starts)  # ... and every conversation (piece) starts with one
    assert torch.equal(scaled[first], plain[first] * 0.25)
    assert torch.equal(scaled[~first], plain[~first])  # nowhere else: not padding, not a BOS inside a conversation


def test_long_conversations_are_split_into_pieces_that_start_with_bos(small_chat):
    loader = PackedLoader(small_chat, "train", 4, 24, use_mask=True, seed=0)
    assert loader.num_split > 0 and "longer than block_size 24" in loader.summary()
    tok, mask = stream(small_chat)
    r = int(loader.record[np.flatnonzero(loader.bos)[0]])  # a record in more than one piece
    pieces = np.flatnonzero(loader.record == r)
    x, y, m, pos, doc = loader.batch([[int(p)] for p in pieces])
    assert (x[:, 0] == loader.bos_token).all()
    starts = np.fromfile(os.path.join(small_chat, "train", "starts.bin"), dtype=np.uint64).astype(np.int64)
    targets = torch.cat([y[i][y[i] != -1] for i in range(len(pieces))])
    assert targets.tolist() == tok[starts[r] + 1:starts[r + 1] + 1].tolist()  # every target once, in order
    assert torch.cat([m[i][y[i] != -1] for i in range(len(pieces))]).tolist() == mask[starts[r] + 1:starts[r + 1] + 1].tolist()


# ---------------------------------------------------------------------------------------------------------------
# epochs, ranks, resume

def test_every_conversation_exactly_once_per_epoch_across_ranks_and_micro_steps(small_chat):
    tok, _ = stream(small_chat)
    starts = np.fromfile(os.path.join(small_chat, "train", "starts.bin"), dtype=np.uint64).astype(np.int64)
    ends = np.append(starts[1:], len(tok) - 1)
    expected = Counter(tuple(tok[s + 1:e + 1]) for s, e in zip(starts, ends))  # each conversation's targets
    world, accum = 2, 3
    loaders = [PackedLoader(small_chat, "train", 2, 128, seed=5, rank=r, world=world, accum=accum) for r in range(world)]
    per_epoch = loaders[0].steps_per_epoch
    assert loaders[0].num_split == 0  # (pieces of split conversations: test_long_conversations_...)
    assert per_epoch > 2 and loaders[0].rows_per_epoch % (2 * world * accum)  # the last step is a partial one
    orders = []
    for epoch in range(2):
        seen, order = Counter(), []
        for step in range(per_epoch):
            for _ in range(accum):
                for loader in loaders:
                    assert loader.epoch == epoch
                    x, y, m, pos, doc = loader.get_batch()
                    for b in range(len(x)):
                        for j in sorted(set(doc[b].tolist()) - {-1}):
                            seen[tuple(y[b][doc[b] == j].tolist())] += 1
                            order.append(tuple(y[b][doc[b] == j].tolist()))
        assert seen == expected  # every conversation once, whole; nothing else
        orders.append(order)
    assert loaders[0].epoch == 2 and orders[0] != orders[1]  # a new shuffle every epoch


def test_grad_accumulation_of_packed_rows_equals_one_big_batch(small_chat):
    torch.manual_seed(0)
    big = PackedLoader(small_chat, "train", 4, 48, use_mask=True, seed=3, accum=1)
    small = PackedLoader(small_chat, "train", 2, 48, use_mask=True, seed=3, accum=2)
    grads, losses = [], []
    for loader, micro in ((big, 1), (small, 2)):
        model = tiny_model(loader.data.vocab_size).train()
        batches = [loader.get_batch() for _ in range(micro)]
        losses.append(forward_backward(model, batches, use_loss_mask=True))
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    counts = [int(b[2].sum()) for b in (small.batch(small.rows_of(0, 0)), small.batch(small.rows_of(0, 1)))]
    assert counts[0] != counts[1]  # the micro-batches' mask counts differ: a per-micro mean would not match
    assert abs(losses[0] - losses[1]) < 1e-6
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-6, rtol=1e-5), n


def test_resume_mid_epoch_is_exact_through_train(tmp_path, small_chat):
    common = dict(max_iters=14, lr_decay_iters=14, eval_interval=7, dropout=0.1, seed=7, gradient_accumulation_steps=2,
                  batch_size=8)
    summary, lines = run(tmp_path, small_chat, model_name="straight", **common)
    per_epoch = int(next(line for line in lines if "steps per epoch" in line).split(" steps per epoch")[0].split()[-1])
    assert 2 <= per_epoch < 7 and 7 % per_epoch  # the resume lands inside an epoch, after the first one
    run(tmp_path, small_chat, model_name="halves", **{**common, "max_iters": 7})
    summary, lines = run(tmp_path, small_chat, model_name="halves", init_from="resume", **common)
    assert any("resuming halves from iteration 7" in line for line in lines)
    straight, halves = step_losses(tmp_path, "straight"), step_losses(tmp_path, "halves")
    assert len(straight) == 14 and straight == halves  # bit-identical, every step
    ck = torch.load(tmp_path / "ckpt" / "halves" / "ckpt.pt", weights_only=True)
    assert ck["loader"][0]["packing"] and ck["loader"][0]["epoch"] == 14 // per_epoch
    # the packing setting is part of the run: resuming without it is refused
    with pytest.raises(train.TrainError, match="'packing'"):
        run(tmp_path, small_chat, model_name="halves", init_from="resume", **{**common, "packing": False})


def test_xgblora_epoch_merges_count_packed_epochs(tmp_path, small_chat):
    summary, lines = run(tmp_path, small_chat, model_name="xgb", finetuning_type="xgblora", xgblora_merge_frequency=2,
                         max_iters=1, eval_interval=1000)
    per_epoch = int(next(line for line in lines if "steps per epoch" in line).split(" steps per epoch")[0].split()[-1])
    summary, lines = run(tmp_path, small_chat, model_name="xgb2", finetuning_type="xgblora", xgblora_merge_frequency=2,
                         max_iters=5 * per_epoch + 1, eval_interval=1000)
    merged_at = [r["iter"] for r in metrics(tmp_path, "xgb2") if "xgblora_merge" in r]
    assert merged_at == [2 * per_epoch, 4 * per_epoch]


def test_mezo_and_lora_train_on_packed_rows(tmp_path, small_chat):
    for name, extra in (("zo", dict(trainer="zo", learning_rate=1e-4, min_lr=1e-5)),
                        ("lora", dict(finetuning_type="lora", lora_rank=4))):
        summary, lines = run(tmp_path, small_chat, model_name=name, max_iters=3, eval_interval=3, **extra)
        assert summary["iter_num"] == 3 and np.isfinite(summary["val_loss"])
        assert any("packing 5" in line and "rows per epoch" in line for line in lines)


def ddp_worker(rank, port, cfg):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    train.train(load_config(None, cfg), log=lambda *a: None)


def test_ddp_ranks_take_their_own_rows_and_equal_one_process(tmp_path, small_chat):
    """Rank r takes slot r of each step's rows, so 2 ranks of batch B see exactly what one process of batch 2B sees:
    the losses agree to float rounding."""
    common = dict(SMALL, dataset_dir=small_chat, out_dir=str(tmp_path / "ckpt"), max_iters=3, eval_interval=3,
                  lr_decay_iters=3, gradient_accumulation_steps=2)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(ddp_worker, args=(port, dict(common, model_name="ddp", batch_size=2)), nprocs=2, join=True)
    train.train(load_config(None, dict(common, model_name="one", batch_size=4)), log=lambda *a: None)
    ddp, one = step_losses(tmp_path, "ddp"), step_losses(tmp_path, "one")
    assert [i for i, _ in ddp] == [i for i, _ in one] == [1, 2, 3]
    for (_, a), (_, b) in zip(ddp, one):
        assert abs(a - b) < 1e-5
    evals = [[r["val_loss"] for r in metrics(tmp_path, n) if "val_loss" in r] for n in ("ddp", "one")]
    assert np.allclose(evals[0], evals[1], atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# bad input

def test_packing_on_a_dataset_without_starts_is_a_one_line_error(tmp_path, small_chat):
    import shutil
    old = str(tmp_path / "old")
    shutil.copytree(small_chat, old)
    meta = json.load(open(os.path.join(old, "dataset_metadata.json")))
    meta.pop("has_starts")
    for split in ("train", "val"):  # as prepare_dataset.py wrote it before starts existed
        meta["splits"][split].pop("starts")
        os.remove(os.path.join(old, split, "starts.bin"))
    json.dump(meta, open(os.path.join(old, "dataset_metadata.json"), "w"))
    assert BatchLoader(old, "train", 2, 16).get_batch()[0].shape == (2, 16)  # random windows still load
    with pytest.raises(DataError, match="re-run prepare_dataset.py"):
        PackedLoader(old, "train", 2, 16)
    r = run_cli("train.py", "--dataset_dir", old, "--packing", "true", "--out_dir", str(tmp_path / "ck"),
                "--max_iters", "2", "--n_layer", "1", "--n_embd", "16", "--n_head", "1", "--device", "cpu")
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "re-run prepare_dataset.py" in lines[0]
    assert "dataset_metadata.json" in lines[0] and "packing" in lines[0]


def test_model_refuses_half_a_packed_batch(small_chat):
    loader = PackedLoader(small_chat, "train", 2, 48, seed=0)
    batch = loader.get_batch()
    model = tiny_model(loader.data.vocab_size)
    with pytest.raises(ValueError, match="position_ids and doc_ids"):
        model(batch[0], position_ids=batch[3])
    assert set(packed_inputs(batch)) == {"position_ids", "doc_ids"} and packed_inputs(batch[:3]) == {}


def test_packing_on_text_trains(tmp_path):
    src = tmp_path / "small.txt"
    with open(SHAKESPEARE) as f:
        src.write_text(f.read()[:4000])
    data = str(tmp_path / "data")
    prepare_dataset.prepare([str(src)], data, tokenization="char", fmt="text")
    summary, lines = run(tmp_path, data, model_name="text", use_loss_mask=False, max_iters=3, eval_interval=3)
    assert any("packing 1 train documents (1 longer than block_size 48" in line for line in lines)
    assert np.isfinite(summary["val_loss"])


@pytest.mark.skipif(flex_attention is None, reason="this torch has no FlexAttention")
def test_flexattention_block_mask_equals_the_sdpa_mask():
    """The block mask CUDA uses under compile, run here through FlexAttention's eager (reference) path on CPU, gives
    what the SDPA mask gives: same documents, causal, padding on its own."""
    torch.manual_seed(0)
    doc = torch.tensor([[0] * 10 + [1] * 20 + [-1] * 10, [0] * 25 + [1] * 15])
    q, k, v = (torch.randn(2, 2, 40, 8) for _ in range(3))
    mask = DocumentMask(doc)
    sdpa = mask.attend(q, k, v, 0.0)
    mask.block_mask = _flex_block_mask(doc)
    assert (mask.attend(q, k, v, 0.0) - sdpa).abs().max() < 1e-5


def test_bench_packing_counts_only_the_tokens_trained(small_chat):
    import bench
    shape = dict(n_layer=1, n_head=2, n_embd=32)
    r = bench.packing_comparison(small_chat, shape, 4, 48, repeats=1, inner=1)
    loader = PackedLoader(small_chat, "train", 4, 48)
    assert r["fill"] == pytest.approx(loader.n.sum() / (loader.rows_per_epoch * 48)) and 0.5 < r["fill"] < 1
    packed_s, windows_s = (r["samples"][k]["wall"][0] for k in ("packed", "random windows"))
    assert r["tokens_per_s"]["packed"] == pytest.approx(r["fill"] * 4 * 48 / packed_s)
    assert r["tokens_per_s"]["random windows"] == pytest.approx(4 * 48 / windows_s)


# ---------------------------------------------------------------------------------------------------------------
# aligned windows: random windows that start at a conversation's BOS

@pytest.mark.parametrize("prepend_bos", [False, True])
def test_aligned_windows_are_the_stream_from_a_conversation_start(small_chat, prepend_bos):
    tokens, masks = stream(small_chat)
    data = Split(small_chat, "train", use_mask=True)
    starts = read_starts(small_chat, "train", data)
    bos = data.meta["eot_token"]
    T = 48
    bounds = data.offsets[1:-1]  # where one shard ends, the next begins
    loader = BatchLoader(small_chat, "train", 8, T, use_mask=True, prepend_bos=prepend_bos, seed=3, align=True)
    seen, crossed = set(), 0
    for _ in range(25):
        x, y, m = (t.numpy() for t in loader.get_batch())
        for b in range(len(x)):
            # the conversation whose BOS the window starts at: y is the stream after it, whatever prepend_bos does
            a = next(a for a in starts if a + 1 + T <= len(tokens) and (tokens[a + 1:a + 1 + T] == y[b]).all())
            assert tokens[a] == bos and x[b, 0] == bos  # every shipped conversation starts with its BOS
            assert (x[b, 1:] == tokens[a + 1:a + T]).all()  # never a second BOS put in front of the record's own
            assert (m[b] == masks[a + 1:a + 1 + T]).all()  # each target's mask, as unaligned windows have it
            seen.add(a)
            crossed += bool(((a < bounds) & (bounds <= a + T)).any())  # the window reads tokens a .. a + T
    assert len(seen) > 30 and crossed  # many conversations, and windows that run across a shard boundary


def test_aligned_windows_train_evaluate_and_resume_exactly(tmp_path, small_chat):
    common = dict(max_iters=8, lr_decay_iters=8, eval_interval=4, seed=7, batch_size=8, packing=False,
                  align_windows=True)
    summary, lines = run(tmp_path, small_chat, model_name="straight", **common)
    run(tmp_path, small_chat, model_name="halves", **{**common, "max_iters": 4})
    summary, lines = run(tmp_path, small_chat, model_name="halves", init_from="resume", **common)
    straight, halves = step_losses(tmp_path, "straight"), step_losses(tmp_path, "halves")
    assert len(straight) == 8 and straight == halves  # bit-identical, every step
    # the setting is part of the run: resuming without it is refused
    with pytest.raises(train.TrainError, match="'align_windows'"):
        run(tmp_path, small_chat, model_name="halves", init_from="resume", **{**common, "align_windows": False})
    # evaluation reads aligned windows too, so train and val losses measure the same thing
    cfg = load_config(None, {**SMALL, **common, "dataset_dir": small_chat, "out_dir": str(tmp_path / "ev")})
    r = train.setup(cfg, lambda *a: None)
    x = train.make_loader(r, "val", 0).get_batch()[0]
    assert (x[:, 0] == r.tok.eot_token).all()


def test_aligned_windows_refuse_packing_and_old_datasets_in_one_line(tmp_path, small_chat):
    from config import ConfigError
    with pytest.raises(ConfigError, match="'align_windows' and 'packing' both set"):
        load_config(None, {"align_windows": True, "packing": True})
    import shutil
    old = str(tmp_path / "old")
    shutil.copytree(small_chat, old)
    meta = json.load(open(os.path.join(old, "dataset_metadata.json")))
    meta.pop("has_starts")
    json.dump(meta, open(os.path.join(old, "dataset_metadata.json"), "w"))
    r = run_cli("train.py", "--dataset_dir", old, "--align_windows", "true", "--out_dir", str(tmp_path / "ck"),
                "--max_iters", "2", "--n_layer", "1", "--n_embd", "16", "--n_head", "1", "--device", "cpu")
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "re-run prepare_dataset.py" in lines[0] and "align_windows" in lines[0]
    assert not os.path.exists(tmp_path / "ck")  # refused before anything is written
