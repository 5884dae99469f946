"""
Sample from a trained model, or chat with it.

    python sample.py                                        # the model trained last, from the start of a document
    python sample.py --model_name chat_tiny --prompt "Say hello to Ada."   # a chat model answers one turn
    python sample.py --model_name chat_tiny --chat --system "Be brief."    # interactive chat with history
    python sample.py --model_name base_tiny --prompt "ROMEO:" --num_samples 3 --max_new_tokens 200 --top_k 50

Tokens stream as they are generated (KV-cache decoding through engine.py; --num_samples N decodes the N samples
as one batch, each with its own generator seeded --seed + i). A model trained with BOS zero training is sampled
with the same first-position scaling; --no_bos_scaling / --bos_scaling_factor X override it. On the CPU,
--dtype float32 reads its weights in a layout packed for decoding and --dtype int8 decodes with weight-only int8
weights (decode_weights.py).
"""

import argparse
import sys

import torch

from checkpoint import CheckpointError, latest_model_name, load_model
from decode_weights import for_decoding
from engine import Engine, Request
from errors import InputError, one_line_errors
from runtime import add_model_arguments, autocast_context, keep_freed_memory, pick_device, pick_dtype
from tokenizer import TURN_STOPS, chat_prompt


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    p.add_argument("--prompt", default="", help="text to continue; for a chat model, the user's message")
    p.add_argument("--chat", action="store_true", help="interactive chat (history kept; 'quit' or Ctrl-D to end)")
    p.add_argument("--system", default=None, help="system prompt for chat")
    p.add_argument("--num_samples", type=int, default=1)
    p.add_argument("--max_new_tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top_k", type=int, default=200)
    p.add_argument("--top_p", type=float, default=None)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--no_bos_scaling", action="store_true", help="sample a BOS-zero model without the scaling")
    p.add_argument("--bos_scaling_factor", type=float, default=None, help="override the checkpoint's factor")
    return p.parse_args(argv)


class Sampler:
    """A loaded model + tokenizer with the settings to generate from it (used by sample.py and evaluate.py). Every
    sample goes through the batched engine (engine.py): one request alone, or --num_samples N as one batch.
    The model's Linears are laid out for decoding (decode_weights.py: fp32 packed, or int8), in place."""

    def __init__(self, model, tok, ckpt, device, dtype="float32", max_batch_size=1):
        self.model, self.tok, self.device = for_decoding(model, dtype, max_batch_size).eval(), tok, device
        self.is_chat = ckpt.get("data_format") == "chat"
        self.ctx = lambda: autocast_context("cuda" if device.startswith("cuda") else device, dtype)
        self.engine = Engine(self.model, tok, max_batch_size, autocast=self.ctx)

    def request(self, ids, max_new_tokens, stop_at_eot, **kw):
        """An engine request for one sample after `ids`. Stops at the end-of-text token (the end of an assistant
        turn) when stop_at_eot, and, for chat, also when the model starts a new user turn on its own (cut there).
        kw: temperature, top_k, top_p, seed or generator."""
        return Request(self.cropped(ids), max_new_tokens, stop_tokens=(self.tok.eot_token,) if stop_at_eot else (),
                       stop=TURN_STOPS if self.is_chat else (), **kw)

    def cropped(self, ids):
        bs = self.model.config.block_size
        if len(ids) >= bs:
            print(f"[notice: prompt of {len(ids)} tokens cropped to the last {bs - 1} (block_size {bs})]", file=sys.stderr)
            ids = self.model.context_window(torch.tensor([ids]), len(ids), bs - 1)[0].tolist()  # BOS-zero: BOS kept
        return list(ids)

    def stream(self, ids, max_new_tokens, stop_at_eot, out=None, **kw):
        """Generate after `ids` for one sample, writing text to `out` as it comes; returns the generated text."""
        req = self.request(ids, max_new_tokens, stop_at_eot, **kw)
        for _, piece, _ in self.engine.run([req]):
            if out:
                out.write(piece), out.flush()
        return req.text

    def reply(self, turns, max_new_tokens=200, out=None, **kw):
        """The assistant's next turn after [(role, content), ...], rendered with the training chat template."""
        return self.stream(chat_prompt(self.tok, turns), max_new_tokens, stop_at_eot=True, out=out, **kw).strip()


