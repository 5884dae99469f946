"""
Fine-tuning methods side by side (docs/finetune_methods.md): full fine-tuning, LoRA rank 8, XGBLoRA (rank-1
boosters merged into the weights every N steps), MeZO on the full model and MeZO on LoRA adapters. One SFT task
(the shipped sample conversations, masked loss: only the assistant's tokens count), one base model, one step
budget.

    python -m experiments.finetune_methods                  # from the project root; all of it (~10 min, 2 CPU cores)
    python -m experiments.finetune_methods --only methods   # the fine-tuning comparison alone
    python -m experiments.finetune_methods --only memory    # the 124M-shape memory benchmark alone

1. base: configs/tiny.json (4 layers x 128, block 64, char tokens) pretrained on the sample conversations with
   the plain next-token loss, BASE_ITERS steps (model fm_base).
2. methods: each fine-tunes fm_base with --init_from_model fm_base --use_loss_mask true for STEPS steps at the
   same batch (12 x 64), each with a learning rate suited to the method; every run is the train.py command the
   script prints. Reported: trainable parameters, the run's peak RSS, the final val loss (40 fixed batches).
3. memory: mezo_memory_benchmark(): one step of each method at the GPT-2 124M shape, batch 4 x 256, in a fresh
   process each (see there for how the peak is measured).

Results are printed as markdown tables and written to checkpoints/finetune_methods*.json.
"""

import argparse
import gc
import json
import os
import re
import resource
import subprocess
import sys
import time

if __package__ in (None, ""):  # run as a file: experiments/, not the project root, would be on sys.path
    sys.exit("error: run it from the project root as a module: python -m experiments.finetune_methods")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

BASE_ITERS = 600
STEPS = 300
COMMON = ["--init_from_model", "fm_base", "--use_loss_mask", "true", "--batch_size", "12", "--block_size", "64",
          "--dropout", "0.0", "--warmup_iters", "20", "--eval_iters", "40", "--log_interval", "50", "--seed", "1337"]
# method -> its own flags. Learning rates from a short sweep on this task (300 steps, val loss; see docs/):
# full 1e-4 / 3e-4 / 1e-3, LoRA 1e-3 / 3e-3 / 1e-2, XGBLoRA lr x alpha x merge interval x targets, MeZO full
# 1e-5 / 3e-5 / 1e-4, MeZO LoRA 3e-4 / 1e-3; the best of each is used here (the xgblora and mezo ones are the presets).
METHODS = {
    "full fine-tuning (AdamW)": ["--finetuning_type", "full", "--learning_rate", "3e-4", "--min_lr", "3e-5"],
    "LoRA r8 (AdamW)": ["--finetuning_type", "lora", "--lora_rank", "8", "--lora_alpha", "16", "--lora_target", "all",
                        "--learning_rate", "3e-3", "--min_lr", "3e-4"],
    "XGBLoRA r1, merge every 50 steps (AdamW)": ["--config_file", "configs/tiny_xgblora_sft.json"],
    "LoRA r1, no merges (AdamW; XGBLoRA's control)": ["--config_file", "configs/tiny_xgblora_sft.json",
                                                      "--finetuning_type", "lora", "--xgblora_steps_per_iteration", "0",
                                                      "--merge_lora", "false"],
    "MeZO full": ["--config_file", "configs/tiny_mezo_sft.json"],
    "MeZO LoRA r8": ["--config_file", "configs/tiny_mezo_sft.json", "--finetuning_type", "lora", "--lora_rank", "8",
                     "--lora_alpha", "16", "--lora_target", "all", "--learning_rate", "3e-4"],
}
# the children run on one thread unless OMP_NUM_THREADS says otherwise: at these shapes one thread is about as fast
# as two, and it does not stall (10-50x) when other jobs share the machine's two cores
CHILD_ENV = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), PYTHONUNBUFFERED="1")


def run_train(args, log_path):
    """Run `python train.py args` as a child; returns (stdout, peak RSS of that child in MiB, seconds). The child's
    own peak comes from wait4's rusage (ru_maxrss of that process alone, not the max over all children)."""
    cmd = [sys.executable, "train.py", *args]
    print("$ python train.py " + " ".join(args), flush=True)
    t0 = time.time()
    with open(log_path, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, text=True, env=CHILD_ENV)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    with open(log_path) as f:
        text = f.read()
    if proc.returncode != 0:
        raise RuntimeError(f"train.py failed ({log_path}): {text.strip().splitlines()[-1] if text.strip() else '?'}")
    return text, usage.ru_maxrss / 1024, time.time() - t0


