"""
The converter's command line: a Hugging Face GPT-2 in, a project model out, and peft LoRA adapters both ways (the
mapping itself is hf.py and hf_adapters.py).

    python convert_hf.py --hf_dir path/to/gpt2 --model_name gpt2        # -> checkpoints/gpt2/ckpt.pt
    python convert_hf.py --model_name my_model --export_dir out/my_hf   # -> a dir GPT2LMHeadModel loads
    python convert_hf.py --model_name my_lora --export_adapter_dir out/my_lora_peft     # -> a peft LoRA adapter
    python convert_hf.py --hf_dir path/to/gpt2 --adapter_dir peft_dir --model_name run  # peft adapter -> LoRA run
"""

import argparse
import os
import sys
import time

import checkpoint
import hf_adapters
import lora
from config import TrainConfig, config_dict
from errors import ExistsError, InputError, first_line, one_line_errors
from hf import (HUB_ID, export_hf, has_project_chat_template, load_hf_gpt2, read_hf_config, read_peft_adapter,
                resolve_hf_dir, write_peft_adapter)
from tokenizer import Tokenizer


def convert_to_checkpoint(hf_dir, model_name, out_dir="checkpoints", overwrite=False):
    """HF directory -> <out_dir>/<model_name>/ckpt.pt (+ tokenizer_state.json), a normal project checkpoint."""
    path = os.path.join(checkpoint.model_dir(out_dir, model_name), "ckpt.pt")
    if os.path.exists(path) and not overwrite:
        raise ExistsError(f"{path}: already exists; pass --overwrite to replace it or choose another --model_name")
    model, tok = load_hf_gpt2(hf_dir)
    c = model.config
    cfg = TrainConfig(model_name=model_name, out_dir=out_dir, init_from=hf_dir, n_layer=c.n_layer, n_head=c.n_head,
                      n_embd=c.n_embd, block_size=c.block_size, vocab_size=c.vocab_size, dropout=c.dropout,
                      bias=c.bias)
    ckpt = checkpoint.make_checkpoint(model.state_dict(), vars(c), config_dict(cfg), tok.state_dict())
    checkpoint.atomic_save(ckpt, path)
    tok.save(os.path.join(os.path.dirname(path), "tokenizer_state.json"))
    return path, model


# ---------------------------------------------------------------------------------------------------------------
# peft adapters out and in

def adapter_base(ckpt, path, model_name):
    """The Hugging Face GPT-2 a LoRA run's adapters sit on (its path or hub id), or a one-line refusal that says
    what to export instead."""
    whole = f"export the whole model with --model_name {model_name} --export_dir DIR instead"
    if (ckpt.get("config") or {}).get("finetuning_type") == "xgblora":
        raise InputError(f"{path}: '{model_name}' is an XGBLoRA run: its boosters were merged into the weights as it "
                         f"trained, so no adapter on its base reproduces it; {whole}")
    if not ckpt.get("lora"):
        raise InputError(f"{path}: '{model_name}' is not a LoRA run (it holds no adapters); {whole}")
    base = ckpt.get("base") or {}
    if base.get("kind") != "hf":
        on = f"project model '{base['name']}'" if base.get("kind") == "model" else "a model trained from scratch"
        raise InputError(f"{path}: the adapters of '{model_name}' sit on {on}, not on a Hugging Face GPT-2 directory, "
                         f"so peft has no base to put them on; {whole}")
    where = base["path"]
    if os.path.exists(where) or not HUB_ID.match(where):  # a local path, not a hub id: still a GPT-2 there?
        try:
            read_hf_config(where)
        except (ValueError, OSError) as e:
            raise InputError(f"{path}: the run's base {where} is not a Hugging Face GPT-2 directory any more "
                             f"({first_line(e)}); {whole}") from None
    if ckpt["model_args"].get("use_bos_zero_training") and ckpt["model_args"].get("bos_scaling_factor") != 1.0:
        raise InputError(f"{path}: '{model_name}' uses use_bos_zero_training, which a peft adapter on a Hugging Face "
                         f"GPT-2 cannot express (its logits would differ)")
    return where


def export_adapter(model_name, adapter_dir, out_dir="checkpoints"):
    """A LoRA run on a Hugging Face GPT-2 -> adapter_dir with adapter_config.json + adapter_model.safetensors,
    which PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(base), adapter_dir) loads. A chat run's
    adapter also gets the tokenizer files with the chat template (AutoTokenizer.from_pretrained(adapter_dir)),
    which an import reads back as a chat model. Returns the adapter config."""
    path = checkpoint.find_checkpoint(model_name, out_dir)
    ckpt = checkpoint.load_checkpoint(path)
    base = adapter_base(ckpt, path, model_name)
    state, ranks = hf_adapters.lora_to_peft(ckpt["model"], ckpt["lora"], ckpt["model_args"]["n_layer"])
    config = hf_adapters.peft_adapter_config(ckpt["lora"], ranks, base)
    chat = ckpt.get("data_format") == "chat"
    write_peft_adapter(state, config, adapter_dir, Tokenizer.from_state(ckpt["tokenizer"]) if chat else None)
    return config


