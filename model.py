"""
GPT-2 in one file: the model, its loss (masked or not), and KV-cache generation.

Module names are GPT-2's own (transformer.wte, transformer.h.N.attn.c_attn, ...) so that converting a Hugging
Face checkpoint is a plain key map (convert_hf.py). Two flags live on the model rather than in hooks:
- use_bos_zero_training: the input at absolute position 0 (token + position embedding) is multiplied by
  bos_scaling_factor, in training, evaluation and generation alike (the KV cache never rescales a new token);
- the explicit attention path (attn_out=[]): attention weights are computed by hand and handed back, because the
  fused SDPA kernel returns none. Used by evaluate.py --attention; training always takes the fused kernel.
Activation checkpointing (set_activation_checkpointing; train.py's activation_checkpointing) is an attribute of the
model, not a GPTConfig field: checkpoints store GPTConfig as the architecture, and this is a training setting.
Packed rows (data.PackedLoader): forward also takes position_ids, which restart at 0 for every conversation, and
doc_ids, from which one DocumentMask (block-diagonal causal) is built per forward and shared by every layer; a
conversation in a packed row then computes exactly what it computes alone. BOS zero scales every position 0.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

try:  # FlexAttention (torch >= 2.5): on CUDA under torch.compile it skips the blocks a packed row's mask rules out
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
except ImportError:
    create_block_mask = flex_attention = None

from errors import InputError


@dataclass
class GPTConfig:
    block_size: int = 1024  # the longest sequence the model reads (learned position embeddings)
    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 64: faster matmuls, pad rows never used
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0  # on embeddings, attention weights and residual branches; 0 for pretraining small models
    bias: bool = True  # biases in Linear and LayerNorm like GPT-2; False is slightly better and faster
    activation_function: str = "gelu_new"  # gelu_new: GPT-2's tanh GELU | gelu: exact (erf), nanoGPT's; HF's names
    use_bos_zero_training: bool = False  # scale the input at absolute position 0 by bos_scaling_factor
    bos_scaling_factor: float = 0.01  # in [0, 1]; 1.0 is the same as the flag off; 0.0 is allowed and stable


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (PyTorch's nn.LayerNorm cannot drop just the bias)."""

    def __init__(self, ndim, bias):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class KVCache:
    """Keys and values of every layer, preallocated for the whole generation: k, v are (n_layer, B, nh, T_max, hs).
    `pos` counts the tokens already cached; GPT.forward advances it after the last layer. Every row has the same
    length here; engine.py's cache holds rows of different lengths (a (B,) tensor `pos` and a key mask)."""
    mask = None  # (B, 1, T, Tk) bool: which cached keys each row's queries may see; None: all of them

    def __init__(self, n_layer, batch_size, n_head, max_len, head_size):
        self.shape = (n_layer, batch_size, n_head, max_len, head_size)
        self.k = self.v = None  # allocated on first use, in the dtype the attention computes in (bf16 under autocast)
        self.pos = 0

    def update(self, layer, k, v):
        """Store this step's (B, nh, T, hs) keys/values at [pos, pos+T) and return all of them so far."""
        if self.k is None:
            self.k = torch.empty(self.shape, dtype=k.dtype, device=k.device)
            self.v = torch.empty(self.shape, dtype=v.dtype, device=v.device)
        end = self.pos + k.size(2)
        self.k[layer, :, :, self.pos:end] = k
        self.v[layer, :, :, self.pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]  # (B, nh, end, hs)


