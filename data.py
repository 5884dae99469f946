"""
The data loader: random windows from memmapped token shards, as (X, Y) or (X, Y, M) batches.

A dataset folder (written by prepare_dataset.py) holds dataset_metadata.json, tokenizer_state.json and
{train,val}/shard_NNNNN.bin (raw token arrays) with, for chat data, shard_NNNNN_mask.bin (uint8, same length).
For a window starting at token i of a shard:
    X = tok[i : i+T]      Y = tok[i+1 : i+T+1]      M = mask[i+1 : i+T+1]   (the mask of each *target*)
With prepend_bos (BOS zero training) every window starts with the BOS token and carries one token less of data:
    X = [BOS] + tok[i : i+T-1]      Y = tok[i : i+T]      M = mask[i : i+T]
Windows never cross a shard boundary; shards are picked in proportion to their length, so every token is
equally likely to be seen. The sampling RNG is a numpy Generator whose state is saved in checkpoints, so a
resumed run draws exactly the windows the uninterrupted run would have drawn.

PackedLoader (packing: true) trains on whole conversations instead: every row holds whole conversations
(documents, for text data) packed best-fit-decreasing up to block_size, the rest padded with targets of -1
(they count nowhere). With each batch come position ids that restart at 0 for every conversation and document
ids, from which the model builds a block-diagonal causal mask: inside a row a conversation computes exactly what
it computes alone. Epochs are real passes (each conversation once, in a seeded shuffle); its place (epoch, micro-
batch) goes into the checkpoint. It needs the starts.bin that prepare_dataset.py writes beside the shards.
"""

import json
import os

import numpy as np
import torch

from errors import GPTLabError


class DataError(GPTLabError, ValueError):
    """Dataset files that do not agree with each other or with the request: names the file and the fix."""


def read_metadata(dataset_dir):
    if not os.path.isdir(dataset_dir):
        raise DataError(f"{dataset_dir}: dataset folder not found (create it with prepare_dataset.py --out_dir {dataset_dir})")
    path = os.path.join(dataset_dir, "dataset_metadata.json")
    try:
        with open(path) as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise DataError(f"{path}: missing (prepare the dataset with prepare_dataset.py)") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg}); re-run prepare_dataset.py") from None
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text; re-run prepare_dataset.py") from None
    for key in ("token_dtype", "vocab_size", "splits"):
        if key not in meta:
            raise DataError(f"{path}: no '{key}' entry; re-run prepare_dataset.py")
    if meta["token_dtype"] not in ("uint16", "uint32"):
        raise DataError(f"{path}: token_dtype '{meta['token_dtype']}' is not uint16 or uint32")
    return meta


class Split:
    """The memmapped shards of one split, checked against the metadata."""

    def __init__(self, dataset_dir, split, use_mask):
        meta = read_metadata(dataset_dir)
        self.meta = meta
        if split not in meta["splits"]:
            raise DataError(f"{dataset_dir}/dataset_metadata.json: no '{split}' split")
        dtype = np.dtype(meta["token_dtype"])
        self.tokens, self.masks, self.names = [], [], []
        expected_masks = []
        for shard in meta["splits"][split]["shards"]:
            path = os.path.join(dataset_dir, split, shard["file"])
            if not os.path.exists(path):
                raise DataError(f"{path}: shard listed in dataset_metadata.json is missing")
            size = os.path.getsize(path)
            if size != shard["tokens"] * dtype.itemsize:
                raise DataError(f"{path}: {size} bytes, but dataset_metadata.json says {shard['tokens']} tokens of "
                                f"{dtype.name} ({shard['tokens'] * dtype.itemsize} bytes): the shard or the metadata is "
                                f"stale or truncated; re-run prepare_dataset.py")
            self.tokens.append(np.memmap(path, dtype=dtype, mode="r"))
            self.names.append(path)
            mask_path = path[: -len(".bin")] + "_mask.bin"
            expected_masks.append(mask_path)
            if use_mask and os.path.exists(mask_path):
                if os.path.getsize(mask_path) != shard["tokens"]:
                    raise DataError(f"{mask_path}: {os.path.getsize(mask_path)} mask bytes but {path} holds "
                                    f"{shard['tokens']} tokens: mask and token shards must have the same length")
                self.masks.append(np.memmap(mask_path, dtype=np.uint8, mode="r"))
        if use_mask and len(self.masks) != len(self.tokens):
            missing = [p for p in expected_masks if not os.path.exists(p)]
            raise DataError(f"use_loss_mask is on but mask shards are missing: {', '.join(missing[:3])}"
                            f"{' ...' if len(missing) > 3 else ''} (prepare chat data with prepare_dataset.py --format "
                            f"chat, or set use_loss_mask false)")
        self.lengths = np.array([len(t) for t in self.tokens], dtype=np.int64)
        self.num_tokens = int(self.lengths.sum())
        self.vocab_size = int(meta["vocab_size"])
        self.mask_tokens = None  # mask-1 tokens of the split (use_mask only): what the masked loss can train on
        if use_mask:
            recorded = meta["splits"][split].get("mask_tokens")
            self.mask_tokens = recorded if recorded is not None else int(sum(int(m.sum()) for m in self.masks))
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths)])  # where each shard begins in the split's stream

    def shard_of(self, offset):
        """The index of the shard holding the split stream's token at `offset`."""
        return int(np.searchsorted(self.offsets, offset, side="right")) - 1

    def read(self, arrays, start, stop):
        """[start, stop) of the split's stream (the shards of `arrays`, self.tokens or self.masks, back to back):
        a packed conversation may run across a shard boundary."""
        first = self.shard_of(start)
        parts = []
        while start < stop:
            end = min(stop, int(self.offsets[first + 1]))
            parts.append(arrays[first][start - self.offsets[first]:end - self.offsets[first]])
            start, first = end, first + 1
        return parts[0] if len(parts) == 1 else np.concatenate(parts)


