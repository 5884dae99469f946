"""
Evaluate a trained model: loss and perplexity on held-out data with and without BOS zero scaling, a sweep of
scaling factors, samples, and how much attention every layer and head puts on position 0.

    python evaluate.py --model_name bos_zero_tiny --dataset_dir data/shakespeare_char
    python evaluate.py --model_name bos_zero_tiny --dataset_dir data/shakespeare_char --sweep 0.01,0.05,0.1,0.2,0.5,1.0
    python evaluate.py --model_name base_tiny --text_file notes.txt --scaling_factor 0.05 --json out.json
    python evaluate.py --model_name bos_zero_tiny --dataset_dir data/shakespeare_char --attention --generate_samples

Windows. The split is cut into consecutive windows of block_size targets, so every token but the first is a
target exactly once. A window whose targets are tok[a : a+T] reads
    X = tok[a-1 : a+T-1]                  (a model trained without BOS zero)
    X = [BOS] + tok[a : a+T-1]            (a model trained with BOS zero: how its training windows began)
The targets are the same either way, so the losses of the two kinds of model are directly comparable; the
BOS-first window only lacks tok[a-1], the context of its first target, which is why the loss without each
window's first target is reported too (loss_excl_first).
--prepend_bos true|false overrides the choice. Chat data (mask shards) is scored on mask-1 targets only.

Scaling. A BOS-zero model is evaluated with its checkpoint's factor and, for comparison, with none (position 0
unscaled, BOS still in front); a model trained without it, as it is. --scaling_factor X / --no_bos_scaling pick
the setting, --sweep adds one row per factor. Scaling multiplies whatever sits at position 0: for a baseline
model that is a data token unless --prepend_bos true.

Attention. --attention runs the model's explicit attention path (model(x, attn_out=[]), which returns every
layer's (B, nh, T, T) weights) on the first --attention_batch windows and reports, per layer and head, the mean
attention mass the queries at positions 1..T-1 put on position 0 (query 0 can only attend to itself). All layers'
weights are held at once, so the memory is estimated first and a too-large request is refused with a hint.
"""

import argparse
import json
import math
import os
import sys
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F

from checkpoint import CheckpointError, latest_model_name, load_model, model_dir
from data import Split, read_metadata
from errors import GPTLabError, MissingFileError, one_line_errors
from runtime import add_model_arguments, pick_device
from sample import Sampler
from tokenizer import Tokenizer, chat_prompt


class EvalError(GPTLabError, ValueError):
    """A request evaluate.py cannot do: the message says what and how to fix it."""


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # the project's CLI convention: one `error: ...` line and exit status 1
        print(f"error: {message}", file=sys.stderr)
        sys.exit(1)


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p, dtype=False)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--dataset_dir", help="a prepared dataset (prepare_dataset.py); its --split is scored")
    src.add_argument("--text_file", help="a plain text file, tokenized with the model's tokenizer and scored whole")
    p.add_argument("--split", default="val")
    p.add_argument("--block_size", type=int, default=0, help="targets per window (default: the model's block_size)")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--max_windows", type=int, default=1000, help="score at most this many windows, spread evenly "
                                                                 "over the split (0 = all)")
    p.add_argument("--prepend_bos", choices=["auto", "true", "false"], default="auto",
                   help="windows start with BOS (auto: when the model was trained with BOS zero)")
    p.add_argument("--no_mask", action="store_true", help="score every target even where the data has masks")
    scaling = p.add_mutually_exclusive_group()
    scaling.add_argument("--scaling_factor", type=float, default=None, help="scale position 0 by this, in [0, 1]")
    scaling.add_argument("--no_bos_scaling", action="store_true", help="evaluate with position 0 unscaled only")
    p.add_argument("--sweep", default="", help="comma-separated factors to evaluate, e.g. 0.01,0.05,0.1,0.2,0.5,1.0")
    p.add_argument("--generate_samples", action="store_true", help="sample with and without the scaling")
    p.add_argument("--num_samples", type=int, default=2)
    p.add_argument("--max_new_tokens", type=int, default=100)
    p.add_argument("--prompt", default="", help="start the samples with this text (a chat model: the user's message)")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top_k", type=int, default=200)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--attention", action="store_true", help="attention mass on position 0 per layer and head")
    p.add_argument("--attention_seq_len", type=int, default=0, help="default: min(block_size, 256)")
    p.add_argument("--attention_batch", type=int, default=8)
    p.add_argument("--attention_max_mb", type=float, default=2048, help="refuse --attention above this estimate")
    p.add_argument("--attention_png", default=None, help="heat map path (default: <model folder>/attention_pos0.png)")
    p.add_argument("--json", default=None, help="write every figure to this JSON file")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------------------------
