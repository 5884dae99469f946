"""The masking experiment's script (python -m experiments.chat_sft) runs end to end on a few steps: two-phase setting
with prompt-heavy data, both SFT runs and the packed one (--packed), scores, held-out answers and the not-stopped
continuations. Run as a file it says how to run it, in one line."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROSE = os.path.join(ROOT, "..", "shared", "corpora", "pride_and_prejudice_pg1342.txt")


@pytest.mark.skipif(not os.path.exists(PROSE), reason="needs ../shared/corpora")
def test_two_phase_prompt_heavy_experiment_runs(tmp_path):
    out = tmp_path / "ckpt"
    r = subprocess.run([sys.executable, "-m", "experiments.chat_sft", "--pretrain_iters", "10",
                        "--max_iters", "10", "--context_chars", "64", "--out_dir", str(out), "--context_file", PROSE,
                        "--packed", "--seed", "3", "--json", str(tmp_path / "res.json")], cwd=ROOT,
                       capture_output=True, text=True,
                       timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "base model 'chat_tiny_context64_pretrained10_base'" in r.stdout
    assert "| masked |" in r.stdout and "| unmasked |" in r.stdout and "| masked, packed |" in r.stdout
    res = json.load(open(tmp_path / "res.json"))
    assert [(x["use_loss_mask"], x["packing"]) for x in res] == [(True, False), (False, False), (True, True)]
    for x in res:  # --seed reaches every SFT run's config
        assert json.load(open(out / x["name"] / "config.json"))["seed"] == 3
    for x in res:
        assert x["total"] == 50 and len(x["rows"]) == 50 and len(x["not_stopped"]) == 3
        assert 0 < x["assistant_val_loss"] < 10 and 0 < x["whole_conversation_val_loss"] < 10
    # the SFT set was prepared with the base's vocabulary, and every held-out question got a passage in front
    data = out / "chat_tiny_context64_pretrained10_data"
    assert (data / "data" / "tokenizer_state.json").read_text() == (data / "pretrain_data" / "tokenizer_state.json").read_text()
    first = json.loads((data / "sample_chat_context.jsonl").read_text().splitlines()[0])
    assert first["messages"][0]["role"] == "system" and len(first["messages"][0]["content"]) >= 64


@pytest.mark.parametrize("name", ["chat_sft", "bos_zero", "finetune_methods"])
def test_experiment_run_as_a_file_says_how_to_run_it(name, tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", f"{name}.py"), "--help"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert r.stderr.strip() == f"error: run it from the project root as a module: python -m experiments.{name}"


@pytest.mark.parametrize("name", ["chat_sft", "bos_zero", "finetune_methods"])
def test_experiment_runs_as_a_module_from_the_root(name):
    r = subprocess.run([sys.executable, "-m", f"experiments.{name}", "--help"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "usage:" in r.stdout


def test_packed_run_on_a_preset_that_already_packs_is_a_one_line_error(tmp_path):
    # a preset that packs: its masked run is the packed one, and --packed would only repeat it
    preset = json.load(open(os.path.join(ROOT, "configs", "quickstart_sft.json")))
    (tmp_path / "packed.json").write_text(json.dumps({**preset, "packing": True, "align_windows": False}))
    out = tmp_path / "ckpt"
    r = subprocess.run([sys.executable, "-m", "experiments.chat_sft", "--config_file", str(tmp_path / "packed.json"),
                        "--packed", "--out_dir", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and not out.exists()
    assert r.stderr.strip() == (f"error: {tmp_path / 'packed.json'} already packs (packing true): its masked run is "
                                "the packed one; drop --packed, or pass a preset that draws random windows "
                                "(configs/tiny_sft.json)")