class BatchLoader:
    """Random (X, Y[, M]) windows of block_size tokens from one split, as int64 tensors on `device`.
    Each rank of a distributed run seeds its own generator (seed + rank), so ranks see different windows.
    align: every window starts where a conversation (or document) starts, at its BOS, instead of at any token
    (aligned_starts)."""

    def __init__(self, dataset_dir, split, batch_size, block_size, device="cpu", use_mask=False, prepend_bos=False,
                 bos_token=None, seed=1337, rank=0, model_vocab_size=None, align=False):
        self.data = Split(dataset_dir, split, use_mask)
        self.split, self.batch_size, self.block_size = split, batch_size, block_size
        self.device = torch.device(device)
        self.use_mask, self.prepend_bos = use_mask, prepend_bos
        self.bos_token = bos_token if bos_token is not None else self.data.meta.get("eot_token")
        if prepend_bos and self.bos_token is None:
            raise DataError(f"{dataset_dir}/dataset_metadata.json: no eot_token to use as BOS; re-run prepare_dataset.py")
        self.span = block_size + (0 if prepend_bos else 1)  # tokens read from the shard per window
        usable = np.maximum(self.data.lengths - self.span + 1, 0)  # valid start offsets per shard
        if usable.sum() == 0:
            raise DataError(f"{dataset_dir}/{split}: no shard holds the {self.span} tokens a window of block_size "
                            f"{block_size} needs (largest has {self.data.lengths.max() if len(usable) else 0}); lower "
                            f"block_size or add data")
        self.probs = usable / usable.sum()
        self.usable = usable
        self.starts = None  # where windows may start: None = any token
        if align:
            self.starts = aligned_starts(dataset_dir, split, self.data, self.span, prepend_bos, self.bos_token)
        self.vocab_limit = model_vocab_size or self.data.vocab_size
        self.rng = np.random.default_rng(seed + 1000 * rank)
        self.pin = self.device.type == "cuda"

    def get_batch(self):
        if self.starts is None:  # any token: a shard by its share of the usable starts, then a start in it
            shard_ids = self.rng.choice(len(self.probs), size=self.batch_size, p=self.probs)
            starts = (self.rng.random(self.batch_size) * self.usable[shard_ids]).astype(np.int64)
            starts = starts + self.data.offsets[shard_ids]  # (B,) offsets into the split's stream
        else:  # aligned: a conversation start, each as likely
            starts = self.starts[self.rng.integers(0, len(self.starts), size=self.batch_size)]
        toks = np.stack([self.data.read(self.data.tokens, i, i + self.span) for i in starts]).astype(np.int64)
        if toks.max() >= self.vocab_limit:
            bad = starts[int(np.argmax(toks.max(axis=1) >= self.vocab_limit))]
            raise DataError(f"{self.data.names[self.data.shard_of(bad)]}: token id {int(toks.max())} >= vocab_size "
                            f"{self.vocab_limit}: the shard was made with another tokenizer; re-run prepare_dataset.py")
        if self.prepend_bos:
            x = np.concatenate([np.full((self.batch_size, 1), self.bos_token, dtype=np.int64), toks[:, :-1]], axis=1)
            y = toks
        else:
            x, y = toks[:, :-1], toks[:, 1:]
        batch = [torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(y))]
        if self.use_mask:
            off = 0 if self.prepend_bos else 1  # the mask of each target token
            m = np.stack([self.data.read(self.data.masks, i + off, i + off + self.block_size) for i in starts])
            batch.append(torch.from_numpy(m.astype(np.int64)))
        if self.pin:  # pinned host memory lets the copy to the GPU overlap with compute
            return tuple(t.pin_memory().to(self.device, non_blocking=True) for t in batch)
        return tuple(t.to(self.device) for t in batch)

    def state_dict(self):
        return {"rng": json.dumps(self.rng.bit_generator.state)}  # JSON string: checkpoints hold plain data only

    def load_state_dict(self, state):
        if state.get("packing"):
            raise DataError("the checkpoint's data loader packed whole conversations (packing true): resume with "
                            "packing true")
        self.rng.bit_generator.state = json.loads(state["rng"])

    def tokens_per_batch(self):
        return self.batch_size * self.block_size


