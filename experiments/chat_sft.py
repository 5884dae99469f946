"""
Chat SFT on the shipped sample conversations: does the model answer questions it never saw, and end its turn?
And does loss masking help? (docs/chat_sft_experiment.md)

    python -m experiments.chat_sft                  # from the project root: tiny_sft.json twice, masking on and off
    python -m experiments.chat_sft --max_iters 500  # quicker, rougher
    python -m experiments.chat_sft --skip_unmasked --config_file configs/quickstart_sft.json   # the quick start's model
    python -m experiments.chat_sft --skip_unmasked --config_file configs/quickstart_sft.json --seed 2   # another seed
    python -m experiments.chat_sft --context_chars 256   # the same conversations, each behind a passage of prose

--context_chars N puts a system message of N characters of real prose (a passage of Pride and Prejudice, Project
Gutenberg eBook 1342, from --context_file; by default from ../shared/corpora, a folder of text corpora beside the
project) in front of every conversation, the way a retrieved document or a long system prompt sits in front of
real chats. The answers do not depend on it, so it is the prompt-heavy case: most tokens are prompt, and the
unmasked run spends most of its training signal modelling them. Train and val conversations draw their passages from
the first 90% of the file, the held-out questions from the last 10%.

--packed adds a third run: masked, with packing true (rows of whole conversations, each attending only to itself,
positions restarting at its BOS), at the same optimizer steps and rows x block_size per step as the random-window
runs. Every run is then also scored on the val conversations whole (each once, from its BOS), besides the
random val windows.

--pretrain_iters N first pretrains a base model on that prose (the same first 90%, the chat data's character
vocabulary) for N steps, then runs both SFT runs from it with --init_from_model: the two-phase case, where the base
already models text and SFT only has to teach the answers.

For each run it reports the val loss on assistant tokens only (the masked loss, whatever the run trained on), the
first and last masked val loss of the masked run, and greedy answers to the held-out questions of
data/sample_chat_heldout.jsonl: how many are exactly right, and how many end their turn on their own (the model
emits the end-of-text token before max_new_tokens, without starting a user turn itself).
"""

import argparse
import json
import os
import random
import sys

if __package__ in (None, ""):  # run as a file: experiments/, not the project root, would be on sys.path
    sys.exit("error: run it from the project root as a module: python -m experiments.chat_sft")

import torch  # noqa: E402

from checkpoint import load_model  # noqa: E402
from config import load_config  # noqa: E402
from data import BatchLoader, PackedLoader  # noqa: E402
from model import packed_inputs  # noqa: E402
from sample import Sampler  # noqa: E402
from tokenizer import EOT_TEXT, ROLE_MARKERS, Tokenizer, chat_prompt  # noqa: E402
from train import SAMPLE_DATASET, resolve_dataset, train  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HELDOUT = os.path.join(ROOT, "data", "sample_chat_heldout.jsonl")
CONTEXT_FILE = os.path.join(ROOT, "..", "shared", "corpora", "pride_and_prejudice_pg1342.txt")


