"""peft adapters in and out, and the chat files of an exported chat model, against the real transformers and peft:
LoRA runs on a Hugging Face GPT-2 exported with --export_adapter_dir load in PeftModel with the project's logits
(whole layers, q/v slices, a mix, all) and merge to the project's --export_dir; adapters made by peft import as
LoRA runs that sample peft's greedy text and train on; what has no equivalent is refused in one line; an exported
chat model's apply_chat_template gives sample.py's ids and its generate stops where sample.py stops.

The Hugging Face base is a seeded GPT-2 the tests write themselves (conftest.make_hf_gpt2), never transformers'
random init."""

import json
import math
import os
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from peft import IA3Config, LoraConfig, PeftModel, get_peft_model  # noqa: E402
from transformers import AutoTokenizer, GenerationConfig, GPT2LMHeadModel  # noqa: E402

import checkpoint  # noqa: E402
import convert_hf  # noqa: E402
import evaluate  # noqa: E402
import hf  # noqa: E402
import hf_adapters  # noqa: E402
import lora  # noqa: E402
import prepare_dataset  # noqa: E402
import train as train_mod  # noqa: E402
from config import load_config  # noqa: E402
from conftest import SAMPLE_CHAT, make_hf_gpt2, run_cli  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from tokenizer import Tokenizer, chat_prompt, render_chat  # noqa: E402

transformers.logging.set_verbosity_error()
V = 50257  # GPT-2's vocabulary; the project's model pads it to 50304
SMALL = dict(block_size=64, batch_size=4, eval_iters=1, log_interval=1, warmup_iters=2, learning_rate=1e-2,
             min_lr=1e-3, weight_decay=0.0, use_loss_mask=True, dtype="float32")
TARGET_SETS = {"whole": ["c_attn", "mlp.c_proj"], "qv": ["q", "v"], "mix": ["k", "attn.c_proj"], "all": "all"}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.one_thread: tiny shapes


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """GPT-2's vocabulary and tokenizer files, 2 layers of n_embd 32; wte N(0, 0.5): rows of norm ~3, as in a real
    GPT-2, so the tied output layer can become confident (and a chat SFT learns to end its turn)."""
    return make_hf_gpt2(tmp_path_factory.mktemp("hf") / "base", vocab_size=V, n_positions=64, wte_std=0.5,
                        tokenizer_files=True)


@pytest.fixture(scope="module")
def data(base, tmp_path_factory):
    """6 of the shipped sample conversations, 30 times over (a tiny model learns to end these turns in 60 steps),
    chat data tokenized with the base's own GPT-2 tokenizer files."""
    folder = tmp_path_factory.mktemp("data")
    subset = folder / "chat.jsonl"
    with open(SAMPLE_CHAT) as f:
        subset.write_text("".join(f.readlines()[:6] * 30))
    prepare_dataset.prepare([str(subset)], str(folder / "gpt2"), tokenization="gpt2", fmt="chat", hf_dir=base)
    return {"dir": str(folder / "gpt2"), "jsonl": str(subset)}


def train_run(out, dataset, **overrides):
    cfg = load_config(None, {**SMALL, "out_dir": str(out), "dataset_dir": dataset, **overrides})
    train_mod.train(cfg, log=lambda *a: None)


@pytest.fixture(scope="module")
def runs(base, data, tmp_path_factory):
    """LoRA runs on the HF base, one per target set: 'all' is a chat SFT long enough to learn to end its turn (the
    chat export tests use it), the others take 4 steps (enough for non-zero B). Plus an XGBLoRA run and a LoRA run
    on a project model, which cannot be exported as adapters."""
    out = str(tmp_path_factory.mktemp("ckpt"))
    for name, targets in TARGET_SETS.items():
        steps = 60 if name == "all" else 4
        train_run(out, data["dir"], model_name=name, init_from=base, max_iters=steps, lr_decay_iters=steps,
                  eval_interval=steps, finetuning_type="lora", lora_rank=8 if name == "all" else 4, lora_alpha=16.0,
                  lora_dropout=0.05, lora_target=targets)
    train_run(out, data["dir"], model_name="xgb", init_from=base, max_iters=2, eval_interval=2,
              finetuning_type="xgblora")
    moved = shutil.copytree(base, os.path.join(out, "moved_base"))  # a base deleted after the run
    train_run(out, data["dir"], model_name="moved", init_from=moved, max_iters=1, eval_interval=1,
              finetuning_type="lora", lora_target="all")
    shutil.rmtree(moved)
    convert_hf.convert_to_checkpoint(base, "proj", out)
    train_run(out, data["dir"], model_name="on_proj", init_from_model="proj", max_iters=2, eval_interval=2,
              finetuning_type="lora", lora_target="all")
    return out