# ---------------------------------------------------------------------------------------------------------------
# packing: whole conversations per row

def read_starts(dataset_dir, split, data):
    """The split's record starts (int64 offsets into its token stream, one per conversation or document), from the
    starts.bin prepare_dataset.py writes, checked against the shards."""
    info = data.meta["splits"][split].get("starts")
    if not data.meta.get("has_starts") or info is None:
        raise DataError(f"{os.path.join(dataset_dir, 'dataset_metadata.json')}: no conversation starts (prepared before "
                        f"packing existed): re-run prepare_dataset.py on its input files to train with packing true "
                        f"or align_windows true")
    path = os.path.join(dataset_dir, split, info["file"])
    if info["count"] == 0:
        return np.zeros(0, dtype=np.int64)
    if not os.path.exists(path) or os.path.getsize(path) != 8 * info["count"]:
        raise DataError(f"{path}: missing or not {info['count']} uint64 offsets as dataset_metadata.json says; re-run "
                        f"prepare_dataset.py")
    starts = np.fromfile(path, dtype=np.uint64).astype(np.int64)
    if starts[0] != 0 or np.any(np.diff(starts) <= 0) or starts[-1] > data.num_tokens - 2:
        raise DataError(f"{path}: offsets are not increasing inside the split's {data.num_tokens} tokens: the file is "
                        f"stale or corrupt; re-run prepare_dataset.py")
    return starts


def aligned_starts(dataset_dir, split, data, span, prepend_bos, bos_token):
    """Where the aligned windows of BatchLoader(align=True) may start: each conversation's (or document's) start
    offset in the split's stream, whose token is its BOS (the stream's first record may have none, as
    PackedLoader checks), keeping those with a whole window of `span` tokens after them. With prepend_bos the loader
    puts a BOS in front itself, so a window starts one token later, after the record's own BOS: never two in a row.
    Why: a random window starts inside a conversation about half the time, and the answers of that first, cut
    conversation are trained without their question, which is noise for a model that must copy from it."""
    starts = read_starts(dataset_dir, split, data)
    if prepend_bos:
        first_has_bos = int(data.read(data.tokens, 0, 1)[0]) == bos_token
        starts = starts + 1
        starts[0] -= not first_has_bos  # a first record without a BOS starts at its first token
    starts = starts[starts + span <= data.num_tokens]
    if len(starts) == 0:
        raise DataError(f"{dataset_dir}/{split}: no conversation starts with the {span} tokens after it that a "
                        f"window of that size needs ({data.num_tokens} tokens in all); lower block_size or add data")
    return starts