# checks

def check_factor(value, where):
    """A BOS scaling factor must lie in [0, 1] (NaN and inf fail the comparison too)."""
    if not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
        raise EvalError(f"{where}: BOS scaling factor {value!r} must lie in [0, 1]")
    return float(value)


def parse_sweep(text):
    """'0.01,0.05,1.0' -> [0.01, 0.05, 1.0], each checked."""
    factors = []
    for part in text.split(","):
        if not part.strip():
            continue
        try:
            value = float(part)
        except ValueError:
            raise EvalError(f"--sweep: '{part.strip()}' is not a number (give factors like 0.01,0.05,0.1)") from None
        factors.append(check_factor(value, "--sweep"))
    if not factors:
        raise EvalError("--sweep: no factor given (e.g. --sweep 0.01,0.05,0.1,0.2,0.5,1.0)")
    return factors


def setting_name(factor):
    return "none" if factor is None else f"{factor:g}"


@contextmanager
def bos_scaling(model, factor):
    """Evaluate with position 0 scaled by factor (None: unscaled); the model's own setting is put back after."""
    saved = (model.config.use_bos_zero_training, model.config.bos_scaling_factor)
    model.config.use_bos_zero_training = factor is not None
    if factor is not None:
        model.config.bos_scaling_factor = factor
    try:
        yield
    finally:
        model.config.use_bos_zero_training, model.config.bos_scaling_factor = saved


# ---------------------------------------------------------------------------------------------------------------
# data: the evaluation windows

def load_tokens(args, tok, use_mask):
    """[(tokens, mask or None)] per shard of the data to score, and a description of where it came from."""
    if args.text_file:
        if not os.path.isfile(args.text_file):
            raise MissingFileError(f"{args.text_file}: text file not found")
        with open(args.text_file, encoding="utf-8", errors="replace") as f:
            text = f.read()
        try:
            ids = tok.encode(text)
        except ValueError as e:
            raise EvalError(f"{args.text_file}: {e}") from None
        return [(np.array(ids, dtype=np.int64), None)], args.text_file
    split = Split(args.dataset_dir, args.split, use_mask)
    masks = split.masks if use_mask else [None] * len(split.tokens)
    return list(zip(split.tokens, masks)), f"{args.dataset_dir} ({args.split})"


def eval_windows(shards, block_size, prepend_bos, bos_token, max_windows):
    """Consecutive windows over the shards, (X, Y, M or None) int64 tensors of shape (N, block_size); targets of
    window k of a shard are tok[a : a+T] with a = 1 + k*T (see the module docstring)."""
    T = block_size
    picks = [(s, a) for s, (toks, _) in enumerate(shards) for a in range(1, len(toks) - T + 1, T)]
    if not picks:
        longest = max((len(t) for t, _ in shards), default=0)  # a split with no shard at all: 0
        raise EvalError(f"no window of {T} targets fits in the data (longest shard: {longest} tokens): lower "
                        f"--block_size or score more data")
    if max_windows and len(picks) > max_windows:  # spread evenly over the whole split, not just its beginning
        picks = [picks[i] for i in np.linspace(0, len(picks) - 1, max_windows).round().astype(np.int64)]
    xs, ys, ms = [], [], []
    for s, a in picks:
        toks, mask = shards[s]
        y = np.asarray(toks[a:a + T], dtype=np.int64)
        x = np.concatenate([[bos_token], y[:-1]]) if prepend_bos else np.asarray(toks[a - 1:a + T - 1], dtype=np.int64)
        xs.append(x), ys.append(y)
        if mask is not None:
            ms.append(np.asarray(mask[a:a + T], dtype=np.int64))  # the mask of each target
    X, Y = torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys))
    return X, Y, (torch.from_numpy(np.stack(ms)) if ms else None)


# ---------------------------------------------------------------------------------------------------------------
# the measurements