def import_adapter(hf_dir, adapter_dir, model_name, out_dir="checkpoints", overwrite=False):
    """A peft LoRA adapter for the GPT-2 in hf_dir -> <out_dir>/<model_name>/ckpt.pt, a LoRA run on that base
    (adapters only, the base named), as train.py writes one: sample.py, evaluate.py and train.py --init_from
    resume take it. Returns (path, lora kwargs, data format)."""
    path = os.path.join(checkpoint.model_dir(out_dir, model_name), "ckpt.pt")
    if os.path.exists(path) and not overwrite:
        raise ExistsError(f"{path}: already exists; pass --overwrite to replace it or choose another --model_name")
    config, state, where = read_peft_adapter(adapter_dir)
    model, tok = load_hf_gpt2(hf_dir)
    c = model.config
    kwargs, adapters = hf_adapters.peft_to_lora(config, state, c.n_layer, c.n_embd, where)
    lora.apply_lora(model, **kwargs)
    missing, unexpected = model.load_state_dict(adapters, strict=False)
    missing = [k for k in missing if lora._is_lora_key(k)]
    if missing or unexpected:  # peft_to_lora checked every name: this would be a bug here, not bad input
        raise RuntimeError(f"{where}: adapters did not load: missing {missing[:3]}, unexpected {unexpected[:3]}")
    base = {"kind": "hf", "path": os.path.abspath(hf_dir) if os.path.isdir(hf_dir) else hf_dir}
    # the config holds only what the adapters fix: train.py --init_from resume checks the keys a config holds and
    # takes the rest (block_size, learning rate, ...) from the resuming run's own settings
    lora_keys = dict(finetuning_type="lora", lora_rank=kwargs["rank"], lora_alpha=kwargs["alpha"],
                     lora_dropout=kwargs["dropout"], lora_target=kwargs["targets"])
    run_config = config_dict(TrainConfig(model_name=model_name, out_dir=out_dir, init_from=base["path"], **lora_keys))
    run_config = {k: run_config[k] for k in ("model_name", "out_dir", "init_from", *lora_keys)}
    fmt = "chat" if has_project_chat_template(adapter_dir, resolve_hf_dir(hf_dir)) else "text"
    ckpt = checkpoint.make_checkpoint(adapters, vars(c), run_config, tok.state_dict(), lora=kwargs, base=base,
                                      data_format=fmt)
    checkpoint.atomic_save(ckpt, path)
    tok.save(os.path.join(os.path.dirname(path), "tokenizer_state.json"))
    return path, kwargs, fmt


# ---------------------------------------------------------------------------------------------------------------
# command line

def parse_args(argv):
    p = argparse.ArgumentParser(description="Convert a Hugging Face GPT-2 (and a peft LoRA adapter for it) into a "
                                            "project checkpoint, or export a project model as a Hugging Face GPT-2 "
                                            "directory (or a LoRA run as a peft adapter).")
    p.add_argument("--hf_dir", help="Hugging Face GPT-2 directory (or hub id) to convert")
    p.add_argument("--adapter_dir", help="with --hf_dir: a peft LoRA adapter for that GPT-2, imported as a LoRA run")
    p.add_argument("--model_name", help="project model: written by --hf_dir, read by --export_dir")
    p.add_argument("--out_dir", default="checkpoints", help="where project checkpoints live")
    p.add_argument("--export_dir", help="write the model as a Hugging Face directory here")
    p.add_argument("--export_adapter_dir", help="write a LoRA run's adapters as a peft adapter directory here")
    p.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint of --model_name")
    args = p.parse_args(argv)
    if not args.model_name or sum(bool(m) for m in (args.hf_dir, args.export_dir, args.export_adapter_dir)) != 1:
        raise InputError("give --model_name and exactly one of --hf_dir DIR (convert; + --adapter_dir PEFT_DIR to "
                         "import an adapter), --export_dir DIR or --export_adapter_dir DIR (export)")
    if args.adapter_dir and not args.hf_dir:
        raise InputError("--adapter_dir needs --hf_dir: the Hugging Face GPT-2 the adapter was trained on")
    return args


@one_line_errors
def main(argv=None):
    args = parse_args(argv)
    t0 = time.time()
    if args.adapter_dir:
        path, kw, fmt = import_adapter(args.hf_dir, args.adapter_dir, args.model_name, args.out_dir, args.overwrite)
        targets = ",".join(kw["targets"])
        print(f"imported {args.adapter_dir} (LoRA rank {kw['rank']}, alpha {kw['alpha']:g}, targets {targets}) on "
              f"{args.hf_dir} -> {path} ({fmt} model); train it further with train.py --init_from resume "
              f"--model_name {args.model_name} --finetuning_type lora --lora_rank {kw['rank']} --lora_target "
              f"{targets} --dataset_dir DATA")
    elif args.hf_dir:
        path, model = convert_to_checkpoint(args.hf_dir, args.model_name, args.out_dir, args.overwrite)
        print(f"converted {args.hf_dir} -> {path} ({model.get_num_params():,} parameters)")
    elif args.export_adapter_dir:
        config = export_adapter(args.model_name, args.export_adapter_dir, args.out_dir)
        print(f"exported the adapters of {args.model_name} -> {args.export_adapter_dir} (peft LoRA, r {config['r']}, "
              f"targets {','.join(config['target_modules'])}, base {config['base_model_name_or_path']})")
    else:
        model, tok, ckpt = checkpoint.load_model(args.model_name, args.out_dir)
        chat = ckpt.get("data_format") == "chat"
        export_hf(model, tok, args.export_dir, chat=chat)
        print(f"exported {args.model_name} -> {args.export_dir}{' (with its chat template)' if chat else ''}")
    import resource  # Unix only; ru_maxrss is in KiB on Linux (bytes on macOS)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"time {time.time() - t0:.1f}s, peak memory {peak:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