def parse_run(text):
    """(trainable parameters, first val loss, last val loss) from a train.py log."""
    trainable = re.search(r"\(trainable ([\d,]+),", text)
    evals = re.findall(r"^step \d+: train loss [\d.]+, val loss ([\d.]+)", text, flags=re.M)
    if not trainable or not evals:
        raise RuntimeError("train.py printed no parameter count or no evaluation line")
    return int(trainable.group(1).replace(",", "")), float(evals[0]), float(evals[-1])


def methods_experiment(base_iters=BASE_ITERS, steps=STEPS, log_dir=None):
    log_dir = log_dir or os.path.join(ROOT, "checkpoints", "finetune_methods_logs")
    os.makedirs(log_dir, exist_ok=True)
    rows = []
    base_args = ["--config_file", "configs/tiny.json", "--model_name", "fm_base", "--max_iters", str(base_iters),
                 "--lr_decay_iters", str(base_iters), "--eval_interval", str(base_iters), "--eval_iters", "40",
                 "--log_interval", "100"]
    text, rss, secs = run_train(base_args, os.path.join(log_dir, "fm_base.log"))
    _, _, base_val = parse_run(text)
    print(f"base: val loss {base_val:.4f} (unmasked next-token loss) in {secs:.0f}s", flush=True)
    for i, (name, flags) in enumerate(METHODS.items()):
        model_name = f"fm_{i}"
        args = [*flags, "--model_name", model_name, *COMMON, "--max_iters", str(steps), "--lr_decay_iters", str(steps),
                "--eval_interval", str(steps)]
        text, rss, secs = run_train(args, os.path.join(log_dir, model_name + ".log"))
        trainable, start_val, final_val = parse_run(text)
        merges = text.count("XGBLoRA merge")
        rows.append(dict(method=name, trainable=trainable, start_val=start_val, final_val=final_val, peak_rss_mib=rss,
                         seconds=secs, merges=merges, command="python train.py " + " ".join(args)))
        print(f"{name}: val loss {start_val:.4f} -> {final_val:.4f}, trainable {trainable:,}, peak RSS {rss:.0f} MiB, "
              f"{secs:.0f}s", flush=True)
    return rows


# ---------------------------------------------------------------------------------------------------------------
# memory

MEMORY_METHODS = ("inference", "mezo_full", "mezo_lora", "adamw_full", "adamw_lora", "adamw_xgblora")


def _rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _reset_peak():
    """Reset this process's peak-RSS high-water mark to its current RSS (Linux >= 4.0: clear_refs '5'). Both
    /proc/self/status VmHWM and getrusage's ru_maxrss then count from here."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _memory_child(method, batch_size, seq_len, dtype):
    """In a fresh process: build the 124M-shape GPT (+ adapters), reset the peak, take 2 steps, report MiB."""
    import torch

    import mezo
    from config import load_config
    from model import GPT, GPTConfig
    from train import apply_finetuning

    torch.manual_seed(0)
    gc.collect()
    rss_imports = _rss_mib()
    model = GPT(GPTConfig(dropout=0.0))  # 12 layers x 768, vocab 50304, block 1024, biases: GPT-2 124M
    kind = method.split("_")[-1] if method != "inference" else "full"
    cfg = load_config(None, {"finetuning_type": kind, "lora_rank": 1 if kind == "xgblora" else 8, "lora_target": "all"})
    apply_finetuning(model, cfg)
    optimizer = model.configure_optimizers(0.1, 3e-4, (0.9, 0.99), "cpu") if method.startswith("adamw") else None
    X = torch.randint(0, 50257, (batch_size, seq_len))
    Y = torch.randint(0, 50257, (batch_size, seq_len))
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bfloat16" else torch.autocast("cpu", enabled=False)
    gc.collect()
    rss_model = _rss_mib()
    _reset_peak()
    t0 = time.time()
    for step in range(2):  # the second step runs with the AdamW moments already allocated: the steady state
        with ctx:
            if method == "inference":
                model.eval()
                with torch.no_grad():
                    model(X, Y)  # with the loss, as MeZO's forwards
            elif method.startswith("mezo"):
                mezo.zo_step(model, (X, Y), lr=1e-6, eps=1e-3, weight_decay=0.0, seed=step)
            else:
                model.train()
                _, loss = model(X, Y)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(json.dumps(dict(method=method, rss_imports=rss_imports, rss_model=rss_model, peak=peak, trainable=trainable,
                          seconds_per_step=(time.time() - t0) / 2)))


def mezo_memory_benchmark(batch_size=4, seq_len=256, dtype="float32", methods=MEMORY_METHODS):
    """Peak memory of one training step of each method at the GPT-2 124M shape on CPU, batch batch_size x seq_len.

    How it is measured, and why this way: each method runs in a fresh Python process (a peak is a per-process
    high-water mark, and a process that already ran another method would keep that method's freed memory in its
    allocator). The child imports torch, notes its RSS (A), builds the model and adapters (and the optimizer),
    notes its RSS (B), resets the kernel's peak-RSS mark to B (/proc/self/clear_refs, so the model's construction
    transients are not counted), takes two steps, and reads the peak with getrusage(RUSAGE_SELF).ru_maxrss.
    tracemalloc would miss torch's allocations (they bypass Python's allocator), hence RSS.
    Reported in MiB: `total` = peak - A (the model plus everything the step needs: what training costs above an
    idle Python with torch loaded) and `step` = peak - B (the step alone, on top of the resident model).
    The ratios are taken on `total`, the figure MeZO's "inference memory" claim is about."""
    results = {}
    for method in methods:
        cmd = [sys.executable, "-m", "experiments.finetune_methods", "--_memory_child", method,
               "--batch_size", str(batch_size), "--seq_len", str(seq_len), "--dtype", dtype]
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=CHILD_ENV)
        if r.returncode != 0:
            last = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else "?"
            raise RuntimeError(f"memory child {method} failed: {last}")
        m = json.loads(r.stdout.strip().splitlines()[-1])
        m["total"] = m["peak"] - m["rss_imports"]
        m["step"] = m["peak"] - m["rss_model"]
        m["model"] = m["rss_model"] - m["rss_imports"]
        results[method] = m
        print(f"{method}: total {m['total']:.0f} MiB (model {m['model']:.0f} + step {m['step']:.0f}), "
              f"{m['seconds_per_step']:.1f}s/step", flush=True)
    if "inference" in results:
        for m in results.values():
            m["vs_inference"] = m["total"] / results["inference"]["total"]
    return results


