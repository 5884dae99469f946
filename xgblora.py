"""
XGBLoRA: gradient boosting with rank-1 LoRA boosters (as mezo.py is for MeZO).

One rank-1 booster (LoRA with rank 1, on q and v by default, the paper's choice) trains for a while; then it is
merged into the weights (W += scaling * B @ A) and a fresh booster starts on the merged model. The optimizer state
belonged to the old booster and is dropped; the learning-rate schedule goes on. After K merges the model holds a
rank-K update made of K boosters, while training never holds more than one rank-1 adapter.

    python train.py --config_file configs/tiny_xgblora_sft.json

Settings (config.py): xgblora_steps_per_iteration (merge every N optimizer steps; 0 = by epochs),
xgblora_merge_frequency (with 0 above: merge at the end of every N epochs), xgblora_layers_per_iteration (0 = a
booster on every layer; K = K random layers per booster, the paper's layer sampling).
"""

import random

import lora


def booster_kwargs(cfg, n_layer, merges):
    """apply_lora's kwargs for the booster that follows `merges` merges. The layers a booster sits on (when only K
    are sampled) are derived from the seed and the merge count, so a resumed run picks the same ones with no state
    of its own."""
    layers = None
    if cfg.xgblora_layers_per_iteration:
        rng = random.Random(cfg.seed * 100003 + merges)
        layers = sorted(rng.sample(range(n_layer), cfg.xgblora_layers_per_iteration))
    return dict(rank=1, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, targets=cfg.lora_target, layers=layers)


def place_booster(model, cfg, merges=0):
    """Put the next rank-1 booster on the model (freezing the rest). Returns its apply_lora kwargs."""
    kwargs = booster_kwargs(cfg, model.config.n_layer, merges)
    lora.apply_lora(model, **kwargs)
    return kwargs


def merge_due(iter_num, cfg, steps_per_epoch):
    """Merge after this optimizer step? Every N steps, or (N = 0) at the end of every `merge_frequency` epochs,
    an epoch being ceil(train tokens / tokens per optimizer step) steps."""
    if iter_num == 0:
        return False
    every = cfg.xgblora_steps_per_iteration or steps_per_epoch * cfg.xgblora_merge_frequency
    return iter_num % every == 0


def merge_and_restart(model, cfg, merges):
    """Merge the booster into the weights and place a fresh one (the `merges`-th merge has just happened).
    Returns the new booster's kwargs. The caller builds a new optimizer: the old one holds the old booster."""
    lora.remove_lora(model)
    return place_booster(model, cfg, merges)