class DocumentMask:
    """The attention mask of packed rows: query i sees key j iff j <= i and both belong to the same document
    (doc_ids (B, T); padding has its own id). Built once per forward and shared by every layer: `allowed` (B, 1, T, T)
    for SDPA; the additive form (-inf where not allowed) for the explicit path, made once per dtype. On CUDA under
    torch.compile with FlexAttention available, a BlockMask too, so the kernel skips whole masked blocks (not
    testable on a CPU-only machine; the SDPA path is the fallback and the reference)."""

    def __init__(self, doc_ids):
        T = doc_ids.size(1)
        causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()  # (T, T)
        self.allowed = ((doc_ids[:, :, None] == doc_ids[:, None, :]) & causal)[:, None]  # (B, 1, T, T)
        self._additive = {}
        self.block_mask = None
        if doc_ids.is_cuda and flex_attention is not None and torch.compiler.is_compiling():
            self.block_mask = _flex_block_mask(doc_ids)

    def additive(self, dtype):
        if dtype not in self._additive:
            zeros = torch.zeros(self.allowed.shape, dtype=dtype, device=self.allowed.device)
            self._additive[dtype] = zeros.masked_fill_(~self.allowed, float("-inf"))  # (B, 1, T, T)
        return self._additive[dtype]

    def attend(self, q, k, v, dropout_p):
        if self.block_mask is not None and dropout_p == 0.0:  # FlexAttention has no dropout
            return flex_attention(q, k, v, block_mask=self.block_mask)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.allowed, dropout_p=dropout_p)


def _flex_block_mask(doc_ids):
    def same_document_causal(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (doc_ids[b, q_idx] == doc_ids[b, kv_idx])
    B, T = doc_ids.shape
    return create_block_mask(same_document_causal, B, None, T, T, device=doc_ids.device)


# built eagerly, outside the compiled graph, as torch's FlexAttention examples do. Only where CUDA is: the decorator
# imports torch._dynamo, which adds 2 s to the start of every process (a CPU-only one never calls it)
if flex_attention is not None and torch.cuda.is_available():
    _flex_block_mask = torch.compiler.disable(_flex_block_mask)


def explicit_attention_weights(q, k, mask):
    """softmax(q k^T / sqrt(hs) + mask) written out: q (B, nh, T, hs), k (B, nh, Tk, hs), an additive mask (-inf
    where a query must not look) broadcastable to (B, nh, T, Tk) -> (B, nh, T, Tk). One baddbmm folds the scale
    and the mask into the product: two fewer passes over the (T, Tk) scores than q @ k^T * scale + mask."""
    B, nh, T, hs = q.shape
    Tk = k.size(2)
    mask = mask.expand(B, nh, T, Tk).reshape(B * nh, T, Tk) if mask.dim() == 4 else mask  # (B*nh, T, Tk) or (T, Tk)
    att = torch.baddbmm(mask, q.reshape(B * nh, T, hs), k.reshape(B * nh, Tk, hs).transpose(1, 2),
                        alpha=1.0 / math.sqrt(hs))  # (B*nh, T, Tk)
    return F.softmax(att, dim=-1).view(B, nh, T, Tk)


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0, "n_embd must be divisible by n_head"
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v for all heads at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout

    def forward(self, x, kv_cache=None, layer=0, attn_out=None, doc_mask=None):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        rows_mask = None
        if kv_cache is not None:
            k, v = kv_cache.update(layer, k, v)  # (B, nh, Tk, hs), Tk = cached + T
            rows_mask = kv_cache.mask  # rows of different lengths (engine.py): each sees only its own keys
        Tk = k.size(2)
        # PyTorch's fused CPU attention kernel is slow on short sequences: there the written-out product is faster
        # at the same loss (bench.py): the whole training step 1.5x in bf16 up to 512 tokens (AVX512-BF16 CPU), and
        # attention 1.2x-2.5x in fp32 up to 256 (AVX2 and AVX-512 kernels). Beyond that the fused kernel wins, and
        # its memory stays linear in T.
        short = x.device.type == "cpu" and T > 1 and Tk <= (512 if q.dtype == torch.bfloat16 else 256)
        if attn_out is not None or short:
            if doc_mask is not None:
                future = doc_mask.additive(q.dtype)  # (B, 1, T, T): also -inf across documents
            else:
                future = torch.full((T, Tk), float("-inf"), dtype=q.dtype, device=q.device).triu(Tk - T + 1)  # (T, Tk)
            if rows_mask is not None:
                future = future.masked_fill(~rows_mask, float("-inf"))  # (B, 1, T, Tk)
            att = explicit_attention_weights(q, k, future)  # (B, nh, T, Tk)
            if attn_out is not None:
                attn_out.append(att.detach())
            y = self.attn_dropout(att) @ v  # (B, nh, T, hs)
        else:
            dropout_p = self.dropout if self.training else 0.0
            if doc_mask is not None:  # packed rows: block-diagonal causal
                y = doc_mask.attend(q, k, v, dropout_p)
            elif rows_mask is not None:  # one new token per row, rows of different lengths (engine.py)
                assert T == 1, "a per-row key mask is for one-token decode steps"
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=rows_mask, dropout_p=dropout_p)
            elif Tk == T:  # whole sequence at once: training, evaluation, prefill
                y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
            elif T == 1:  # one new token attends to everything cached: no mask needed
                y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
            else:  # a chunk after a cached prefix: query i sees keys up to Tk - T + i
                causal = torch.ones(T, Tk, dtype=torch.bool, device=x.device).tril(diagonal=Tk - T)
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=causal, dropout_p=dropout_p)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble all head outputs side by side
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        # GPT-2 used the tanh approximation (gelu_new): keep it for exact parity with GPT-2 checkpoints. A model
        # trained from scratch can take the exact one (gelu), whose CPU kernel is 2x-3x faster on AVX2
        self.gelu = nn.GELU(approximate="tanh" if config.activation_function == "gelu_new" else "none")
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, kv_cache=None, layer=0, attn_out=None, doc_mask=None):
        x = x + self.attn(self.ln_1(x), kv_cache, layer, attn_out, doc_mask)
        x = x + self.mlp(self.ln_2(x))
        return x


