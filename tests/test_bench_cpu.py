"""bench.py's CPU facts (runtime.cpu_facts, fed fake /proc/cpuinfo texts): the flags, native bf16, the peak FLOP/s
rule and where its clock comes from, the caps ATEN_CPU_CAPABILITY / ONEDNN_MAX_CPU_ISA / GPTLAB_CPU_FLAGS put on
the flags, and the rule that skips bf16 candidates on a CPU that only emulates bf16."""

import argparse
import json
import os

import pytest
import torch

import bench
import runtime
from conftest import SHAKESPEARE


def cpuinfo(model, vendor, family, flags, mhz="2600.000", cores=2, smt=1):
    """/proc/cpuinfo's text for `cores` physical cores with `smt` logical CPUs each (only the fields read)."""
    blocks = []
    for cpu in range(cores * smt):
        blocks.append(f"processor\t: {cpu}\nvendor_id\t: {vendor}\ncpu family\t: {family}\nmodel name\t: {model}\n"
                      f"cpu MHz\t\t: {mhz}\nphysical id\t: 0\ncore id\t\t: {cpu % cores}\npower management:\n"
                      f"flags\t\t: fpu sse sse2 {flags}\n")
    return "\n".join(blocks) + "\n"


ZEN4 = cpuinfo("AMD EPYC 9354", "AuthenticAMD", 25, "avx avx2 fma avx512f avx512bw avx512_bf16 avx512_vnni")
ZEN2 = cpuinfo("AMD EPYC 7B12", "AuthenticAMD", 23, "avx avx2 fma")  # AVX2 only: the CPU
SAPPHIRE = cpuinfo("Intel(R) Xeon(R) Platinum 8480+", "GenuineIntel", 6,
                   "avx avx2 fma avx512f avx512_bf16 amx_bf16 amx_tile amx_int8", cores=2, smt=2)


def facts(text, threads=2, capability="AVX512", env=None, max_freq=None):
    return runtime.cpu_facts(text, max_freq, env or {}, capability, threads)


def test_parse_cpuinfo_reads_the_first_processor_and_counts_physical_cores():
    info = runtime.parse_cpuinfo(SAPPHIRE)
    assert info["model"] == "Intel(R) Xeon(R) Platinum 8480+" and info["vendor"] == "GenuineIntel"
    assert info["family"] == 6 and info["mhz"] == 2600.0
    assert {"avx512f", "amx_bf16", "amx_tile"} <= info["flags"]
    assert info["physical_cores"] == 2  # 4 logical CPUs, 2 cores: SMT siblings share the FMA pipes
    assert runtime.parse_cpuinfo("")["physical_cores"] is None


def test_zen4_counts_256_bit_pipes_and_avx512_bf16_doubles_the_fp32_peak():
    f = facts(ZEN4)
    assert f["native_bf16"] and f["lanes"] == 8  # family 0x19: 512-bit ops split over 256-bit pipes
    assert f["peak_flops"]["float32"] == pytest.approx(2 * 2 * 8 * 2 * 2.6e9)
    assert f["peak_flops"]["bfloat16"] == pytest.approx(2 * f["peak_flops"]["float32"])
    assert f["clock_source"].startswith("/proc/cpuinfo 'cpu MHz'")
    assert "AMD family 0x19 runs AVX-512 on 256-bit pipes" in bench.cpu_header(f)


def test_intel_amx_peak_uses_the_max_clock_and_caps_cores_at_the_physical_ones():
    f = facts(SAPPHIRE, threads=4, max_freq="3800000\n")
    assert f["cores"] == 2 and f["lanes"] == 16 and f["clock_ghz"] == pytest.approx(3.8)
    assert f["clock_source"].startswith("cpufreq cpuinfo_max_freq")
    assert f["peak_flops"]["float32"] == pytest.approx(2 * 2 * 16 * 2 * 3.8e9)
    assert f["peak_flops"]["bfloat16"] == pytest.approx(2 * 1024 * 3.8e9)
    assert "AMX-BF16" in bench.cpu_header(f)