@one_line_errors
def main(argv=None):
    args = parse_args(argv)
    device = pick_device(args.device)
    name = args.model_name or latest_model_name(args.out_dir)
    if name is None:
        raise CheckpointError(f"no trained model in {args.out_dir}/: train one first, e.g. "
                              f"python train.py --config_file configs/tiny_sft.json")
    if not args.model_name:
        print(f"[sampling from '{name}', the model trained last; choose another with --model_name]", file=sys.stderr)
    model, tok, ckpt = load_model(name, args.out_dir, device, prefer="best.pt" if args.checkpoint == "best" else "ckpt.pt")
    if args.bos_scaling_factor is not None:
        if not 0.0 <= args.bos_scaling_factor <= 1.0:
            raise InputError(f"--bos_scaling_factor {args.bos_scaling_factor} must lie in [0, 1]")
        model.config.use_bos_zero_training = True
        model.config.bos_scaling_factor = args.bos_scaling_factor
    if args.no_bos_scaling:
        model.config.use_bos_zero_training = False
    if args.num_samples < 1 or args.max_new_tokens < 1:
        raise InputError("--num_samples and --max_new_tokens must be >= 1")

    device_type = "cuda" if device.startswith("cuda") else device
    if device_type == "cpu":
        keep_freed_memory()  # as train.py does: no page faults on the big per-call buffers
    dtype = pick_dtype(args.dtype, device_type)
    sampler = Sampler(model, tok, ckpt, device, dtype, max_batch_size=min(args.num_samples, 8))
    gen = torch.Generator(device=device).manual_seed(args.seed)
    kw = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, generator=gen)
    if model.config.use_bos_zero_training:
        print(f"[BOS zero: position 0 scaled by {model.config.bos_scaling_factor}]", file=sys.stderr)

    if args.chat:
        turns = [("system", args.system)] if args.system else []
        print("chat with the model ('quit' or Ctrl-D to end)", file=sys.stderr)
        while True:
            try:
                user = input("\nyou> ").strip()
            except EOFError:
                break
            if user in ("quit", "exit"):
                break
            if not user:
                continue
            turns.append(("user", user))
            sys.stdout.write("model> ")
            answer = sampler.reply(turns, args.max_new_tokens, out=sys.stdout, **kw)
            sys.stdout.write("\n")
            turns.append(("assistant", answer))
        return

    # --num_samples N: one batch of N rows, each with its own generator (seeds seed, seed + 1, ...); the first
    # sample streams as it is generated, the others are printed when the batch is done
    if sampler.is_chat and args.prompt:  # one chat turn
        turns = ([("system", args.system)] if args.system else []) + [("user", args.prompt)]
        ids, stop, shown = chat_prompt(tok, turns), True, ""
    else:
        ids = [tok.eot_token] + tok.encode(args.prompt)  # BOS first: how every document began in training
        stop, shown = False, args.prompt
    ids = sampler.cropped(ids)
    kw = {k: v for k, v in kw.items() if k != "generator"}
    reqs = [sampler.request(ids, args.max_new_tokens, stop, seed=args.seed + i, **kw) for i in range(args.num_samples)]
    rule = "-" * 40 + "\n" if args.num_samples > 1 else ""
    sys.stdout.write(shown)
    for req, piece, _ in sampler.engine.run(reqs):
        if req is reqs[0]:
            sys.stdout.write(piece), sys.stdout.flush()
    sys.stdout.write("\n" + rule)
    for req in reqs[1:]:
        sys.stdout.write(shown + req.text + "\n" + rule)


if __name__ == "__main__":
    main()