def cross_entropy_loss(logits, targets, loss_mask=None, reduction="mean"):
    """Cross-entropy over (B, T, V) logits, optionally masked: sum(mask * ce) / sum(mask).
    reduction="sum" returns sum(mask * ce) alone, for train.py to divide by the mask count of the whole optimizer
    step (all micro-steps, all ranks). A window with no mask-1 target gives 0 (not NaN) and no gradient.
    Targets of -1 are ignored, as in nanoGPT."""
    ce = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1, reduction="none")
    weight = (targets.reshape(-1) != -1).float()
    if loss_mask is not None:
        weight = weight * loss_mask.reshape(-1).float()
    total = (ce * weight).sum()
    if reduction == "sum":
        return total
    return total / weight.sum().clamp(min=1.0)


LOSS_CHUNK_ELEMENTS = 2 ** 23  # logits per chunk in ChunkedCrossEntropy: 32 MB in fp32 (166 rows of GPT-2's vocab)
LOSS_GROUP_ELEMENTS = 2 ** 26  # logit gradients per lm_weight-gradient matmul: 128 MB in bf16 (1334 rows of GPT-2's)


class ChunkedCrossEntropy(torch.autograd.Function):
    """sum(weight * cross_entropy(x @ lm_weight.T, targets)) without the whole (N, V) logits: the output layer and
    the loss run a chunk of rows at a time, and each chunk's gradients (for x, and for lm_weight when it trains)
    are computed right away, while its logits exist; backward only scales them by the incoming gradient. With
    GPT-2's 50k vocabulary the logits and their gradients are a step's largest tensors (4 x 256 tokens: 200 MB
    each in fp32, three or four alive at once); a GPT-2 124M step peaks ~300 MB lower, for the same arithmetic.
    The same numerics as lm_head + cross_entropy_loss, autocast included: matmuls in the autocast dtype, the
    softmax in fp32. Footgun: forward always does backward's work too, so it is for training only."""

    @staticmethod
    def forward(ctx, x, lm_weight, targets, weight):
        # x (N, C), lm_weight (V, C), targets (N,), weight (N,) fp32: 1 where the target counts, 0 where not
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        w = lm_weight.to(dtype)  # (V, C)
        chunk = max(1, LOSS_CHUNK_ELEMENTS // w.size(0))
        grad_x = torch.empty_like(x)  # (N, C)
        grad_w = None  # (V, C) when lm_weight trains: the first group's product, then the others added to it
        # when lm_weight trains, its gradient matmul runs once per group of chunks: one per 166-row chunk would
        # build and add a (V, C) product 7x per 4 x 256 batch (15% of a GPT-2 124M step on CPU), each bf16 partial
        # rounded before the sum. A frozen lm_weight (LoRA) needs no group buffer: chunk by chunk is as fast.
        group = chunk if not ctx.needs_input_grad[1] else max(1, LOSS_GROUP_ELEMENTS // w.size(0) // chunk) * chunk
        total = torch.zeros((), dtype=torch.float32, device=x.device)
        for r in range(0, x.size(0), group):
            xg = x[r:r + group].to(dtype)  # (n, C)
            g = torch.empty(xg.size(0), w.size(0), dtype=dtype, device=x.device)  # (n, V): d total / d logits
            for s in range(0, xg.size(0), chunk):
                t, wt = targets[r + s:r + s + chunk].clamp(min=0), weight[r + s:r + s + chunk]
                logits = xg[s:s + chunk] @ w.t()  # (c, V) in the autocast dtype
                logp = torch.log_softmax(logits, dim=-1, dtype=torch.float32)  # (c, V): one row-wise fused kernel
                total -= (logp.gather(1, t[:, None]).squeeze(1) * wt).sum()  # ignored targets: weight 0
                # weight * (softmax - onehot(target)), built in place in logp's buffer
                gc = logp.exp_().mul_(wt[:, None])  # (c, V)
                gc.scatter_add_(1, t[:, None], -wt[:, None])
                g[s:s + chunk] = gc
                del logits, logp, gc  # freed before the next chunk's are made, not after
            grad_x[r:r + group] = g @ w  # (n, V) @ (V, C) -> (n, C)
            if ctx.needs_input_grad[1]:
                gw = g.t() @ xg  # (V, n) @ (n, C) -> (V, C)
                grad_w = gw.to(lm_weight.dtype) if grad_w is None else grad_w.add_(gw)  # summed in lm_weight's dtype
                del gw
            # Footgun: without this the next group's g (and gw) is allocated while this one is still referenced:
            # two of each alive at once, +400 MB at GPT-2's vocabulary in fp32 (a checkpointed 124M step's peak at 4 x 1024)
            del g
        ctx.save_for_backward(grad_x, grad_w)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_x, grad_w = ctx.saved_tensors
        return grad_x * grad_total, None if grad_w is None else grad_w * grad_total, None, None


def scale_first_position(x, factor):
    """BOS zero training: multiply the (B, T, C) input at position 0 by factor, leave the rest as is. A product
    with a constant (not an in-place write) so autograd, DDP and torch.compile see ordinary tensor ops, and a
    factor of 0.0 simply gives position 0 a zero input (its LayerNorm then sees only its bias: finite)."""
    scale = torch.ones(x.size(1), 1, dtype=x.dtype, device=x.device)
    scale[0] = factor
    return x * scale  # (B, T, C)


def packed_inputs(batch):
    """What GPT.forward takes from a batch beyond (X, Y, M): the position and document ids of a packed batch
    (data.PackedLoader's (X, Y, M, P, D)); {} for a batch of random windows."""
    return {"position_ids": batch[3], "doc_ids": batch[4]} if len(batch) == 5 else {}


def padded_vocab(n):
    return ((n + 63) // 64) * 64  # a multiple of 64 makes the embedding/lm_head matmuls faster


ACTIVATIONS = ("gelu_new", "gelu")  # GPTConfig.activation_function, as Hugging Face's GPT2Config names them


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        assert config.vocab_size is not None and config.block_size is not None
        if config.activation_function not in ACTIVATIONS:
            raise InputError(f"activation_function '{config.activation_function}': must be one of {', '.join(ACTIVATIONS)}")
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying, as GPT-2
        # a training setting, not architecture: kept off GPTConfig, whose fields checkpoints store as model_args
        self.activation_checkpointing = False  # set_activation_checkpointing
        self.apply(self._init_weights)
        # GPT-2 scales the init of the projections that write into the residual stream by 1/sqrt(2 * n_layer)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def get_num_params(self, non_embedding=False):
        """Parameters counted once (the tied wte/lm_head matrix once). non_embedding drops wpe and wte."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wpe.weight.numel() + self.transformer.wte.weight.numel()
        return n

    def embed(self, idx, start_pos=0, position_ids=None):
        """Token + position embedding of (B, T) ids starting at absolute position start_pos -> (B, T, C).
        start_pos is an int, or a (B,) tensor: each row's own start (engine.py's rows of different lengths).
        position_ids (B, T): a position per token (data.PackedLoader's rows, restarting at 0 per conversation)."""
        if torch.is_tensor(start_pos):
            position_ids = start_pos[:, None] + torch.arange(idx.size(1), dtype=torch.long, device=idx.device)  # (B, T)
        if position_ids is not None:
            return self._embed_positions(idx, position_ids)
        T = idx.size(1)
        if start_pos + T > self.config.block_size:
            raise InputError(f"sequence of {start_pos + T} tokens is longer than the model's block_size "
                             f"{self.config.block_size}")
        pos = torch.arange(start_pos, start_pos + T, dtype=torch.long, device=idx.device)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)  # (B, T, C)
        if self.config.use_bos_zero_training and start_pos == 0:
            x = scale_first_position(x, self.config.bos_scaling_factor)  # only ever absolute position 0
        return self.transformer.drop(x)

    def _embed_positions(self, idx, pos):
        """embed() with a position per token: (B, T) ids and positions; BOS zero scales every position 0 (each row's
        or each packed conversation's BOS). The caller keeps positions inside block_size (checking here would cost
        a device sync per decode step)."""
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)  # (B, T, C)
        if self.config.use_bos_zero_training:  # the same product as scale_first_position, row by row
            scale = torch.where(pos == 0, self.config.bos_scaling_factor, 1.0).to(x.dtype)  # (B, T)
            x = x * scale[..., None]
        return self.transformer.drop(x)

    def forward(self, idx, targets=None, loss_mask=None, kv_cache=None, attn_out=None, last_only=False,
                loss_reduction="mean", loss_only=False, position_ids=None, doc_ids=None):
        """idx (B, T) -> (logits, loss). logits are (B, T, V), or (B, 1, V) with last_only (generation).
        loss is None without targets; with loss_mask (B, T) only mask-1 targets count. loss_only (with targets):
        logits None, and the loss from only the positions that count, never the whole logits (_loss_of_counted_rows).
        kv_cache: a KVCache to read from and extend. attn_out: a list that receives each layer's (B, nh, T, Tk)
        attention weights through the explicit path. position_ids, doc_ids (B, T): a packed row (data.PackedLoader):
        positions restarting at 0 per conversation, and which conversation each token belongs to."""
        if (position_ids is None) != (doc_ids is None) or (doc_ids is not None and kv_cache is not None):
            raise ValueError("packed rows need both position_ids and doc_ids, and no kv_cache")
        start = kv_cache.pos if kv_cache is not None else 0
        x = self.embed(idx, start, position_ids)
        doc_mask = DocumentMask(doc_ids) if doc_ids is not None else None  # once per batch, not per layer
        recompute = self._checkpointing(kv_cache, attn_out)
        for i, block in enumerate(self.transformer.h):
            if recompute:  # keep only the block's input; backward runs the block again for the rest
                x = checkpoint(block, x, None, i, None, doc_mask, use_reentrant=False)  # (B, T, C)
            else:
                x = block(x, kv_cache, i, attn_out, doc_mask)
        if kv_cache is not None:
            kv_cache.pos += idx.size(1)
        x = self.transformer.ln_f(x)
        # FOOTGUN: under torch.compile on CUDA (torch 2.11, an H100) the gradients ChunkedCrossEntropy computes in
        # its forward came out all zero, so the model never learned; on CPU (2.13) they were right. A compiled model
        # takes the plain path below instead, whose logits and loss Inductor fuses and frees itself.
        if loss_only and targets is not None and not torch.compiler.is_compiling():
            return None, self._loss_of_counted_rows(x, targets, loss_mask, loss_reduction)
        if last_only:
            x = x[:, [-1], :]  # only the last position's logits are needed to sample: skip the rest of lm_head
        logits = self.lm_head(x)
        loss = None
        if targets is not None:
            loss = cross_entropy_loss(logits, targets, loss_mask, loss_reduction)
        return logits, loss

    def _loss_of_counted_rows(self, x, targets, loss_mask, reduction):
        """forward's loss_only: (B, T, C) final hidden states -> the loss, without the (B, T, V) logits, and with a
        loss mask from only the positions whose target counts. In chat SFT the mask leaves out most positions
        (the prompts: 81% of the shipped sample conversations' tokens), and the output layer is most of a small
        model's arithmetic (89% at 4 x 128 with GPT-2's 50k vocabulary), so a step does ~3x less work there for the
        same loss and gradients: a left-out row adds 0 to both. In training through ChunkedCrossEntropy (never the
        whole logits); without grad (evaluation) through lm_head on the kept rows."""
        x, targets = x.reshape(-1, x.size(-1)), targets.reshape(-1)  # (N, C), (N,)
        weight = (targets != -1).float()  # (N,): which targets count, as in cross_entropy_loss
        if loss_mask is not None:
            weight = weight * loss_mask.reshape(-1).float()
            keep = weight.nonzero().squeeze(1)  # (n,) Footgun: a host sync on CUDA (only with a mask: SFT)
            if 0 < keep.numel() < weight.numel():  # none kept: all rows, whose weights are 0 (a 0 loss, no NaN)
                x, targets, weight = x[keep], targets[keep], weight[keep]  # (n, C), (n,), (n,): x[keep] is differentiable
        if torch.is_grad_enabled():
            total = ChunkedCrossEntropy.apply(x, self.lm_head.weight, targets, weight)
        else:
            total = cross_entropy_loss(self.lm_head(x), targets, weight, reduction="sum")
        return total if reduction == "sum" else total / weight.sum().clamp(min=1.0)

    def set_activation_checkpointing(self, on=True):
        """Activation checkpointing: in training, each block keeps only its (B, T, C) input for backward, which
        runs the block's forward again to get the rest (torch.utils.checkpoint, non-reentrant). Activation memory
        drops from ~20 (B, T, C) tensors per layer to one, for one more forward of the blocks: GPT-2 124M at batch
        8 x 1024 (fp32, CPU) peaks at 0.23x the memory, the step takes 1.14x the time, the loss is bit-identical
        (bench.py act_ckpt; tests/test_activation_checkpointing.py). On CPU train.py pairs it with its own malloc
        setting (runtime.keep_freed_memory)."""
        self.activation_checkpointing = bool(on)
        return self

    def _checkpointing(self, kv_cache, attn_out):
        """Recompute the blocks in this forward? Only when backward will follow (training, grad on), never with a
        KV cache (the recompute would write the cache twice) or attention weights to hand back (appended twice).
        Dropout replays the same masks in the recompute: checkpoint saves and restores the RNG state (its
        preserve_rng_state default; keep it: other masks would make the gradients those of another forward)."""
        return (self.activation_checkpointing and self.training and torch.is_grad_enabled() and kv_cache is None
                and attn_out is None)

    def set_dropout(self, p):
        """Change the dropout of every layer (fine-tuning with other settings than the base was trained with)."""
        self.config.dropout = p
        for m in self.modules():
            if isinstance(m, nn.Dropout):
                m.p = p
            elif isinstance(m, CausalSelfAttention):
                m.dropout = p

    def crop_block_size(self, block_size):
        """Shrink the context (e.g. fine-tune GPT-2's 1024 at 256): keep the first block_size position rows."""
        assert block_size <= self.config.block_size
        self.config.block_size = block_size
        self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size].detach().clone())

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        return configure_adamw(self.parameters(), weight_decay, learning_rate, betas, device_type)

    def estimate_mfu(self, tokens_per_second, peak_flops):
        """Model FLOPs utilisation: achieved training FLOP/s over the device's peak (PaLM appendix B formula)."""
        cfg = self.config
        N = self.get_num_params()
        L, H, Q, T = cfg.n_layer, cfg.n_head, cfg.n_embd // cfg.n_head, cfg.block_size
        flops_per_token = 6 * N + 12 * L * H * Q * T
        return flops_per_token * tokens_per_second / peak_flops

    # ------------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate_stream(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, stop_tokens=(),
                        generator=None, use_kv_cache=True):
        """Yield the next token of every row, (B,), one step at a time, until max_new_tokens or until every row has
        produced one of stop_tokens. With the KV cache the prompt is read once (prefill) and each step feeds one
        token; without it every step recomputes the whole window (the reference the cache is tested against).
        A prompt longer than block_size is cropped to its last block_size - 1 tokens; when the cache is full the
        last block_size // 2 tokens are re-read (a sliding window), so generation can run past block_size. Both
        keep a BOS-zero model's first token in front (context_window)."""
        B = idx.size(0)
        bs = self.config.block_size
        if idx.size(1) >= bs:
            idx = self.context_window(idx, idx.size(1), bs - 1)
        buf = torch.empty(B, idx.size(1) + max_new_tokens, dtype=torch.long, device=idx.device)  # no per-step cat
        buf[:, :idx.size(1)] = idx
        n = idx.size(1)
        stop = torch.tensor(list(stop_tokens), dtype=torch.long, device=idx.device)
        done = torch.zeros(B, dtype=torch.bool, device=idx.device)
        cache = None
        for step in range(max_new_tokens):
            if not use_kv_cache:
                logits, _ = self(self.context_window(buf, n, bs), last_only=True)
            elif cache is None or cache.pos >= bs:  # (re-)prefill: first step, or the window is full
                ctx = self.context_window(buf, n, bs // 2 if cache is not None else bs)
                cache = KVCache(self.config.n_layer, B, self.config.n_head, bs, self.config.n_embd // self.config.n_head)
                logits, _ = self(ctx, kv_cache=cache, last_only=True)
            else:
                logits, _ = self(buf[:, n - 1:n], kv_cache=cache)
            nxt = sample_next(logits[:, -1, :], temperature, top_k, top_p, generator)  # (B,)
            buf[:, n] = nxt
            n += 1
            yield nxt
            if len(stop_tokens):
                done |= torch.isin(nxt, stop)
                if bool(done.all()):
                    return

    def context_window(self, buf, n, length):
        """The last `length` of the first n tokens of buf (B, >= n) -> (B, <= length). A BOS-zero model keeps the
        sequence's first token (its BOS) in front: absolute position 0 is scaled, so a sliding window must never
        move a decoded token there."""
        if n <= length:
            return buf[:, :n]
        if self.config.use_bos_zero_training:
            return torch.cat([buf[:, :1], buf[:, n - length + 1:n]], dim=1)  # (B, length)
        return buf[:, n - length:n]

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, **kwargs):
        """Like nanoGPT's generate: returns (B, T + n) ids, prompt included (n < max_new_tokens if all rows stop)."""
        out = [idx] + [t[:, None] for t in self.generate_stream(idx, max_new_tokens, **kwargs)]
        return torch.cat(out, dim=1)


def configure_adamw(parameters, weight_decay, learning_rate, betas, device_type):
    """AdamW with weight decay on 2-D weights only (matmuls, embeddings); none on biases and norms.
    Only parameters that require grad are optimised (LoRA freezes the rest). GPT.configure_optimizers and the
    scaffold's fused model (scaffold.py) both build their optimizer here."""
    params = [p for p in parameters if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = device_type in ("cuda", "cpu")  # one kernel, not ~10 ops per tensor: 3-7x faster step on CPU
    return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=fused)


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """Pick one token per row from (B, V) logits. temperature 0 means greedy (argmax)."""
    if temperature == 0:
        return torch.argmax(logits.float(), dim=-1)  # fp32: PyTorch's CPU argmax is 5x slower on bf16 logits
    logits = logits.float() / temperature
    if top_k is not None and top_k > 0:
        v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
        logits = logits.masked_fill(logits < v[:, [-1]], float("-inf"))
    if top_p is not None and 0 < top_p < 1:
        sorted_logits, sorted_idx = torch.sort(logits, descending=True)
        cum = torch.cumsum(F.softmax(sorted_logits, dim=-1), dim=-1)
        drop = cum - F.softmax(sorted_logits, dim=-1) > top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, sorted_idx, sorted_logits)
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)
