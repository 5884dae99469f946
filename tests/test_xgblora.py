"""XGBLoRA through train.py: a merge keeps the function and starts a zero booster; merges come every N steps or
at the end of every `merge_frequency` epochs; resume across a merge is exact; the result exports; bad settings
are clear errors."""

import json
import math

import pytest
import torch

import lora
import prepare_dataset
from checkpoint import load_checkpoint, load_model
from config import ConfigError, load_config
from conftest import SAMPLE_CHAT, SHAKESPEARE, make_hf_gpt2
from model import GPT, GPTConfig
from runtime import get_lr
from train import TrainError, apply_finetuning, train

SMALL = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, batch_size=4, eval_iters=2, log_interval=1,
             warmup_iters=2, learning_rate=3e-3, min_lr=3e-4, finetuning_type="xgblora")


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.one_thread: tiny shapes


def run(tmp_path, dataset, **overrides):
    cfg = load_config(None, {**SMALL, "out_dir": str(tmp_path / "ckpt"), "dataset_dir": dataset, **overrides})
    lines = []
    summary = train(cfg, log=lines.append)
    return summary, lines


def metrics(tmp_path, name):
    with open(tmp_path / "ckpt" / name / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def test_merge_keeps_logits_and_the_new_booster_outputs_zero():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=50, n_layer=3, n_head=2, n_embd=32, bias=True))
    cfg = load_config(None, {"finetuning_type": "xgblora"})
    assert cfg.lora_rank == 1 and cfg.lora_target == ["q", "v"]  # XGBLoRA's defaults
    apply_finetuning(model, cfg)
    with torch.no_grad():  # a trained booster: B is no longer zero
        for m in lora.lora_layers(model):
            for A, B, _, _ in m.adapters():
                B.normal_(0, 0.05)
    model.eval()
    idx = torch.randint(0, 50, (2, 16))
    before, _ = model(idx)
    lora.remove_lora(model)  # exactly what train.py does at a merge
    kwargs = apply_finetuning(model, cfg, merge_count=1)
    after, _ = model(idx)
    assert (after - before).abs().max().item() <= 1e-5
    layers = lora.lora_layers(model)
    assert len(layers) == 3 and kwargs["rank"] == 1
    x = torch.randn(2, 16, 32)
    for m in layers:
        assert set(m.slices) == {"q", "v"}
        for A, B, _, _ in m.adapters():
            assert A.shape[0] == 1 and A.abs().sum() > 0 and torch.count_nonzero(B) == 0
            assert torch.count_nonzero((x @ A.t()) @ B.t()) == 0  # the booster's output: exactly zero
    trainable, _ = lora.count_parameters(model)
    assert trainable == 3 * 2 * (32 + 32)  # 3 layers x (q, v) x (A: 1 x 32, B: 32 x 1)

    # layer sampling: K random layers per booster, a function of the merge count (so resume needs no state)
    cfg = load_config(None, {"finetuning_type": "xgblora", "xgblora_layers_per_iteration": 1, "n_layer": 3})
    picks = []
    for merge in range(6):
        lora.remove_lora(model)
        picks.append(tuple(apply_finetuning(model, cfg, merge_count=merge)["layers"]))
        assert len(lora.lora_layers(model)) == 1
    assert len(set(picks)) > 1
    lora.remove_lora(model)
    assert tuple(apply_finetuning(model, cfg, merge_count=2)["layers"]) == picks[2]


def test_merges_every_n_steps_reset_the_optimizer_and_keep_the_schedule(tmp_path, sample_chat):
    summary, lines = run(tmp_path, sample_chat, model_name="steps", xgblora_steps_per_iteration=3, max_iters=9,
                         eval_interval=9)
    assert summary["xgblora_merges"] == math.floor(9 / 3)
    merges = [line for line in lines if "XGBLoRA merge" in line]
    assert [line.split(":")[0] for line in merges] == ["iter 3", "iter 6", "iter 9"]
    assert "XGBLoRA merge 3" in merges[-1]
    assert not any("warning" in line for line in lines)  # lora_rank not given: no complaint
    ck = load_checkpoint(str(tmp_path / "ckpt" / "steps" / "ckpt.pt"))
    assert ck["xgblora_merges"] == 3 and ck["lora"]["rank"] == 1
    assert ck["optimizer"]["state"] == {}  # saved right after merge 3: the new booster's AdamW moments are fresh
    assert all(torch.count_nonzero(v) == 0 for k, v in ck["model"].items() if ".lora_B" in k)
    cfg = load_config(None, {**SMALL, "max_iters": 9})
    lrs = [r["lr"] for r in metrics(tmp_path, "steps") if "lr" in r]
    assert lrs == [get_lr(i, cfg.learning_rate, cfg.min_lr, cfg.warmup_iters, cfg.lr_decay_iters) for i in range(9)]  # one warmup + cosine across the merges, never restarted
    # with an explicit lora_rank other than 1: a warning, rank 1 anyway
    summary, lines = run(tmp_path, sample_chat, model_name="rank4", lora_rank=4, xgblora_steps_per_iteration=2,
                         max_iters=5, eval_interval=5)
    assert any("warning" in line and "lora_rank 4 is ignored" in line for line in lines)
    assert summary["xgblora_merges"] == 2


