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


class BatchLoader:
    """Random (X, Y[, M]) windows of block_size tokens from one split, as int64 tensors on `device`.
    Each rank of a distributed run seeds its own generator (seed + rank), so ranks see different windows."""

    def __init__(self, dataset_dir, split, batch_size, block_size, device="cpu", use_mask=False, prepend_bos=False,
                 bos_token=None, seed=1337, rank=0, model_vocab_size=None):
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
        self.vocab_limit = model_vocab_size or self.data.vocab_size
        self.rng = np.random.default_rng(seed + 1000 * rank)
        self.pin = self.device.type == "cuda"

    def get_batch(self):
        shard_ids = self.rng.choice(len(self.probs), size=self.batch_size, p=self.probs)
        starts = (self.rng.random(self.batch_size) * self.usable[shard_ids]).astype(np.int64)
        toks = np.stack([self.data.tokens[s][i:i + self.span] for s, i in zip(shard_ids, starts)]).astype(np.int64)
        if toks.max() >= self.vocab_limit:
            bad = int(np.argmax(toks.max(axis=1) >= self.vocab_limit))
            raise DataError(f"{self.data.names[shard_ids[bad]]}: token id {int(toks.max())} >= vocab_size "
                            f"{self.vocab_limit}: the shard was made with another tokenizer; re-run prepare_dataset.py")
        if self.prepend_bos:
            x = np.concatenate([np.full((self.batch_size, 1), self.bos_token, dtype=np.int64), toks[:, :-1]], axis=1)
            y = toks
        else:
            x, y = toks[:, :-1], toks[:, 1:]
        batch = [torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(y))]
        if self.use_mask:
            off = 0 if self.prepend_bos else 1  # the mask of each target token
            m = np.stack([self.data.masks[s][i + off:i + off + self.block_size] for s, i in zip(shard_ids, starts)])
            batch.append(torch.from_numpy(m.astype(np.int64)))
        if self.pin:  # pinned host memory lets the copy to the GPU overlap with compute
            return tuple(t.pin_memory().to(self.device, non_blocking=True) for t in batch)
        return tuple(t.to(self.device) for t in batch)

    def state_dict(self):
        return {"rng": json.dumps(self.rng.bit_generator.state)}  # JSON string: checkpoints hold plain data only

    def load_state_dict(self, state):
        self.rng.bit_generator.state = json.loads(state["rng"])

    def tokens_per_batch(self):
        return self.batch_size * self.block_size
