"""
Batched decoding: many generations on one GPT at once, each row with its own prompt length, sampling settings,
stop condition and limit.

    engine = Engine(model, tok, max_batch_size=8)
    for req, text, finish_reason in engine.run([Request(ids, max_tokens=50, temperature=0), ...]):
        print(text, end="")                       # each request's new text as it comes; finish_reason at its end

A request joins the running batch at the next step and leaves it when done (serve.py submits from many clients
while the batch decodes; sample.py runs --num_samples N as one batch). How a step works:
- a new request is prefilled alone (its prompt through the model in one pass, B = 1), exactly as GPT.generate
  does, and its keys/values are copied into a free row of the shared cache; its first token comes out right away;
- a decode step feeds every running row its last token at once: one (B, 1) forward, each row at its own position
  (a (B,) position tensor, so a BOS-zero model scales only a row's absolute position 0, which only a prefill
  ever sees) and attending to its own keys only (a key mask over the padded cache);
- every row samples with its own temperature / top-k / top-p and its own torch.Generator (model.sample_next),
  then checks its own stop tokens, stop strings and max_tokens; a finished or cancelled row leaves, and the last
  row moves into its slot, so the running rows are always cache rows [0, B) (slices, never gathers).
A row that fills the context (block_size) is re-read from its last block_size // 2 tokens, BOS kept, as
GPT.generate_stream does, so generation can run past block_size.

Exactness: a row alone in the engine computes exactly what GPT.generate computes (same prefill, same unmasked
decode). In a batch, fp32 logits differ from alone in the last bits (the BLAS and attention kernels block a
(8, C) product differently from a (1, C) one), so greedy tokens are the same unless two logits tie to ~1e-6.
"""

import random
from collections import deque
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from model import KVCache, sample_next


@dataclass(eq=False)  # a request is itself: compared by identity, never field by field
class Request:
    ids: list  # prompt token ids, BOS first; shorter than the model's block_size
    max_tokens: int  # at most this many new tokens (stop tokens included), then finish_reason "length"
    temperature: float = 1.0  # 0 = greedy
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None  # for this row's own generator; None: a random seed
    generator: torch.Generator | None = None  # or bring one (sample.py's --seed stream); overrides seed
    stop_tokens: tuple = ()  # token ids that end the reply (end of turn); never part of the text
    stop: tuple = ()  # strings: the text ends just before the first one found
    # set by the engine
    tokens: list = field(default_factory=list)  # new tokens so far (a stop token included)
    text: str = ""  # the text handed out so far
    finish_reason: str | None = None  # "stop", "length" or "cancelled"
    cancelled: bool = False
    deliver: object = None  # serve.py: where this request's events go (called on the decode thread)

    def cancel(self):
        """Free this request's row at the engine's next step (any thread may call it: a plain flag)."""
        self.cancelled = True


class RowCache(KVCache):
    """The shared cache of the running rows: k, v are (n_layer, max_rows, nh, block_size, hs); row i holds lens[i]
    tokens. Before each decode step the engine sets `rows` (rows [0, rows) run) and the key mask; GPT.forward
    reads `pos` (each row's own position) and advances it by one."""

    def __init__(self, shape, dtype, device):
        self.shape = shape
        self.k = torch.zeros(shape, dtype=dtype, device=device)  # zeros: a masked key's value must be finite
        self.v = torch.zeros(shape, dtype=dtype, device=device)  # (0 * NaN would poison the row that masks it)
        self.lens = torch.zeros(shape[1], dtype=torch.long, device=device)  # (max_rows,)
        self.rows, self.length = 0, 0  # rows in this step, and the keys they attend over (longest row + 1)

    @property
    def pos(self):
        return self.lens[:self.rows]  # (B,): GPT.embed gives each row its own position

    @pos.setter
    def pos(self, value):  # GPT.forward's `pos += 1`: the getter's view was already advanced in place
        self.lens[:self.rows] = value

    def update(self, layer, k, v):
        """Store each row's one new (B, nh, 1, hs) key/value at that row's own position."""
        B = k.size(0)
        at = torch.arange(B, device=k.device)
        self.k[layer, at, :, self.lens[:B]] = k[:, :, 0]  # (B, nh, hs) written at (row, :, lens[row])
        self.v[layer, at, :, self.lens[:B]] = v[:, :, 0]
        return self.k[layer, :B, :, :self.length], self.v[layer, :B, :, :self.length]  # (B, nh, L, hs)