def test_epoch_merging_fires_on_the_configured_epochs_only(tmp_path):
    src = tmp_path / "small.txt"
    with open(SHAKESPEARE) as f:
        src.write_text(f.read()[:3000])
    data = str(tmp_path / "data")
    meta = prepare_dataset.prepare([str(src)], data, tokenization="char", fmt="text")
    train_tokens = meta["splits"]["train"]["tokens"]
    per_epoch = math.ceil(train_tokens / (4 * 32))  # an epoch: ceil(train tokens / tokens per optimizer step) steps
    assert 5 < per_epoch < 40
    summary, lines = run(tmp_path, data, model_name="epochs", xgblora_merge_frequency=2, max_iters=5 * per_epoch + 1,
                         eval_interval=1000)
    assert any(f"{per_epoch} steps per epoch" in line for line in lines)
    merged_at = [r["iter"] for r in metrics(tmp_path, "epochs") if "xgblora_merge" in r]
    assert merged_at == [2 * per_epoch, 4 * per_epoch]  # end of epochs 2 and 4, not 1, 3 or 5
    assert summary["xgblora_merges"] == 2


@pytest.mark.parametrize("trainer", ["regular", "zo"])
def test_resume_across_a_merge_boundary_is_exact(tmp_path, sample_chat, trainer):
    common = dict(xgblora_steps_per_iteration=5, xgblora_layers_per_iteration=1, max_iters=14, lr_decay_iters=14,
                  eval_interval=7, dropout=0.1, seed=3, trainer=trainer)
    run(tmp_path, sample_chat, model_name="straight", **common)
    run(tmp_path, sample_chat, model_name="halves", **{**common, "max_iters": 7})  # stops 2 steps into booster 2
    summary, lines = run(tmp_path, sample_chat, model_name="halves", init_from="resume", **common)
    assert any("resuming halves from iteration 7" in line for line in lines)
    assert any("iter 10: XGBLoRA merge 2" in line for line in lines)  # the merge happened after the restart
    steps = lambda name: [(r["iter"], r["loss"]) for r in metrics(tmp_path, name) if "loss" in r]
    assert len(steps("straight")) == 14 and steps("straight") == steps("halves")  # bit-identical losses
    a = load_checkpoint(str(tmp_path / "ckpt" / "straight" / "ckpt.pt"))
    b = load_checkpoint(str(tmp_path / "ckpt" / "halves" / "ckpt.pt"))
    assert a["xgblora_merges"] == b["xgblora_merges"] == 2 and a["lora"] == b["lora"]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_final_model_exports_merged_and_to_hugging_face(tmp_path, sample_chat):
    from convert_hf import export_hf
    from transformers import GPT2LMHeadModel
    run(tmp_path, sample_chat, model_name="xg", xgblora_steps_per_iteration=4, max_iters=10, eval_interval=10,
        merge_lora=True, bias=True)
    model, tok, ck = load_model("xg", out_dir=str(tmp_path / "ckpt"))
    merged, _, mck = load_model("xg_merged", out_dir=str(tmp_path / "ckpt"))
    assert ck["lora"] and ck["xgblora_merges"] == 2
    assert mck["lora"] is None and not lora.lora_layers(merged)  # a plain GPT checkpoint
    model.eval(), merged.eval()
    idx = torch.randint(0, tok.vocab_size, (2, 32))
    with torch.no_grad():
        ours = model(idx)[0]
        assert (merged(idx)[0] - ours).abs().max().item() <= 1e-5
        export_hf(model, tok, str(tmp_path / "hf"))
        hf = GPT2LMHeadModel.from_pretrained(str(tmp_path / "hf")).eval()
        theirs = hf(idx).logits
    assert (theirs - ours[..., :theirs.size(-1)]).abs().max().item() <= 1e-4


