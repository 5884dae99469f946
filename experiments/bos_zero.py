"""
The BOS zero experiment (docs/bos_zero.md): does a model trained with its first position scaled down (BOS zero,
factor 0.05) model text as well as a baseline, how does each do when evaluated the other way, and where does
their attention go?

    python -m experiments.bos_zero                   # from the project root; about 5 minutes on 2 CPU cores
    python -m experiments.bos_zero --max_iters 300   # quicker, rougher
    python -m experiments.bos_zero --corpus path/to/tinyshakespeare.txt

Both models are configs/tiny.json's shape (4 layers x 4 heads x 128, block 64), trained on tinyshakespeare at
the character level (--corpus; by default ../shared/corpora/tinyshakespeare.txt, a folder of text corpora
beside the project; prepared into data/shakespeare_char_bos_exp on first use) for the same steps with the same
seed: the baseline with configs/tiny.json, the BOS-zero model with configs/tiny_bos_zero.json. Each is then
scored by evaluate.py on the whole val split, with and without the scaling, and its attention on position 0
is measured per layer and head. Writes docs/bos_zero_attention.png and docs/bos_zero_results.json, and prints
the tables of docs/bos_zero.md.
"""

import argparse
import json
import os
import sys
import time

if __package__ in (None, ""):  # run as a file: experiments/, not the project root, would be on sys.path
    sys.exit("error: run it from the project root as a module: python -m experiments.bos_zero")

import numpy as np  # noqa: E402
import torch  # noqa: E402

import evaluate  # noqa: E402
import prepare_dataset  # noqa: E402
from config import load_config  # noqa: E402
from train import train  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = os.path.join(ROOT, "..", "shared", "corpora", "tinyshakespeare.txt")  # text corpora beside the project
DATA = os.path.join(ROOT, "data", "shakespeare_char_bos_exp")  # its own copy: other runs may re-prepare theirs
FACTOR = 0.05


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--max_iters", type=int, default=800)
    p.add_argument("--corpus", default=CORPUS,
                   help="tinyshakespeare's text (karpathy/char-rnn: data/tinyshakespeare/input.txt)")
    p.add_argument("--out_dir", default=os.path.join(ROOT, "checkpoints"))
    p.add_argument("--docs_dir", default=os.path.join(ROOT, "docs"))
    p.add_argument("--eval_only", action="store_true", help="evaluate the models a previous run trained")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (a 4 x 128 model gains little from more, "
                                                          "and on a shared machine idle threads spin)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    if not os.path.exists(os.path.join(DATA, "dataset_metadata.json")):
        if not os.path.exists(args.corpus):
            sys.exit(f"error: {args.corpus} not found: pass tinyshakespeare's text file as --corpus FILE")
        print(f"preparing {args.corpus} -> {DATA} (char tokenizer)")
        prepare_dataset.prepare([args.corpus], DATA, tokenization="char", fmt="text")

    runs = {"baseline": ("configs/tiny.json", "bos_exp_baseline"),
            "bos_zero": ("configs/tiny_bos_zero.json", "bos_exp_zero")}
    for label, (preset, name) in ({} if args.eval_only else runs).items():
        cfg = load_config(os.path.join(ROOT, preset),
                          {"model_name": name, "dataset_dir": DATA, "out_dir": args.out_dir, "max_iters": args.max_iters,
                           "lr_decay_iters": args.max_iters, "eval_interval": args.max_iters, "log_interval": 100})
        t = time.time()
        summary = train(cfg, log=lambda line, label=label: print(f"[{label}] {line}"))
        if summary["stopped_by_signal"]:  # train.py saved and returned on Ctrl-C / SIGTERM: stop here too
            sys.exit(f"stopped by a signal during the {label} run")
        print(f"[{label}] trained {summary['iter_num']} iterations in {time.time() - t:.0f}s")

    # evaluate: the whole val split; each model as trained and the other way; attention as trained
    reports = {}
    for label, (_, name) in runs.items():
        argv = ["--model_name", name, "--out_dir", args.out_dir, "--dataset_dir", DATA, "--max_windows", "0",
                "--batch_size", "128", "--sweep", "0,0.05,0.2,1.0", "--attention", "--attention_batch", "32",
                "--attention_png", os.path.join(args.out_dir, name, "attention_pos0.png")]
        print(f"\n=== evaluate.py {' '.join(argv)}")
        reports[label] = evaluate.run(evaluate.parse_args(argv))

    os.makedirs(args.docs_dir, exist_ok=True)
    png = evaluate.plot_attention([(f"{label} (eval scaling {reports[label]['attention']['setting']})",
                                    np.array(reports[label]["attention"]["per_head"])) for label in runs],
                                  os.path.join(args.docs_dir, "bos_zero_attention.png"))
    out = os.path.join(args.docs_dir, "bos_zero_results.json")
    with open(out + ".tmp", "w") as f:
        json.dump({"max_iters": args.max_iters, "factor": FACTOR, "reports": reports}, f, indent=2)
    os.replace(out + ".tmp", out)

    print("\n| model | trained with | evaluated with | val loss | val perplexity | loss without each window's first "
          "target |\n|---|---|---|---|---|---|")
    for label, rep in reports.items():
        trained = rep["trained_scaling"]
        rows = {r["setting"]: r for r in rep["results"]}
        rows.update({f"{r['factor']:g}": r for r in rep["sweep"] if f"{r['factor']:g}" not in rows})
        for setting in (evaluate.setting_name(trained), "none" if trained is not None else f"{FACTOR:g}"):
            r = rows[setting]
            print(f"| {label} | {evaluate.setting_name(trained)} | {setting} | {r['loss']:.4f} | "
                  f"{np.exp(r['loss']):.3f} | {r['loss_excl_first']:.4f} |")
    print("\nsweep of the evaluation factor (val perplexity):\n")
    factors = [f"{r['factor']:g}" for r in reports["bos_zero"]["sweep"]]
    print("| model | " + " | ".join(factors) + " |\n|---|" + "---|" * len(factors))
    for label, rep in reports.items():
        print(f"| {label} | " + " | ".join(f"{r['perplexity']:.3f}" for r in rep["sweep"]) + " |")
    n_layer = len(reports["baseline"]["attention"]["per_layer"])
    print(f"\nmean attention on position 0 (all heads, queries 1..63, 32 val windows; uniform attention would give "
          f"{reports['baseline']['attention']['uniform']:.3f}):\n")
    print("| model | " + " | ".join(f"layer {i}" for i in range(n_layer)) + " |\n|---|" + "---|" * n_layer)
    for label, rep in reports.items():
        print(f"| {label} | " + " | ".join(f"{v:.3f}" for v in rep["attention"]["per_layer"]) + " |")
    print(f"\nheat map: {png}\nresults: {out}\ntotal {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