class Engine:
    def __init__(self, model, tok, max_batch_size=8, autocast=nullcontext):
        self.model = model.eval()
        self.tok = tok
        self.max_batch_size = max_batch_size
        self.autocast = autocast  # a zero-argument context factory (sample.py's / serve.py's --dtype)
        cfg = model.config
        self.block_size = cfg.block_size
        self.device = next(model.parameters()).device
        self.shape = (cfg.n_layer, max_batch_size, cfg.n_head, cfg.block_size, cfg.n_embd // cfg.n_head)
        self.cache = None  # a RowCache, made at the first prefill (in the dtype the attention computes in)
        self.rows = []  # the running requests; row i of the cache is self.rows[i]
        self.last = []  # each running row's last token: sampled, not yet in the cache
        self.history = []  # each running row's whole sequence (prompt + new tokens), for a context re-read
        self.filled = []  # each running row's cached token count (as cache.lens, without a device sync)
        self.pending = deque()  # submitted, waiting for a free row

    def submit(self, req):
        """Queue a request; it joins the batch at the next step with a free row. Checked here, once."""
        if not req.ids:
            raise ValueError("a request needs at least one prompt token (BOS)")
        if len(req.ids) >= self.block_size:
            raise ValueError(f"prompt of {len(req.ids)} tokens: the model reads at most {self.block_size} "
                             f"(block_size), which leaves room for at most {self.block_size - 1} prompt tokens")
        if req.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {req.max_tokens}")
        if req.generator is None:
            seed = req.seed if req.seed is not None else random.SystemRandom().randrange(2 ** 63)
            req.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.pending.append(req)

    @property
    def busy(self):
        return bool(self.rows or self.pending)

    def clear(self):
        """Drop every running and waiting request (after a failed step, or at shutdown); returns them."""
        dropped = self.rows + list(self.pending)
        self.rows, self.last, self.history, self.filled = [], [], [], []
        self.pending.clear()
        return dropped

    def run(self, requests):
        """Submit requests and step until all are done, yielding (request, new text, finish_reason or None)."""
        for r in requests:
            self.submit(r)
        while self.busy:
            yield from self.step()

    @torch.no_grad()
    def step(self):
        """One step: drop cancelled rows; prefill waiting requests into free rows (their first tokens) if there
        are any, else one decode step of every running row. Returns the events [(request, text, finish)]."""
        for i in reversed(range(len(self.rows))):
            if self.rows[i].cancelled:
                self.rows[i].finish_reason = "cancelled"
                self._leave(i)
        while self.pending and self.pending[0].cancelled:
            self.pending.popleft().finish_reason = "cancelled"
        events = []
        with self.autocast():
            if self.pending and len(self.rows) < self.max_batch_size:
                while self.pending and len(self.rows) < self.max_batch_size:
                    req = self.pending.popleft()
                    if not req.cancelled:
                        self._join(req, events)
            elif self.rows:
                self._decode(events)
        return events

    def _prefill(self, ids, slot):
        """Read ids (a list) alone into cache row `slot`; returns the last position's (1, V) logits."""
        scratch = KVCache(self.shape[0], 1, self.shape[2], self.block_size, self.shape[4])
        x = torch.tensor([ids], dtype=torch.long, device=self.device)
        logits, _ = self.model(x, kv_cache=scratch, last_only=True)  # (1, 1, V); BOS-zero: position 0 scaled
        if self.cache is None:
            self.cache = RowCache(self.shape, scratch.k.dtype, self.device)
        n = len(ids)
        self.cache.k[:, slot, :, :n] = scratch.k[:, 0, :, :n]
        self.cache.v[:, slot, :, :n] = scratch.v[:, 0, :, :n]
        self.cache.lens[slot] = n
        return logits[:, -1, :]

    def _join(self, req, events):
        slot = len(self.rows)
        logits = self._prefill(req.ids, slot)
        self.rows.append(req)
        self.history.append(list(req.ids))
        self.filled.append(len(req.ids))
        self.last.append(None)
        self._emit(slot, self._sample(logits, [req])[0], events)
        self._drop_finished()

    def _decode(self, events):
        """One token for every running row; a row whose cache is full re-reads its context (alone) instead."""
        full_logits = {}
        for i in [i for i, n in enumerate(self.filled) if n == self.block_size]:
            # as generate_stream: the last block_size // 2 tokens (the unfed last one included), BOS-zero's BOS first
            h = self.history[i]
            ctx = self.model.context_window(torch.tensor([h]), len(h), self.block_size // 2)[0].tolist()
            full_logits[i] = self._prefill(ctx, i)
            self.filled[i] = len(ctx)
        c, B = self.cache, len(self.rows)
        lens = list(self.filled)
        c.rows, c.length = B, max(lens) + 1
        # rows of one length need no mask: then a row alone runs the very kernel GPT.generate runs
        c.mask = None if min(lens) == max(lens) else (
            torch.arange(c.length, device=self.device)[None, :] <= c.lens[:B, None])[:, None, None, :]  # (B, 1, 1, L)
        x = torch.tensor(self.last, dtype=torch.long, device=self.device)[:, None]  # (B, 1)
        logits, _ = self.model(x, kv_cache=c)  # (B, 1, V)
        logits = logits[:, -1, :]
        for i in range(B):
            self.filled[i] += 1
        for i, lg in full_logits.items():  # a re-read row's next token comes from its re-read: the step fed its
            logits[i] = lg[0]  # last token twice; putting its length back makes the next step overwrite that key
            c.lens[i] = self.filled[i] = lens[i]
        for i, t in enumerate(self._sample(logits, self.rows)):
            self._emit(i, t, events)
        self._drop_finished()

    def _sample(self, logits, reqs):
        """(B, V) logits -> one token per row (a list), each row with its own settings and generator."""
        greedy = [i for i, r in enumerate(reqs) if r.temperature == 0]
        out = [0] * len(reqs)
        if greedy:  # argmax row by row is the same alone or together: one call for all greedy rows
            for i, t in zip(greedy, torch.argmax(logits[greedy].float(), dim=-1).tolist()):
                out[i] = t
        for i, r in enumerate(reqs):
            if r.temperature != 0:
                out[i] = int(sample_next(logits[i:i + 1], r.temperature, r.top_k, r.top_p, r.generator)[0])
        return out

    def _emit(self, i, t, events):
        """Row i sampled token t: record it, find its text and whether it stops."""
        req = self.rows[i]
        req.tokens.append(t)
        self.history[i].append(t)
        self.last[i] = t
        if t in req.stop_tokens:
            ended, reason = True, "stop"
            new = req.tokens[:-1]
        else:
            ended, reason = len(req.tokens) >= req.max_tokens, "length"
            new = req.tokens
        text, stopped = self._text(req, self.tok.decode(new), final=ended)
        if stopped:
            ended, reason = True, "stop"
        delta = text[len(req.text):]
        req.text = text
        if ended:
            req.finish_reason = reason
        if delta or ended:
            events.append((req, delta, reason if ended else None))

    @staticmethod
    def _text(req, full, final):
        """What of the decoded text `full` may be handed out: (text, stopped). The text ends before the first
        stop string; until the end it holds back half a multi-byte character (decoded as U+FFFD) and any tail
        that could be the start of a stop string."""
        cut = min((k for k in (full.find(s) for s in req.stop if s) if k >= 0), default=-1)
        if cut >= 0:
            return full[:cut], True
        if final:
            return full, False
        end = len(full)
        while end > len(req.text) and full[end - 1] == "\ufffd":
            end -= 1
        hold = max((n for s in req.stop for n in range(1, min(len(s) - 1, end) + 1) if full[end - n:end] == s[:n]),
                   default=0)
        return full[:max(end - hold, len(req.text))], False

    def _drop_finished(self):
        for i in reversed(range(len(self.rows))):
            if self.rows[i].finish_reason is not None:
                self._leave(i)

    def _leave(self, i):
        """Row i is done: the last running row moves into its slot (one copy of that row's cached tokens)."""
        last = len(self.rows) - 1
        if i != last:
            n = self.filled[last]
            self.cache.k[:, i, :, :n] = self.cache.k[:, last, :, :n]
            self.cache.v[:, i, :, :n] = self.cache.v[:, last, :, :n]
            self.cache.lens[i] = self.cache.lens[last]
        for lst in (self.rows, self.last, self.history, self.filled):
            lst[i] = lst[last]
            lst.pop()
