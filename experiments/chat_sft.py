"""
Chat SFT on the shipped sample conversations: does the model answer questions it never saw, and end its turn?
And does loss masking help? (issue 3's experiment)

    python experiments/chat_sft.py                  # trains configs/tiny_sft.json twice: masking on, masking off
    python experiments/chat_sft.py --max_iters 500  # quicker, rougher

For each run it reports the val loss on assistant tokens only (the masked loss, whatever the run trained on), the
first and last masked val loss of the masked run, and greedy answers to the held-out questions of
data/sample_chat_heldout.jsonl: how many are exactly right, and how many end their turn on their own (the model
emits the end-of-text token before max_new_tokens, without starting a user turn itself).
"""

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from checkpoint import load_model  # noqa: E402
from config import load_config  # noqa: E402
from data import BatchLoader  # noqa: E402
from sample import Sampler  # noqa: E402
from tokenizer import ROLE_MARKERS, chat_prompt  # noqa: E402
from train import SAMPLE_DATASET, train  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HELDOUT = os.path.join(ROOT, "data", "sample_chat_heldout.jsonl")


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


def heldout_answers(sampler, max_new_tokens=80):
    """Greedy answers to the held-out conversations' last question. Returns (rows, exact, ended)."""
    rows, exact, ended = [], 0, 0
    with open(HELDOUT) as f:
        records = [json.loads(line) for line in f]
    for rec in records:
        msgs = rec["messages"]
        turns = [(m["role"], m["content"]) for m in msgs[:-1]]
        expected = msgs[-1]["content"]
        ids = chat_prompt(sampler.tok, turns)
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


def run(name, use_loss_mask, args):
    overrides = {"model_name": name, "use_loss_mask": use_loss_mask, "out_dir": args.out_dir}
    if args.max_iters:
        overrides.update(max_iters=args.max_iters, lr_decay_iters=args.max_iters, eval_interval=args.max_iters // 5)
    cfg = load_config("configs/tiny_sft.json", overrides)
    evals = []
    summary = train(cfg, log=lambda line: (print(f"[{name}] {line}"), evals.append(line) if line.startswith("step ") else None))
    model, tok, ckpt = load_model(name, args.out_dir)
    model.eval()
    sampler = Sampler(model, tok, ckpt, "cpu")
    rows, exact, ended = heldout_answers(sampler)
    first_val = float(evals[0].split("val loss ")[1])
    return {"name": name, "use_loss_mask": use_loss_mask, "first_val": first_val, "last_val": summary["val_loss"],
            "assistant_val_loss": assistant_val_loss(model, SAMPLE_DATASET, cfg.block_size), "exact": exact,
            "ended": ended, "total": len(rows), "rows": rows}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--max_iters", type=int, default=0, help="0: the preset's (2000)")
    p.add_argument("--out_dir", default="checkpoints")
    p.add_argument("--skip_unmasked", action="store_true", help="only the masked run (the main job)")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args()
    os.chdir(ROOT)
    results = [run("chat_tiny", True, args)]
    if not args.skip_unmasked:
        results.append(run("chat_tiny_unmasked", False, args))
    print("\n| run | val loss on assistant tokens | held-out exact | held-out ended their turn |")
    print("|---|---|---|---|")
    for r in results:
        print(f"| {'masked' if r['use_loss_mask'] else 'unmasked'} | {r['assistant_val_loss']:.4f} | "
              f"{r['exact']}/{r['total']} | {r['ended']}/{r['total']} |")
    masked = results[0]
    print(f"\nmasked run: masked val loss {masked['first_val']:.4f} at the first evaluation -> {masked['last_val']:.4f} "
          f"at the end ({masked['last_val'] / masked['first_val']:.2f}x)")
    for r in results:
        print(f"\nheld-out answers ({'masked' if r['use_loss_mask'] else 'unmasked'}), first 8:")
        for task, q, expected, got, ended in r["rows"][:8]:
            print(f"  [{task}] {q!r} -> {got!r} (expected {expected!r}){'' if ended else ' [did not end its turn]'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