@torch.no_grad()
def mean_loss(model, X, Y, M, batch_size, device):
    """Mean cross-entropy over all (mask-1) targets -> (loss, targets scored, loss over targets 1..T-1 only).
    The last figure leaves out each window's first target, the one predicted from position 0 alone: a BOS-first
    window has no context for it (BOS stands where tok[a-1] would), so comparing BOS-first and plain windows
    on it separates the cost of that lost token from the rest."""
    total, count, first, first_count = 0.0, 0, 0.0, 0
    for i in range(0, X.size(0), batch_size):
        x, y = X[i:i + batch_size].to(device), Y[i:i + batch_size].to(device)
        m = M[i:i + batch_size].to(device) if M is not None else torch.ones_like(y)
        logits, loss_sum = model(x, y, m, loss_reduction="sum")
        ce0 = F.cross_entropy(logits[:, 0].float(), y[:, 0], reduction="none")  # (B,) first target of each window
        total += loss_sum.item()
        first += (ce0 * m[:, 0]).sum().item()
        count += int(m.sum())
        first_count += int(m[:, 0].sum())
    if count == 0:
        raise EvalError("no mask-1 target in the scored windows: score more data, or pass --no_mask")
    rest = (total - first) / (count - first_count) if count > first_count else float("nan")
    return total / count, count, rest


def attention_memory_mb(model, batch, seq_len):
    """Bytes the explicit path needs for attention weights: every layer's (B, nh, T, T) fp32 tensor is kept in
    attn_out, plus about two more of them alive while one layer computes its softmax."""
    per_layer = batch * model.config.n_head * seq_len * seq_len * 4
    return (model.config.n_layer + 2) * per_layer / 2**20


def attention_request(model, args, window_len):
    """(batch, seq_len) for --attention, refused with a hint when the weights would not fit in memory."""
    T = args.attention_seq_len or min(model.config.block_size, 256)
    if T > window_len:
        raise EvalError(f"--attention_seq_len {T} is longer than the evaluation windows ({window_len} tokens): lower it")
    if T < 2:
        raise EvalError(f"--attention_seq_len {T}: need at least 2 positions (queries 1..T-1 attend to position 0)")
    B = args.attention_batch
    need = attention_memory_mb(model, B, T)
    if need > args.attention_max_mb:
        fit = int(math.sqrt(args.attention_max_mb * 2**20 / ((model.config.n_layer + 2) * model.config.n_head * 4 * B)))
        raise EvalError(f"--attention would need about {need:,.1f} MiB for attention weights ({model.config.n_layer} "
                        f"layers x batch {B} x {model.config.n_head} heads x {T}^2 x 4 bytes) at --attention_seq_len "
                        f"{T}, above --attention_max_mb {args.attention_max_mb:g}: lower --attention_seq_len (at most "
                        f"{fit} fits at batch {B}) or --attention_batch, or raise --attention_max_mb")
    return B, T


@torch.no_grad()
def attention_to_first(model, X, B, T, device):
    """(n_layer, n_head) array: mean attention mass on position 0 over B windows and queries 1..T-1."""
    attn = []
    model(X[:B, :T].to(device), attn_out=attn)  # the explicit path: each layer appends its (B, nh, T, T) weights
    return torch.stack([a[:, :, 1:, 0].float().mean(dim=(0, 2)) for a in attn]).cpu().numpy()  # (n_layer, nh)


def attention_table(mass):
    """The (n_layer, n_head) masses as a text table, one row per layer, with each layer's mean."""
    n_head = mass.shape[1]
    lines = ["layer  " + " ".join(f"h{h:<5d}" for h in range(n_head)) + "  mean"]
    for layer, row in enumerate(mass):
        lines.append(f"{layer:5d}  " + " ".join(f"{v:.3f} " for v in row) + f"  {row.mean():.3f}")
    return "\n".join(lines)