def test_avx2_only_cpu_has_no_native_bf16_and_no_bf16_peak():
    f = facts(ZEN2)
    assert not f["native_bf16"] and f["lanes"] == 8 and f["flags"] == ["avx2", "fma"]
    assert f["peak_flops"] == {"float32": pytest.approx(2 * 2 * 8 * 2 * 2.6e9), "bfloat16": None}
    assert "native bf16: no" in bench.cpu_header(f)
    assert facts(cpuinfo("old", "GenuineIntel", 6, "avx"))["peak_flops"]["float32"] is None  # no FMA: no estimate


@pytest.mark.parametrize("capability,env,native,avx512", [
    ("AVX2", {}, False, False),                                    # ATEN_CPU_CAPABILITY=avx2
    ("AVX512", {"ONEDNN_MAX_CPU_ISA": "AVX2"}, False, False),
    ("AVX512", {"ONEDNN_MAX_CPU_ISA": "avx512_core"}, False, True),  # AVX-512 kernels without bf16
    ("AVX512", {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"}, True, True),
    ("AVX512", {"GPTLAB_CPU_FLAGS": "avx2 fma"}, False, False),   # another CPU's flags
    ("AVX512", {}, True, True)])
def test_kernel_caps_and_fake_flags_decide_native_bf16(capability, env, native, avx512):
    f = facts(ZEN4, capability=capability, env=env)
    assert f["native_bf16"] is native and ("avx512f" in f["flags"]) is avx512


def test_onednn_cap_below_amx_keeps_avx512_bf16_only():
    f = facts(SAPPHIRE, env={"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"})
    assert f["flags"] == ["avx2", "avx512_bf16", "avx512f", "fma"]
    assert f["peak_flops"]["bfloat16"] == pytest.approx(2 * f["peak_flops"]["float32"])


def test_pick_dtype_auto_follows_the_faked_flags(monkeypatch):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.setenv("GPTLAB_CPU_FLAGS", "avx2 fma")
    assert runtime.pick_dtype("auto", "cpu") == "float32"
    monkeypatch.setenv("GPTLAB_CPU_FLAGS", "avx2 fma avx512f avx512_bf16")
    assert runtime.pick_dtype("auto", "cpu") == "bfloat16"


def test_bf16_candidates_are_skipped_with_a_reason_unless_all_dtypes():
    assert bench.timed_dtypes(facts(ZEN4)) == (("float32", "bfloat16"), "")
    dtypes, why = bench.timed_dtypes(facts(ZEN2))
    assert dtypes == ("float32",) and why.startswith("skipped bf16 candidates") and "emulated" in why
    assert bench.timed_dtypes(facts(ZEN2), all_dtypes=True) == (("float32", "bfloat16"), "")
    assert bench.hf_settings(("float32",)) == [("float32", "sdpa"), ("float32", "eager")]


def test_train_comparison_times_only_the_given_dtypes_and_counts_estimate_mfus_flops():
    shape, B, T = dict(n_layer=1, n_head=2, n_embd=32), 2, 16
    gb = bench.random_batches(64, B, T)
    res = bench.train_comparison("t", shape, B, T, gb, gb, 64, 64, bias=False, repeats=1, inner=1, dtypes=("float32",))
    assert set(res["tokens_per_s"]) == {"ours float32", "ceiling float32", "transformers float32 sdpa",
                                        "transformers float32 eager"}
    N = 1 * 12 * 32 * 32 + 64 * 32 + T * 32  # the block's matrices, wte (tied with lm_head), wpe ...
    N += (2 * 1 + 1) * 32  # ... and the layer norms' weights (no biases)
    assert res["flops_per_token"] == 6 * N + 12 * 1 * 2 * 16 * T


def test_the_ceiling_share_counts_only_where_the_ceiling_is_under_the_target():
    def res(ceiling_ratio):
        return {"tokens_per_s": {"ours float32 compiled": 9.0, "ceiling float32": 10.0}, "best_ceiling": "ceiling float32",
                "best_ours": "ours float32 compiled", "ceiling_ratio": ceiling_ratio}
    under = bench.share_of_ceiling_row("t", res(1.2), 1.5)
    assert under["ratio"] == "0.90x" and under["ok"] is True and "under 1.5x" in under["target"]
    assert bench.share_of_ceiling_row("t", res(1.6), 1.5)["ok"] is None  # the 1.5x line itself is reachable
    assert bench.fastest({"ours float32": 1.0, "ours float32 compiled": 2.0, "transformers float32 sdpa": 3.0,
                          "transformers float32 eager compiled": 4.0}, "transformers", "sdpa") == "transformers float32 sdpa"


def test_flops_column_shows_each_sides_share_of_its_dtypes_peak():
    f = facts(ZEN2, threads=1)  # one core: fp32 peak 2 x 8 x 2 x 2.6 GHz = 83.2 GFLOP/s, no bf16 peak
    cell = bench.achieved(f, 1e6, [(8320.0, "float32"), (8320.0, "bfloat16")])
    assert cell == "8.3G (10.0%) / 8.3G (no peak)"
    rows = [bench.row("a", "1", "2", "1x", "", None, flops=cell), bench.row("b", "1", "2", "1x", "", None)]
    table = bench.markdown(rows, "h").splitlines()
    assert table[2].endswith("| GFLOP/s (% of CPU peak) ours / ref |") and table[4].endswith(f"| {cell} |")
    assert "GFLOP/s" not in bench.markdown(rows[1:], "h")


FAKE_NANOGPT_TRAIN = """import json, sys
with open("argv.json", "w") as f:
    json.dump(sys.argv[1:], f)
open("data/shakespeare_char/train.bin", "rb").close()  # prepared by its own prepare.py, from the given input.txt
print("step 60: train loss 2.5000, val loss 2.6000")
"""
FAKE_NANOGPT_PREPARE = """import os
assert os.path.getsize("input.txt") > 1_000_000  # tinyshakespeare, never downloaded
open("train.bin", "wb").close()
"""


def fake_nanogpt(root):
    """A folder laid out like a karpathy/nanoGPT checkout, whose train.py records its flags and prints a val loss."""
    (root / "config").mkdir(parents=True)
    (root / "config" / "train_shakespeare_char.py").write_text("batch_size = 64\n")
    (root / "data" / "shakespeare_char").mkdir(parents=True)
    (root / "data" / "shakespeare_char" / "prepare.py").write_text(FAKE_NANOGPT_PREPARE)
    (root / "train.py").write_text(FAKE_NANOGPT_TRAIN)
    for name in ("model.py", "configurator.py"):
        (root / name).write_text("")
    return root


@pytest.mark.usefixtures("one_thread")
def test_classic_section_runs_our_train_py_and_nanogpts_own_at_its_readme_settings(tmp_path, monkeypatch):
    monkeypatch.setitem(bench.CLASSIC_ITERS, "quick", 60)
    if not os.path.exists(SHAKESPEARE):
        pytest.skip("needs ../shared/corpora/tinyshakespeare.txt")
    args = argparse.Namespace(quick=True, nanogpt_dir=str(fake_nanogpt(tmp_path / "nanoGPT")))
    ws = bench.Workspace(str(tmp_path / "ws"), os.path.dirname(SHAKESPEARE))
    rows, res = bench.section_classic(ws, args)
    with open(tmp_path / "ws" / "nanogpt" / "argv.json") as f:
        argv = json.load(f)
    assert argv[0] == "config/train_shakespeare_char.py" and set(bench.NANOGPT_CLASSIC) <= set(argv)
    assert "--max_iters=60" in argv and "--lr_decay_iters=60" in argv
    assert res["val_loss"]["nanoGPT"] == 2.6
    assert 2.0 < res["val_loss"]["ours"] < 4.0  # 60 real iterations from ln(65) = 4.17
    (ours_s, _), = res["seconds_each"]["ours"]
    (nano_s, _), = res["seconds_each"]["nanoGPT"]
    assert res["speedup"] == pytest.approx(nano_s / ours_s) and rows[0]["ratio"] == f"{nano_s / ours_s:.2f}x"


def test_classic_section_without_a_nanogpt_checkout_says_what_to_pass(tmp_path):
    args = argparse.Namespace(quick=True, nanogpt_dir=None)
    with pytest.raises(bench.BenchError, match="--nanogpt_dir None: not a nanoGPT checkout"):
        bench.section_classic(bench.Workspace(str(tmp_path), str(tmp_path)), args)