def record_pieces(starts, num_tokens, first_has_bos, block_size):
    """Every record (conversation or document) as the pieces a row can hold, as arrays (first target t0, positions
    n, bos, record index). Record i's targets are the stream tokens (starts[i], starts[i+1]] (through the last token
    for the last record); a piece of n positions trains n targets t0 .. t0+n-1. A record's first piece reads
    tok[t0-1 : t0+n] and so starts at the record's own BOS. A record longer than block_size goes on in pieces of
    block_size positions that each start with a BOS put in front (bos True: [BOS] + tok[t0 : t0+n]), so every piece
    is a sequence with a BOS at position 0 and every target is trained once per epoch (footgun: the tokens before a
    cut are not context after it). The first document of a text split has no BOS of its own: it gets one in front
    (first_has_bos False), which also trains its first token."""
    ends = np.append(starts[1:], num_tokens - 1)
    first = starts + 1
    if not first_has_bos:
        first[0] = 0
    count = ends - first + 1  # targets per record
    per = -(-count // block_size)  # pieces per record
    record = np.repeat(np.arange(len(starts)), per)
    k = np.arange(int(per.sum())) - np.repeat(np.cumsum(per) - per, per)  # the piece's index inside its record
    t0 = first[record] + k * block_size
    n = np.minimum(block_size, ends[record] - t0 + 1)
    bos = (k > 0) | ((record == 0) & (not first_has_bos))
    return t0, n, bos, record, int(np.count_nonzero(per > 1))


def best_fit_decreasing(lengths, order, capacity):
    """Pack items into rows of `capacity`: longest first (equal lengths keep their place in `order`, a shuffle),
    each into the open row with the least room that still fits it, else into a new row. Returns rows as lists of
    item indices. The row count depends only on the lengths, so every epoch has the same number of rows."""
    lengths = lengths.tolist()
    items = order[np.argsort(-np.asarray(lengths)[order], kind="stable")].tolist()
    rows = []
    open_at = [[] for _ in range(capacity + 1)]  # open_at[r]: the rows with exactly r positions left
    has_room = np.zeros(capacity + 1, dtype=bool)
    for i in items:
        need = lengths[i]
        fit = np.flatnonzero(has_room[need:])
        if len(fit):
            room = need + int(fit[0])
            row = open_at[room].pop()
            has_room[room] = bool(open_at[room])
        else:
            room, row = capacity, len(rows)
            rows.append([])
        rows[row].append(i)
        if room > need:
            open_at[room - need].append(row)
            has_room[room - need] = True
    return rows


class PackedLoader:
    """(X, Y, M, P, D) batches of rows of whole conversations: X, Y (B, T) inputs and targets (-1 on padding),
    M (B, T) the loss mask of each target (use_mask; else 1 on every real target), P (B, T) position ids (0 at each
    conversation's BOS), D (B, T) document ids (the piece's index in its row; -1 on padding).
    An epoch: a seeded shuffle of every piece (record_pieces), packed best-fit-decreasing into rows, the rows
    shuffled. An optimizer step takes batch_size * accum * world rows of the epoch; micro-batch j of rank r gets
    slot j * world + r of them. The last step of an epoch takes what is left, spread over the micro-batches (one
    empty row where none is left): no step mixes two epochs, so an epoch is exactly steps_per_epoch steps. Every
    rank computes the same plan (the seed does not depend on the rank) and takes its own rows."""

    def __init__(self, dataset_dir, split, batch_size, block_size, device="cpu", use_mask=False, bos_token=None,
                 seed=1337, rank=0, world=1, accum=1, model_vocab_size=None):
        self.data = Split(dataset_dir, split, use_mask)
        self.split, self.batch_size, self.block_size = split, batch_size, block_size
        self.device, self.use_mask = torch.device(device), use_mask
        self.rank, self.world, self.accum, self.seed = rank, world, accum, seed
        self.bos_token = bos_token if bos_token is not None else self.data.meta.get("eot_token")
        if self.bos_token is None:
            raise DataError(f"{dataset_dir}/dataset_metadata.json: no eot_token to use as BOS; re-run prepare_dataset.py")
        starts = read_starts(dataset_dir, split, self.data)
        if len(starts) == 0:
            raise DataError(f"{dataset_dir}/{split}: the split is empty, nothing to pack (prepare_dataset.py "
                            f"--val_fraction 0 leaves val empty): prepare it with a val_fraction above 0")
        first_has_bos = int(self.data.read(self.data.tokens, 0, 1)[0]) == self.bos_token
        self.t0, self.n, self.bos, self.record, self.num_split = record_pieces(
            starts, self.data.num_tokens, first_has_bos, block_size)
        self.num_records = len(starts)
        self.vocab_limit = model_vocab_size or self.data.vocab_size
        self.rows_per_step = batch_size * accum * world
        self.rows_per_epoch = len(self._plan(0))
        self.steps_per_epoch = -(-self.rows_per_epoch // self.rows_per_step)
        self.epoch, self.micro = 0, 0  # the next micro-batch: epoch, and its index among this rank's in the epoch
        self.pin = self.device.type == "cuda"

    def _plan(self, epoch):
        """The rows of an epoch, in the order they are trained: lists of piece indices."""
        cached = getattr(self, "_cached", None)
        if cached is None or cached[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            rows = best_fit_decreasing(self.n, rng.permutation(len(self.n)), self.block_size)
            self._cached = (epoch, [rows[i] for i in rng.permutation(len(rows))])
        return self._cached[1]

    def rows_of(self, epoch, micro):
        """This rank's rows (lists of piece indices) for micro-batch `micro` of `epoch`."""
        step, j = divmod(micro, self.accum)
        rows = self._plan(epoch)[step * self.rows_per_step:(step + 1) * self.rows_per_step]
        slots = np.array_split(np.arange(len(rows)), self.accum * self.world)
        return [rows[i] for i in slots[j * self.world + self.rank]] or [[]]  # [[]]: one empty row

    def get_batch(self):
        rows = self.rows_of(self.epoch, self.micro)
        self.micro += 1
        if self.micro == self.steps_per_epoch * self.accum:
            self.epoch, self.micro = self.epoch + 1, 0
        return self.batch(rows)

    def batch(self, rows):
        B, T = len(rows), self.block_size
        x = np.full((B, T), self.bos_token, dtype=np.int64)  # padding: any valid id; its targets are -1
        y = np.full((B, T), -1, dtype=np.int64)
        m = np.zeros((B, T), dtype=np.int64)
        pos = np.tile(np.arange(T, dtype=np.int64), (B, 1))  # padding keeps its column: never 0 after a piece
        doc = np.full((B, T), -1, dtype=np.int64)
        for b, row in enumerate(rows):
            col = 0
            for j, p in enumerate(row):
                t0, n, bos = int(self.t0[p]), int(self.n[p]), bool(self.bos[p])
                seq = self.data.read(self.data.tokens, t0 - (0 if bos else 1), t0 + n).astype(np.int64)
                if bos:
                    seq = np.concatenate([[self.bos_token], seq])
                x[b, col:col + n], y[b, col:col + n] = seq[:-1], seq[1:]
                m[b, col:col + n] = self.data.read(self.data.masks, t0, t0 + n) if self.use_mask else 1
                pos[b, col:col + n] = np.arange(n)
                doc[b, col:col + n] = j
                col += n
        if max(x.max(), y.max()) >= self.vocab_limit:
            raise DataError(f"{self.data.names[0]}: token id {int(max(x.max(), y.max()))} >= vocab_size "
                            f"{self.vocab_limit}: the shards were made with another tokenizer; re-run prepare_dataset.py")
        batch = [torch.from_numpy(a) for a in (x, y, m, pos, doc)]
        if self.pin:
            return tuple(t.pin_memory().to(self.device, non_blocking=True) for t in batch)
        return tuple(t.to(self.device) for t in batch)

    def summary(self):
        real = int(self.n.sum())
        kind = "conversations" if self.data.meta.get("format") == "chat" else "documents"
        return (f"packing {self.num_records:,} {self.split} {kind} ({self.num_split:,} longer than block_size "
                f"{self.block_size}, split into pieces) into {self.rows_per_epoch:,} rows per epoch, "
                f"{100 * real / (self.rows_per_epoch * self.block_size):.1f}% of positions filled")

    def state_dict(self):
        return {"packing": True, "epoch": self.epoch, "micro": self.micro, "seed": self.seed,
                "rows_per_step": self.rows_per_step}

    def load_state_dict(self, state):
        if not state.get("packing"):
            raise DataError("the checkpoint's data loader drew random windows (packing false): resume with packing false")
        if (state["seed"], state["rows_per_step"]) != (self.seed, self.rows_per_step):
            raise DataError(f"the checkpoint's packed loader took {state['rows_per_step']} rows per step with seed "
                            f"{state['seed']}; now {self.rows_per_step} with seed {self.seed}: resume with the same "
                            f"batch_size, gradient_accumulation_steps, number of ranks and seed")
        self.epoch, self.micro = state["epoch"], state["micro"]

    def tokens_per_batch(self):
        return self.batch_size * self.block_size
