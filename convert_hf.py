"""
The converter's command line: a Hugging Face GPT-2 in, a project model out (the mapping itself is hf.py).

    python convert_hf.py --hf_dir path/to/gpt2 --model_name gpt2        # -> checkpoints/gpt2/ckpt.pt
    python convert_hf.py --model_name my_model --export_dir out/my_hf   # -> a dir GPT2LMHeadModel loads
"""

import argparse
import os
import sys
import time

import checkpoint
from config import TrainConfig, config_dict
from errors import InputError, one_line_errors
from hf import export_hf, load_hf_gpt2


def convert_to_checkpoint(hf_dir, model_name, out_dir="checkpoints", overwrite=False):
    """HF directory -> <out_dir>/<model_name>/ckpt.pt (+ tokenizer_state.json), a normal project checkpoint."""
    path = os.path.join(checkpoint.model_dir(out_dir, model_name), "ckpt.pt")
    if os.path.exists(path) and not overwrite:
        raise InputError(f"{path}: already exists; pass --overwrite to replace it or choose another --model_name")
    model, tok = load_hf_gpt2(hf_dir)
    c = model.config
    cfg = TrainConfig(model_name=model_name, out_dir=out_dir, init_from=hf_dir, n_layer=c.n_layer, n_head=c.n_head,
                      n_embd=c.n_embd, block_size=c.block_size, vocab_size=c.vocab_size, dropout=c.dropout,
                      bias=c.bias)
    ckpt = checkpoint.make_checkpoint(model.state_dict(), vars(c), config_dict(cfg), tok.state_dict())
    checkpoint.atomic_save(ckpt, path)
    tok.save(os.path.join(os.path.dirname(path), "tokenizer_state.json"))
    return path, model


@one_line_errors
def main(argv=None):
    p = argparse.ArgumentParser(description="Convert a Hugging Face GPT-2 into a project checkpoint, or export a "
                                            "project model as a Hugging Face GPT-2 directory.")
    p.add_argument("--hf_dir", help="Hugging Face GPT-2 directory (or hub id) to convert")
    p.add_argument("--model_name", help="project model: written by --hf_dir, read by --export_dir")
    p.add_argument("--out_dir", default="checkpoints", help="where project checkpoints live")
    p.add_argument("--export_dir", help="write the model as a Hugging Face directory here")
    p.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint of --model_name")
    args = p.parse_args(argv)
    t0 = time.time()
    if not args.model_name or bool(args.hf_dir) == bool(args.export_dir):
        raise InputError("give --model_name and exactly one of --hf_dir DIR (convert) or --export_dir DIR (export)")
    if args.hf_dir:
        path, model = convert_to_checkpoint(args.hf_dir, args.model_name, args.out_dir, args.overwrite)
        print(f"converted {args.hf_dir} -> {path} ({model.get_num_params():,} parameters)")
    else:
        model, tok, _ = checkpoint.load_model(args.model_name, args.out_dir)
        export_hf(model, tok, args.export_dir)
        print(f"exported {args.model_name} -> {args.export_dir}")
    import resource  # Unix only; ru_maxrss is in KiB on Linux (bytes on macOS)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"time {time.time() - t0:.1f}s, peak memory {peak:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