def read_records(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def with_context(records, text, chars, seed):
    """Each record with a passage of `chars` characters of `text` (starting at a word) as a system message in front;
    a record that already has a system prompt keeps it after the passage. chars 0: the records as they are."""
    if not chars:
        return records
    rng = random.Random(seed)
    out = []
    for rec in records:
        start = text.index(" ", rng.randrange(len(text) - 2 * chars)) + 1
        passage = text[start:start + chars]
        msgs = [dict(m) for m in rec["messages"]]
        if msgs[0]["role"] == "system":
            msgs[0]["content"] = passage + "\n" + msgs[0]["content"]
        else:
            msgs.insert(0, {"role": "system", "content": passage})
        out.append({**rec, "messages": msgs})
    return out


def read_prose(path):
    """The file's lines in plain ASCII (so held-out passages use known characters)."""
    if not os.path.exists(path):
        raise SystemExit(f"--context_file {path} not found: pass any long plain-text file")
    with open(path, encoding="utf-8") as f:
        return ["".join(c for c in line if 32 <= ord(c) < 127) for line in f]


def context_data(args, root, lines):
    """Write the shipped conversations with passages of the prose `lines` in front, prepare them (char tokens, like
    the shipped set) and return (dataset_dir, held-out records)."""
    import prepare_dataset
    text = " ".join(" ".join(lines).split())
    cut = int(len(text) * 0.9)
    train_file = os.path.join(root, "sample_chat_context.jsonl")
    with open(train_file, "w") as f:
        for rec in with_context(read_records(os.path.join(ROOT, "data", "sample_chat.jsonl")), text[:cut],
                                args.context_chars, seed=1):
            f.write(json.dumps(rec) + "\n")
    dataset_dir = os.path.join(root, "data")
    prepare_dataset.prepare([train_file], dataset_dir, tokenization="char", fmt="chat")  # seconds; replaces any old one
    return dataset_dir, with_context(read_records(HELDOUT), text[cut:], args.context_chars, seed=2)


def pretrain_base(args, root, lines, chat_dir, name):
    """Pretrain `name` on the first 90% of the prose `lines`, in the chat data's vocabulary (other characters
    dropped), with the SFT preset's shape and schedule."""
    import prepare_dataset
    vocab = set(Tokenizer.load(os.path.join(chat_dir, "tokenizer_state.json")).chars)
    text_file = os.path.join(root, "pretrain.txt")
    with open(text_file, "w") as f:
        f.writelines("".join(c for c in line if c in vocab) + "\n" for line in lines[:int(len(lines) * 0.9)])
    data_dir = os.path.join(root, "pretrain_data")
    prepare_dataset.prepare([text_file], data_dir, fmt="text", tokenizer_from=chat_dir)
    n = args.pretrain_iters
    cfg = load_config(args.config_file, {"model_name": name, "use_loss_mask": False, "dataset_dir": data_dir,
                                         "out_dir": args.out_dir, "max_iters": n, "lr_decay_iters": n,
                                         "eval_interval": max(1, n // 4)})
    summary = train(cfg, log=lambda line: print(f"[{name}] {line}"))
    return summary["val_loss"]


@torch.no_grad()
def assistant_val_loss(model, dataset_dir, block_size, batches=40):
    """Mean loss on mask-1 targets (the assistant's tokens) of fixed val windows."""
    loader = BatchLoader(dataset_dir, "val", 16, block_size, use_mask=True, seed=4242)
    total = count = 0.0
    for _ in range(batches):
        x, y, m = loader.get_batch()
        _, loss_sum = model(x, y, m, loss_reduction="sum")
        total += loss_sum.item()
        count += m.sum().item()
    return total / count


@torch.no_grad()
def whole_conversation_val_loss(model, dataset_dir, block_size):
    """Mean loss on mask-1 targets of every val conversation, each read whole from its BOS (packed rows: one
    epoch of the packed val loader, so each conversation exactly once)."""
    loader = PackedLoader(dataset_dir, "val", 16, block_size, use_mask=True, seed=4242)
    total = count = 0.0
    for _ in range(loader.steps_per_epoch):
        batch = loader.get_batch()
        _, loss_sum = model(batch[0], batch[1], batch[2], loss_reduction="sum", **packed_inputs(batch))
        total += loss_sum.item()
        count += batch[2].sum().item()
    return total / count


def question_ids(tok, rec):
    """A held-out record's turns before its last answer, and the ids that ask the model for that answer."""
    turns = [(m["role"], m["content"]) for m in rec["messages"][:-1]]
    return turns, chat_prompt(tok, turns)


def heldout_answers(sampler, records, max_new_tokens=80):
    """Greedy answers to the held-out conversations' last question. Returns (rows, exact, ended)."""
    rows, exact, ended = [], 0, 0
    for rec in records:
        turns, ids = question_ids(sampler.tok, rec)
        expected = rec["messages"][-1]["content"]
        x = torch.tensor([ids])
        out = sampler.model.generate(x, max_new_tokens, temperature=0, stop_tokens=[sampler.tok.eot_token])[0, len(ids):]
        new = out.tolist()
        stopped = sampler.tok.eot_token in new
        text = sampler.tok.decode(new[:new.index(sampler.tok.eot_token)] if stopped else new)
        clean_end = stopped and ROLE_MARKERS["user"] not in text
        exact += text.strip() == expected
        ended += clean_end
        rows.append((rec.get("task", "?"), turns[-1][1], expected, text.strip(), clean_end))
    return rows, exact, ended


def past_end_of_turn(sampler, records, max_new_tokens=60):
    """What the model writes when generation is *not* stopped at its end-of-turn token (shown as <EOT>)."""
    out = []
    for rec in records:
        turns, ids = question_ids(sampler.tok, rec)
        new = sampler.model.generate(torch.tensor([ids]), max_new_tokens, temperature=0)[0, len(ids):]
        out.append((turns[-1][1], sampler.tok.decode(new.tolist()).replace(EOT_TEXT, "<EOT>")))
    return out


def run(name, use_loss_mask, args, dataset_dir, heldout, base=None, packing=None):
    """One SFT run of the preset (its own packing unless `packing` is given), then its scores."""
    overrides = {"model_name": name, "use_loss_mask": use_loss_mask, "out_dir": args.out_dir}
    if packing is not None:
        overrides["packing"] = packing
        if packing:  # a packed row starts at a conversation already (a preset's align_windows would refuse it)
            overrides["align_windows"] = False
    if base:
        overrides["init_from_model"] = base
    if dataset_dir:  # None: train.py's default, the shipped sample conversations (prepared on first use)
        overrides["dataset_dir"] = dataset_dir
    if args.max_iters:
        overrides.update(max_iters=args.max_iters, lr_decay_iters=args.max_iters, eval_interval=args.max_iters // 5)
    if args.seed is not None:
        overrides["seed"] = args.seed
    cfg = load_config(args.config_file, overrides)
    evals = []
    summary = train(cfg, log=lambda line: (print(f"[{name}] {line}"), evals.append(line) if line.startswith("step ") else None))
    model, tok, ckpt = load_model(name, args.out_dir)
    model.eval()
    sampler = Sampler(model, tok, ckpt, "cpu")
    rows, exact, ended = heldout_answers(sampler, heldout)
    first_of = {}
    for rec in heldout:
        first_of.setdefault(rec.get("task"), rec)
    unstopped = past_end_of_turn(sampler, [first_of[t] for t in ("greet", "count", "repeat") if t in first_of])
    first_val = float(evals[0].split("val loss ")[1])
    data = dataset_dir or SAMPLE_DATASET
    return {"name": name, "use_loss_mask": use_loss_mask, "packing": cfg.packing, "first_val": first_val,
            "last_val": summary["val_loss"], "assistant_val_loss": assistant_val_loss(model, data, cfg.block_size),
            "whole_conversation_val_loss": whole_conversation_val_loss(model, data, cfg.block_size), "exact": exact,
            "ended": ended, "total": len(rows), "rows": rows, "not_stopped": unstopped}


def label(r):
    return ("masked" if r["use_loss_mask"] else "unmasked") + (", packed" if r["packing"] else "")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config_file", default="configs/tiny_sft.json",
                   help="the SFT preset every run trains (configs/quickstart_sft.json: the README's first command)")
    p.add_argument("--max_iters", type=int, default=0, help="0: the preset's (2000)")
    p.add_argument("--seed", type=int, default=None,
                   help="the SFT runs' seed (initial weights and batches; default: the preset's): the held-out count "
                        "moves with it")
    p.add_argument("--out_dir", default="checkpoints")
    p.add_argument("--skip_unmasked", action="store_true", help="only the masked run (the main job)")
    p.add_argument("--context_chars", type=int, default=0,
                   help="put a passage of this many characters of prose in front of every conversation (0: as shipped)")
    p.add_argument("--context_file", default=CONTEXT_FILE, help="where the passages (and pretraining text) come from")
    p.add_argument("--pretrain_iters", type=int, default=0,
                   help="pretrain a base model on the prose for this many steps first, and fine-tune from it")
    p.add_argument("--packed", action="store_true",
                   help="also a masked run with packing true (whole conversations per row), the same steps and shape")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args()
    os.chdir(ROOT)
    if args.packed and load_config(args.config_file, {}).packing:
        sys.exit(f"error: {args.config_file} already packs (packing true): its masked run is the packed one; "
                 f"drop --packed, or pass a preset that draws random windows (configs/tiny_sft.json)")
    base = None
    if args.context_chars or args.pretrain_iters:
        prefix = "chat_tiny" + (f"_context{args.context_chars}" if args.context_chars else "") + \
            (f"_pretrained{args.pretrain_iters}" if args.pretrain_iters else "")
        root = os.path.join(args.out_dir, prefix + "_data")
        os.makedirs(root, exist_ok=True)
        lines = read_prose(args.context_file)
        dataset_dir, heldout = context_data(args, root, lines)
        if args.pretrain_iters:
            base = prefix + "_base"
            base_val = pretrain_base(args, root, lines, dataset_dir, base)
            print(f"base model '{base}': val loss {base_val:.4f} on the prose after {args.pretrain_iters} steps")
        names = (prefix, prefix + "_unmasked")
    else:
        # the shipped conversations, prepared (again, if made before conversation starts were recorded) as train.py does
        dataset_dir = resolve_dataset(load_config(args.config_file, {"packing": True}), print)
        heldout = read_records(HELDOUT)
        names = ("chat_tiny", "chat_tiny_unmasked")
    results = [run(names[0], True, args, dataset_dir, heldout, base)]
    if not args.skip_unmasked:
        results.append(run(names[1], False, args, dataset_dir, heldout, base))
    if args.packed:
        results.append(run(names[0] + "_packed", True, args, dataset_dir, heldout, base, packing=True))
    print("\n| run | val loss on assistant tokens, random windows | whole conversations | held-out exact | "
          "held-out ended their turn |")
    print("|---|---|---|---|---|")
    for r in results:
        print(f"| {label(r)} | {r['assistant_val_loss']:.4f} | {r['whole_conversation_val_loss']:.4f} | "
              f"{r['exact']}/{r['total']} | {r['ended']}/{r['total']} |")
    masked = results[0]
    print(f"\nmasked run: masked val loss {masked['first_val']:.4f} at the first evaluation -> {masked['last_val']:.4f} "
          f"at the end ({masked['last_val'] / masked['first_val']:.2f}x)")
    for r in results:
        print(f"\nheld-out answers ({label(r)}), first 8:")
        for task, q, expected, got, ended in r["rows"][:8]:
            print(f"  [{task}] {q!r} -> {got!r} (expected {expected!r}){'' if ended else ' [did not end its turn]'}")
        print("  not stopped at the end of turn:")
        for q, text in r["not_stopped"]:
            print(f"  {q!r} -> {text!r}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