def plot_attention(panels, path):
    """Heat maps (layers x heads) of attention mass on position 0, one panel per (title, mass) pair, to a PNG.
    Returns the path, or None when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    # one colour scale for all panels so they compare; up to the largest value (not 1) so small masses show
    vmax = min(1.0, max(0.1, math.ceil(max(float(m.max()) for _, m in panels) * 20) / 20))
    fig, axes = plt.subplots(1, len(panels), figsize=(1.2 + 2.6 * len(panels), 2.8), squeeze=False)
    for ax, (title, mass) in zip(axes[0], panels):
        im = ax.imshow(mass, vmin=0.0, vmax=vmax, cmap="viridis", aspect="auto")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("head"), ax.set_ylabel("layer")
        ax.set_xticks(range(mass.shape[1])), ax.set_yticks(range(mass.shape[0]))
        if mass.size <= 64:  # small grids: print the values in the cells
            for (i, j), v in np.ndenumerate(mass):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="white" if v < 0.6 * vmax else "black")
    fig.colorbar(im, ax=list(axes[0]), fraction=0.04, label="attention on position 0")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=80, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)
    return path


def samples(model, tok, ckpt, args, device, settings):
    """args.num_samples generations for each scaling setting, from the same seed so they differ only by it."""
    sampler = Sampler(model, tok, ckpt, device)
    if sampler.is_chat and args.prompt:
        ids, stop = chat_prompt(tok, [("user", args.prompt)]), True
    else:
        ids, stop = [tok.eot_token] + tok.encode(args.prompt), False  # BOS first, as sample.py does
    out = []
    for factor in settings:
        gen = torch.Generator(device=device).manual_seed(args.seed)
        with bos_scaling(model, factor):
            for _ in range(args.num_samples):
                text = sampler.stream(ids, args.max_new_tokens, stop_at_eot=stop, temperature=args.temperature,
                                      top_k=args.top_k, generator=gen)
                out.append({"setting": setting_name(factor), "factor": factor, "text": args.prompt + text})
    return out


# ---------------------------------------------------------------------------------------------------------------

def check_args(args):
    """Refuse bad numbers before anything is loaded; returns --sweep's factors."""
    sweep = parse_sweep(args.sweep) if args.sweep else []
    if args.scaling_factor is not None:
        check_factor(args.scaling_factor, "--scaling_factor")
    for key in ("batch_size", "num_samples", "max_new_tokens", "attention_batch"):
        if getattr(args, key) < 1:
            raise EvalError(f"--{key} {getattr(args, key)} must be >= 1")
    if args.block_size < 0 or args.max_windows < 0 or args.attention_seq_len < 0:
        raise EvalError("--block_size, --max_windows and --attention_seq_len must be >= 0 (0 = default)")
    return sweep


def scaling_settings(args, trained, name):
    """The BOS scaling factors to score: the first is the main one (attention is measured with it); None (no
    scaling) is the comparison. trained: the factor the model was trained with, or None."""
    if trained is not None and args.scaling_factor is None and not args.no_bos_scaling:
        check_factor(trained, f"model '{name}' (checkpoint model_args)")
    if args.no_bos_scaling:
        return [None]
    if args.scaling_factor is not None:
        return [args.scaling_factor, None]
    return [trained, None] if trained is not None else [None]


def eval_data(args, model, tok, name, T):
    """The windows to score, from --dataset_dir's val split or --text_file: (X, Y, M, the report's "data")."""
    use_mask = False
    if args.dataset_dir:
        meta = read_metadata(args.dataset_dir)
        data_tok = Tokenizer.load(os.path.join(args.dataset_dir, "tokenizer_state.json"))
        if data_tok.kind != tok.kind or getattr(data_tok, "chars", None) != getattr(tok, "chars", None):
            raise EvalError(f"{args.dataset_dir}: prepared with another tokenizer ({data_tok.kind}, vocab "
                            f"{data_tok.vocab_size}) than model '{name}' ({tok.kind}, vocab {tok.vocab_size}): prepare "
                            f"it with the model's tokenizer")
        use_mask = bool(meta.get("has_mask")) and not args.no_mask
    prepend_bos = {"auto": model.config.use_bos_zero_training, "true": True, "false": False}[args.prepend_bos]
    shards, source = load_tokens(args, tok, use_mask)
    X, Y, M = eval_windows(shards, T, prepend_bos, tok.eot_token, args.max_windows)
    top = max(int(X.max()), int(Y.max()))
    if top >= model.config.vocab_size:
        raise EvalError(f"{source}: token id {top} >= the model's vocab_size {model.config.vocab_size}: "
                        f"the data was made with another tokenizer")
    return X, Y, M, {"source": source, "windows": X.size(0), "block_size": T, "prepend_bos": prepend_bos,
                     "masked": M is not None}