@pytest.mark.parametrize("overrides,key", [
    ({"finetuning_type": "xgblora", "xgblora_steps_per_iteration": -1}, "xgblora_steps_per_iteration"),
    ({"finetuning_type": "xgblora", "xgblora_layers_per_iteration": -2}, "xgblora_layers_per_iteration"),
    ({"finetuning_type": "xgblora", "xgblora_merge_frequency": 0}, "xgblora_merge_frequency"),
    ({"finetuning_type": "lora", "xgblora_steps_per_iteration": 10}, "xgblora_steps_per_iteration"),
    ({"finetuning_type": "full", "xgblora_merge_frequency": 2}, "xgblora_merge_frequency"),
    ({"finetuning_type": "xgblora", "xgblora_steps_per_iteration": 10, "xgblora_merge_frequency": 2},
     "xgblora_merge_frequency"),
    ({"finetuning_type": "xgblora", "xgblora_layers_per_iteration": 9, "n_layer": 4}, "xgblora_layers_per_iteration"),
    ({"finetuning_type": "full", "merge_lora": True}, "merge_lora"),
    ({"finetuning_type": "xgboost"}, "finetuning_type"),
])
def test_bad_settings_are_clear_errors(overrides, key):
    with pytest.raises(ConfigError, match=key) as e:
        load_config(None, overrides)
    assert "\n" not in str(e.value)


def test_too_many_layers_for_a_base_model_is_a_clear_error(tmp_path, sample_chat):
    run(tmp_path, sample_chat, model_name="base", finetuning_type="full", max_iters=1, eval_interval=1)
    with pytest.raises(TrainError, match="xgblora_layers_per_iteration 3 is more than the model's 2 layers"):
        run(tmp_path, sample_chat, model_name="ft", init_from_model="base", xgblora_layers_per_iteration=3,
            max_iters=1)


def test_the_presets_run(tmp_path, sample_chat):
    """configs/{tiny,gpt2}_{xgblora,mezo}_sft.json, shortened: the tiny ones from a tiny base, the gpt2 ones from a
    random tiny Hugging Face GPT-2 directory with gpt2-tokenized chat data."""
    out = str(tmp_path / "ckpt")
    short = {"max_iters": 4, "lr_decay_iters": 4, "eval_interval": 4, "eval_iters": 1, "batch_size": 2,
             "log_interval": 1, "out_dir": out}
    run(tmp_path, sample_chat, model_name="base_tiny", finetuning_type="full", n_layer=2, block_size=64, max_iters=2,
        eval_interval=2)
    for preset in ("tiny_xgblora_sft", "tiny_mezo_sft"):
        cfg = load_config(f"configs/{preset}.json", {**short, "dataset_dir": sample_chat})
        assert train(cfg, log=lambda *a: None)["iter_num"] == 4
    assert load_checkpoint(f"{out}/chat_tiny_xgblora_merged/ckpt.pt")["lora"] is None  # merge_lora: a plain model

    hf_dir = make_hf_gpt2(tmp_path / "hf_gpt2", vocab_size=50257, n_positions=256, n_embd=32, n_layer=2, n_head=2)
    subset = tmp_path / "chat.jsonl"
    with open(SAMPLE_CHAT) as f:
        subset.write_text("".join(f.readlines()[:200]))
    data = str(tmp_path / "gpt2_chat")
    prepare_dataset.prepare([str(subset)], data, tokenization="gpt2", fmt="chat")
    for preset, name in (("gpt2_xgblora_sft", "gpt2_chat_xgblora"), ("gpt2_mezo_sft", "gpt2_chat_mezo")):
        cfg = load_config(f"configs/{preset}.json", {**short, "init_from": str(hf_dir), "dataset_dir": data,
                                                      "gradient_accumulation_steps": 1, "block_size": 64})
        lines = []
        assert train(cfg, log=lines.append)["iter_num"] == 4
        assert any("Hugging Face checkpoint" in line for line in lines)
    ck = load_checkpoint(f"{out}/gpt2_chat_xgblora/ckpt.pt")
    assert ck["lora"]["targets"] == ["q", "v"] and ck["lora"]["rank"] == 1