# ---------------------------------------------------------------------------------------------------------------

def markdown(rows, memory):
    out = []
    if rows:
        out += ["| method | trainable params | val loss before -> after | peak RSS of the run | time |",
                "|---|---:|---:|---:|---:|"]
        for r in rows:
            out.append(f"| {r['method']} | {r['trainable']:,} | {r['start_val']:.4f} -> **{r['final_val']:.4f}** | "
                       f"{r['peak_rss_mib']:.0f} MiB | {r['seconds']:.0f} s |")
    if memory:
        out += ["", "| step (124M shape) | trainable | model + step peak | of which the step | vs inference |",
                "|---|---:|---:|---:|---:|"]
        for name, m in memory.items():
            ratio = f"{m['vs_inference']:.2f}x" if "vs_inference" in m else "-"
            out.append(f"| {name} | {m['trainable']:,} | {m['total']:.0f} MiB | {m['step']:.0f} MiB | {ratio} |")
        if "mezo_full" in memory and "adamw_full" in memory:
            out.append(f"\nMeZO full / inference: {memory['mezo_full']['vs_inference']:.2f}x; "
                       f"AdamW full / MeZO full: {memory['adamw_full']['total'] / memory['mezo_full']['total']:.2f}x")
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description="Compare full FT, LoRA, XGBLoRA and MeZO on the sample chat SFT task, and "
                                            "benchmark MeZO's memory at the 124M shape.")
    p.add_argument("--only", choices=("methods", "memory"), help="run one part")
    p.add_argument("--steps", type=int, default=STEPS, help="fine-tuning steps per method")
    p.add_argument("--base_iters", type=int, default=BASE_ITERS, help="pretraining steps of the base")
    p.add_argument("--batch_size", type=int, default=4, help="memory benchmark batch")
    p.add_argument("--seq_len", type=int, default=256, help="memory benchmark sequence length")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="memory benchmark precision")
    p.add_argument("--_memory_child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._memory_child:
        _memory_child(args._memory_child, args.batch_size, args.seq_len, args.dtype)
        return
    if not os.path.exists("/proc/self/clear_refs"):
        print("error: the memory benchmark needs Linux (/proc/self/clear_refs resets the peak-RSS mark)",
              file=sys.stderr)
        sys.exit(1)
    try:
        rows = methods_experiment(args.base_iters, args.steps) if args.only != "memory" else []
        memory = mezo_memory_benchmark(args.batch_size, args.seq_len, args.dtype) if args.only != "methods" else {}
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    print()
    print(markdown(rows, memory))
    part = f"_{args.only}" if args.only else ""
    part += "_bf16" if args.dtype == "bfloat16" else ""
    path = os.path.join(ROOT, "checkpoints", f"finetune_methods{part}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump({"methods": rows, "memory": memory}, f, indent=2)
    os.replace(path + ".tmp", path)
    print(f"\nresults written to {path}")


if __name__ == "__main__":
    main()