def prompt_ids(text="Say hello to Ada."):
    return torch.tensor([chat_prompt(Tokenizer("gpt2"), [("user", text)])])


def project_logits(name, out, idx):
    model, _, _ = checkpoint.load_model(name, out)
    model.eval()
    with torch.no_grad():
        return model(idx)[0][..., :V]


def hf_logits(model, idx):
    with torch.no_grad():
        return model(idx).logits


def cli_error(capsys, argv):
    """convert_hf.main(argv) must fail with one line on stderr and exit status 1: returns that line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        convert_hf.main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 1 and err.startswith("error: ") and "\n" not in err, err
    return err


# ---------------------------------------------------------------------------------------------------------------
# project LoRA run -> peft

@pytest.mark.parametrize("name", list(TARGET_SETS))
def test_exported_adapter_in_peft_computes_the_project_logits(name, runs, base, tmp_path):
    out_dir = tmp_path / "peft"
    assert convert_hf.main(["--model_name", name, "--out_dir", runs, "--export_adapter_dir", str(out_dir)]) == 0
    # a chat run (all of these are): the tokenizer files with the chat template go along
    assert sorted(os.listdir(out_dir)) == ["adapter_config.json", "adapter_model.safetensors", "merges.txt",
                                           "tokenizer_config.json", "vocab.json"]
    cfg = json.loads((out_dir / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["fan_in_fan_out"] and cfg["base_model_name_or_path"] == base
    assert cfg["lora_dropout"] == 0.05 and cfg["lora_alpha"] / cfg["r"] == 16.0 / (8 if name == "all" else 4)

    idx = prompt_ids()
    want = project_logits(name, runs, idx)
    peft_model = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(base), str(out_dir)).eval()
    assert (hf_logits(peft_model, idx) - want).abs().max().item() <= 1e-5
    assert (hf_logits(GPT2LMHeadModel.from_pretrained(base), idx) - want).abs().max().item() > 1e-3  # adapters matter

    if name == "all":  # back in: a chat run again (the template travelled with the adapter), the same logits
        assert AutoTokenizer.from_pretrained(out_dir).chat_template == hf_adapters.chat_template()
        assert convert_hf.main(["--hf_dir", base, "--adapter_dir", str(out_dir), "--model_name", "back", "--out_dir",
                                str(tmp_path / "ck")]) == 0
        back = checkpoint.load_checkpoint(os.path.join(tmp_path, "ck", "back", "ckpt.pt"))
        assert back["data_format"] == "chat" and back["lora"]["targets"] == lora.ALL_TARGETS
        assert (project_logits("back", str(tmp_path / "ck"), idx) - want).abs().max().item() <= 1e-5
    if name == "qv":  # two rank-4 slices -> one rank-8 c_attn adapter whose k rows are exactly zero
        assert (cfg["r"], cfg["target_modules"]) == (8, ["c_attn"])
        B = peft_model.base_model.model.transformer.h[0].attn.c_attn.lora_B["default"].weight  # (3C, 8)
        assert B.shape == (96, 8) and not B[32:64].any() and not B[:32, 4:].any() and not B[64:, :4].any()
    if name == "mix":  # a rank-4 k slice and a rank-4 whole attn.c_proj: c_attn keeps rank 4 but on one slice
        assert cfg["target_modules"] == ["c_attn", "attn.c_proj"] and cfg["rank_pattern"] == {}

    # merged in peft == the project's own --export_dir of the same run
    export = tmp_path / "merged"
    assert convert_hf.main(["--model_name", name, "--out_dir", runs, "--export_dir", str(export)]) == 0
    merged = peft_model.merge_and_unload()
    theirs = GPT2LMHeadModel.from_pretrained(export).eval()
    for key, t in theirs.state_dict().items():
        assert torch.allclose(merged.state_dict()[key], t, atol=1e-6), key
    assert (hf_logits(merged, idx) - hf_logits(theirs, idx)).abs().max().item() <= 1e-5


def test_mixed_ranks_use_peft_rank_pattern(runs, base, data, tmp_path):
    """q/v slices next to a whole layer: c_attn becomes rank 2r, the whole layer stays r (rank/alpha_pattern)."""
    train_run(runs, data["dir"], model_name="qv_fc", init_from=base, max_iters=3, eval_interval=3,
              finetuning_type="lora", lora_rank=4, lora_alpha=8.0, lora_target=["q", "v", "c_fc"])
    out_dir = tmp_path / "peft"
    assert convert_hf.main(["--model_name", "qv_fc", "--out_dir", runs, "--export_adapter_dir", str(out_dir)]) == 0
    cfg = json.loads((out_dir / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["rank_pattern"], cfg["alpha_pattern"]) == (4, 8.0, {"c_attn": 8},
                                                                                         {"c_attn": 16.0})
    idx = prompt_ids()
    peft_model = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(base), str(out_dir)).eval()
    assert (hf_logits(peft_model, idx) - project_logits("qv_fc", runs, idx)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("name, says", [("xgb", "XGBLoRA"), ("on_proj", "project model 'proj'"),
                                        ("proj", "not a LoRA run"),
                                        ("moved", "is not a Hugging Face GPT-2 directory any more")])
def test_what_cannot_be_an_adapter_is_refused(name, says, runs, tmp_path, capsys):
    out_dir = tmp_path / "peft"
    err = cli_error(capsys, ["--model_name", name, "--out_dir", runs, "--export_adapter_dir", str(out_dir)])
    assert says in err and "--export_dir" in err, err
    assert not out_dir.exists() and os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------------------------------------
# peft adapter -> project LoRA run

def peft_adapter(base, out_dir, seed=0, **config):
    """An adapter made by peft itself on the HF base, its A and B set to seeded non-zero values, saved."""
    config = {"r": 4, "lora_alpha": 12, "target_modules": ["c_attn", "c_proj"], "lora_dropout": 0.1,
              "fan_in_fan_out": True, "task_type": "CAUSAL_LM", **config}
    model = get_peft_model(GPT2LMHeadModel.from_pretrained(base), LoraConfig(**config))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    model.save_pretrained(out_dir)
    return model.eval()


def test_peft_adapter_imports_samples_peft_greedy_text_and_trains_on(base, data, tmp_path):
    made = peft_adapter(base, tmp_path / "made")
    out = str(tmp_path / "ckpt")
    r = run_cli("convert_hf.py", "--hf_dir", base, "--adapter_dir", str(tmp_path / "made"), "--model_name", "imp",
                "--out_dir", out)
    assert r.returncode == 0, r.stderr
    assert "LoRA rank 4, alpha 12, targets c_attn,attn.c_proj,mlp.c_proj" in r.stdout
    ckpt = checkpoint.load_checkpoint(os.path.join(out, "imp", "ckpt.pt"))
    assert ckpt["base"] == {"kind": "hf", "path": base} and ckpt["lora"]["dropout"] == 0.1
    assert all(lora._is_lora_key(k) for k in ckpt["model"])  # adapters only, as a LoRA run saves

    idx = prompt_ids()
    assert (project_logits("imp", out, idx) - hf_logits(made, idx)).abs().max().item() <= 1e-5

    # sample.py greedy (a text model: BOS + the prompt, 16 tokens) == peft's greedy generate
    prompt = "The quick brown fox"
    tok = Tokenizer("gpt2")
    ids = torch.tensor([[tok.eot_token] + tok.encode(prompt)])
    with torch.no_grad():
        new = made.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, min_new_tokens=16,
                            do_sample=False, pad_token_id=tok.eot_token)[0, ids.size(1):]
    r = run_cli("sample.py", "--model_name", "imp", "--out_dir", out, "--prompt", prompt, "--max_new_tokens", "16",
                "--temperature", "0", "--dtype", "float32")
    assert r.returncode == 0, r.stderr
    assert r.stdout == prompt + tok.decode(new.tolist()) + "\n"

    # evaluate.py scores it on chat data (masked loss): a finite loss, not the bare base's
    report = evaluate.run(evaluate.parse_args(["--model_name", "imp", "--out_dir", out, "--dataset_dir", data["dir"],
                                               "--max_windows", "8"]))
    convert_hf.convert_to_checkpoint(base, "bare", out)
    bare = evaluate.run(evaluate.parse_args(["--model_name", "bare", "--out_dir", out, "--dataset_dir", data["dir"],
                                             "--max_windows", "8"]))
    loss = report["results"][0]["loss"]
    assert report["data"]["masked"] and math.isfinite(loss) and abs(loss - bare["results"][0]["loss"]) > 1e-3

    # continue training it with the project's LoRA (resume from iteration 0), then hand it back to peft
    before = {k: v.clone() for k, v in ckpt["model"].items()}
    train_run(out, data["dir"], model_name="imp", init_from="resume", max_iters=3, eval_interval=3,
              finetuning_type="lora", lora_rank=4, lora_target=["c_attn", "attn.c_proj", "mlp.c_proj"])
    after = checkpoint.load_checkpoint(os.path.join(out, "imp", "ckpt.pt"))
    assert after["iter_num"] == 3 and after["base"] == ckpt["base"] and set(after["model"]) == set(before)
    assert any(not torch.equal(after["model"][k], before[k]) for k in before)
    back = tmp_path / "back"
    assert convert_hf.main(["--model_name", "imp", "--out_dir", out, "--export_adapter_dir", str(back)]) == 0
    again = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(base), str(back)).eval()
    assert (hf_logits(again, idx) - project_logits("imp", out, idx)).abs().max().item() <= 1e-5


def test_rslora_and_a_layer_subset_import_exactly(base, tmp_path):
    made = peft_adapter(base, tmp_path / "made", seed=1, r=8, lora_alpha=4, target_modules=["c_fc"],
                        use_rslora=True, layers_to_transform=[1], layers_pattern="h")
    out = str(tmp_path / "ckpt")
    assert convert_hf.main(["--hf_dir", base, "--adapter_dir", str(tmp_path / "made"), "--model_name", "imp",
                            "--out_dir", out]) == 0
    ckpt = checkpoint.load_checkpoint(os.path.join(out, "imp", "ckpt.pt"))
    assert ckpt["lora"]["layers"] == [1] and ckpt["lora"]["targets"] == ["c_fc"]
    assert abs(ckpt["lora"]["alpha"] / 8 - 4 / 8 ** 0.5) < 1e-9  # rsLoRA's alpha / sqrt(r) kept as the scaling
    idx = prompt_ids()
    assert (project_logits("imp", out, idx) - hf_logits(made, idx)).abs().max().item() <= 1e-5
    # and back out: peft reads layers_to_transform
    back = tmp_path / "back"
    assert convert_hf.main(["--model_name", "imp", "--out_dir", out, "--export_adapter_dir", str(back)]) == 0
    again = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(base), str(back)).eval()
    assert (hf_logits(again, idx) - hf_logits(made, idx)).abs().max().item() <= 1e-5


def unsupported(base, d, kind):
    if kind == "ia3":
        model = get_peft_model(GPT2LMHeadModel.from_pretrained(base),
                               IA3Config(target_modules=["c_attn", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"],
                                         fan_in_fan_out=True, task_type="CAUSAL_LM"))
        model.save_pretrained(d)
    elif kind == "dora":
        peft_adapter(base, d, use_dora=True, target_modules=["c_attn"])
    elif kind == "embedding":
        peft_adapter(base, d, target_modules=["wte", "c_attn"])
    elif kind == "ranks":
        peft_adapter(base, d, rank_pattern={"c_attn": 8})
    elif kind == "bias":
        peft_adapter(base, d, bias="lora_only")
    elif kind == "uneven_layers":  # layer 0 gets c_attn only, layer 1 c_attn and c_fc: no product of the two
        peft_adapter(base, d, target_modules=r".*\.(0\.attn\.c_attn|1\.attn\.c_attn|1\.mlp\.c_fc)")


@pytest.mark.parametrize("kind, says", [("ia3", "peft_type is 'IA3'"), ("dora", "'use_dora'"),
                                        ("embedding", "transformer.wte.lora_embedding_A"),
                                        ("ranks", "rank 8"), ("bias", "'bias' is 'lora_only'"),
                                        ("uneven_layers", "adapted layers differ")])
def test_adapters_without_an_equivalent_are_refused(kind, says, base, tmp_path, capsys):
    unsupported(base, tmp_path / "adapter", kind)
    capsys.readouterr()  # transformers' own loading messages
    out = tmp_path / "ckpt"
    err = cli_error(capsys, ["--hf_dir", base, "--adapter_dir", str(tmp_path / "adapter"), "--model_name", "imp",
                             "--out_dir", str(out)])
    assert says in err, err
    assert not out.exists()


def test_bad_adapter_dirs_are_one_line(base, tmp_path, capsys):
    out = ["--model_name", "m", "--out_dir", str(tmp_path / "c")]
    err = cli_error(capsys, ["--hf_dir", base, "--adapter_dir", str(tmp_path / "nope"), *out])
    assert "nope: no such directory" in err
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "adapter_config.json").write_text("{not json")
    err = cli_error(capsys, ["--hf_dir", base, "--adapter_dir", str(tmp_path / "bad"), *out])
    assert "adapter_config.json:1: not valid JSON" in err
    err = cli_error(capsys, ["--adapter_dir", str(tmp_path / "bad"), "--export_dir", str(tmp_path / "x"), *out])
    assert "--adapter_dir needs --hf_dir" in err or "exactly one of" in err
    err = cli_error(capsys, ["--hf_dir", base, "--adapter_dir", str(tmp_path / "bad"), "--export_adapter_dir",
                             str(tmp_path / "x"), *out])
    assert "exactly one of" in err
    assert not (tmp_path / "c").exists() and not (tmp_path / "x").exists()


# ---------------------------------------------------------------------------------------------------------------
# an exported chat model: chat template and generation config

CHAT = [{"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": " And of Peru?  "}]


def test_chat_template_renders_sample_py_ids(runs, tmp_path):
    export = tmp_path / "hf"
    assert convert_hf.main(["--model_name", "all", "--out_dir", runs, "--export_dir", str(export)]) == 0
    hf_tok = AutoTokenizer.from_pretrained(export)
    tok = Tokenizer("gpt2")
    turns = [(m["role"], m["content"]) for m in CHAT]
    for messages in (CHAT, CHAT[1:2], CHAT[:2]):
        t = [(m["role"], m["content"]) for m in messages]
        assert list(hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                               return_dict=False)) == chat_prompt(tok, t)
    # without the generation prompt: what training saw for a whole conversation (BOS + render_chat)
    done = CHAT[:3]
    assert list(hf_tok.apply_chat_template(done, tokenize=True, return_dict=False)) == \
        [tok.eot_token] + render_chat(tok, turns[:3])[0]
    gen = json.loads((export / "generation_config.json").read_text())
    assert gen["eos_token_id"] == tok.eot_token == 50256
    with pytest.raises(Exception, match="unknown role narrator"):  # a role the template has no marker for
        hf_tok.apply_chat_template([{"role": "narrator", "content": "Once"}], tokenize=False)


def test_char_chat_model_export_gets_the_generation_config(tmp_path):
    """A char-tokenized chat model has no Hugging Face tokenizer files (so no template), but generate still needs
    to know that its end-of-text id ends a turn."""
    tok = Tokenizer.char_from_texts(["hello there"])
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=64, n_layer=1, n_head=2, n_embd=16, bias=True))
    hf.export_hf(model, tok, str(tmp_path / "hf"), chat=True)
    gen = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert gen["eos_token_id"] == tok.eot_token == len(tok.chars)
    assert not (tmp_path / "hf" / "tokenizer_config.json").exists()
    assert GenerationConfig.from_pretrained(tmp_path / "hf").eos_token_id == tok.eot_token


def test_transformers_generate_stops_where_sample_py_stops(runs, data, tmp_path):
    export = tmp_path / "hf"
    assert convert_hf.main(["--model_name", "all", "--out_dir", runs, "--export_dir", str(export)]) == 0
    with open(data["jsonl"]) as f:  # a prompt the chat SFT trained on, with a system turn: it learned to end it
        messages = next(m for m in (json.loads(line)["messages"] for line in f) if m[0]["role"] == "system")
    messages = messages[:[m["role"] for m in messages].index("assistant")]
    system, user = messages[0]["content"], messages[-1]["content"]

    hf_tok = AutoTokenizer.from_pretrained(export)
    model = GPT2LMHeadModel.from_pretrained(export).eval()
    ids = torch.tensor([hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                   return_dict=False)])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=40, do_sample=False,
                             generation_config=GenerationConfig.from_pretrained(export))[0, ids.size(1):].tolist()
    assert out[-1] == 50256 and len(out) < 40  # stopped at the end of the turn, on its own
    text = hf_tok.decode(out, skip_special_tokens=True).strip()

    args = ["sample.py", "--model_name", "all", "--out_dir", runs, "--prompt", user, "--max_new_tokens", "40",
            "--temperature", "0", "--dtype", "float32", "--system", system]
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr
    assert len(out) > 2 and r.stdout.strip() == text, (text, r.stdout)