def attention_report(model, X, factor, att_batch, att_len, title, png, device, log):
    """Attention mass on position 0 with BOS scaling `factor`: logged as a table, drawn to png under title; the
    report's "attention"."""
    with bos_scaling(model, factor):
        mass = attention_to_first(model, X, att_batch, att_len, device)
    uniform = float(np.mean([1.0 / (q + 1) for q in range(1, att_len)]))  # query q sees q + 1 positions
    log(f"attention mass on position 0 (BOS scaling {setting_name(factor)}; mean over queries 1..T-1; "
        f"uniform attention would give {uniform:.3f}):")
    log(attention_table(mass))
    png = plot_attention([(title, mass)], png)
    if png:
        log(f"heat map written to {png}")
    return {"setting": setting_name(factor), "factor": factor, "seq_len": att_len, "batch": min(att_batch, X.size(0)),
            "uniform": uniform, "per_layer": mass.mean(axis=1).tolist(), "per_head": mass.tolist(), "png": png}


def write_json(report, path):
    """The report to path, whole or not at all (a temp file, then renamed)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(report, f, indent=2)
    os.replace(path + ".tmp", path)


def run(args, log=print):
    """Everything evaluate.py measures, as a dict (what --json writes)."""
    device = pick_device(args.device)
    sweep = check_args(args)
    name = args.model_name or latest_model_name(args.out_dir)
    if name is None:
        raise CheckpointError(f"no trained model in {args.out_dir}/: train one first, or pass --model_name")
    model, tok, ckpt = load_model(name, args.out_dir, device, prefer="best.pt" if args.checkpoint == "best" else "ckpt.pt")
    model.eval()
    trained = model.config.bos_scaling_factor if model.config.use_bos_zero_training else None
    settings = scaling_settings(args, trained, name)
    T = args.block_size or model.config.block_size
    if T > model.config.block_size:
        raise EvalError(f"--block_size {T} is longer than the model's block_size {model.config.block_size}")
    if args.attention:  # refuse a too-large request before spending time on the rest
        att_batch, att_len = attention_request(model, args, T)
    X, Y, M, data = eval_data(args, model, tok, name, T)
    log(f"model '{name}' (iteration {ckpt.get('iter_num')}, trained with BOS scaling {setting_name(trained)}) on "
        f"{data['source']}: {X.size(0)} windows of {T} targets, BOS first: {data['prepend_bos']}, masked: "
        f"{M is not None}")
    report = {"model": name, "iter_num": ckpt.get("iter_num"), "trained_scaling": trained, "data": data,
              "results": [], "sweep": [], "attention": None, "samples": []}
    scored = {}

    def score(factor):
        """mean_loss with position 0 scaled by factor; each setting is computed once (1.0 is none: x * 1.0 is
        exactly x)."""
        key = None if factor is None or factor == 1.0 else factor
        if key not in scored:
            with bos_scaling(model, factor):
                scored[key] = mean_loss(model, X, Y, M, args.batch_size, device)
        return scored[key]

    for factor in settings:
        loss, count, rest = score(factor)
        report["results"].append({"setting": setting_name(factor), "factor": factor, "loss": loss,
                                  "perplexity": math.exp(loss), "targets": count, "loss_excl_first": rest})
        log(f"BOS scaling {setting_name(factor):>5s}: val loss {loss:.4f}, perplexity {math.exp(loss):.3f} "
            f"({count:,} targets; loss without each window's first target {rest:.4f})")
    data["targets"] = report["results"][0]["targets"]

    if sweep:
        log("sweep:  factor    loss   perplexity")
        for factor in sweep:
            loss, _, rest = score(factor)
            report["sweep"].append({"factor": factor, "loss": loss, "perplexity": math.exp(loss), "loss_excl_first": rest})
            log(f"      {factor:8g}  {loss:.4f}  {math.exp(loss):9.3f}")

    if args.attention:
        png = args.attention_png or os.path.join(model_dir(args.out_dir, name), "attention_pos0.png")
        title = f"{name} (scaling {setting_name(settings[0])})"
        report["attention"] = attention_report(model, X, settings[0], att_batch, att_len, title, png, device, log)

    if args.generate_samples:
        report["samples"] = samples(model, tok, ckpt, args, device, settings)
        for s in report["samples"]:
            log(f"--- sample, BOS scaling {s['setting']} ---\n{s['text']}")

    if args.json:
        write_json(report, args.json)
        log(f"results written to {args.json}")
    return report


@one_line_errors
def main(argv=None):
    run(parse_args(argv))


if __name__ == "__main__":
    main()
