"""The seed's scripts and `python -m engine cost`, run as subprocesses from outside the repo."""

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from engine import moe_block
from engine.cost_model import dense_counterpart, estimate, preset_config
from engine.timing import summarize

ROOT = Path(__file__).resolve().parents[1]


def _run(args, cwd):
    out = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


def _load(script):
    """The script as a module, so a test can call main() in this process."""
    spec = importlib.util.spec_from_file_location(script[:-3], ROOT / "scripts" / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _figure(text, label):
    return float(re.search(rf"^{re.escape(label)}: ([0-9.eE+-]+)", text, re.M).group(1))


def test_benchmark_moe_prints_the_engines_growth_and_flop_ratio(tmp_path):
    text = _run([str(ROOT / "scripts/benchmark_moe.py"), "--preset", "Mixtral 8x7B", "--layers", "4",
                 "--experts", "16", "--k", "2"], cwd=tmp_path)  # a fresh cwd: the script finds the repo
    cfg = preset_config("Mixtral 8x7B", n_layers=4, num_experts=16, top_k=2)
    moe, dense = estimate(cfg), estimate(dense_counterpart(cfg, "same_ff"))
    assert _figure(text, "parameter growth") == pytest.approx(moe.total_params / dense.total_params, rel=1e-6)
    assert _figure(text, "FLOP ratio") == pytest.approx(moe.train_flops / dense.train_flops, rel=1e-6)
    # Independently: 15 extra experts of 3 x 4096 x 14336 and a 4096 x 16 router per layer.
    assert moe.total_params - dense.total_params == 4 * (15 * 3 * 4096 * 14336 + 4096 * 16)
    assert f"{moe.total_params:,d}" in text


def test_benchmark_moe_bad_input_exits_2(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "scripts/benchmark_moe.py"), "--k", "9"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "--k must be >= 1 and <= 8" in out.stderr


@pytest.mark.parametrize("script, argv, message", [
    ("benchmark_moe.py", ["--experts", "0"], "--experts must be >= 1"),
    ("benchmark_moe.py", ["--layers", "0"], "--layers must be >= 1"),
    ("benchmark_moe.py", ["--d-model", "3"], "--heads must divide --d-model (3)"),
    ("moe_vs_dense.py", ["--k", "3"], "--k must be >= 1 and <= 2"),
    ("moe_vs_dense.py", ["--experts", "0"], "--experts must be >= 1"),
    ("moe_vs_dense.py", ["--tokens", "0"], "--tokens must be >= 1"),
    ("moe_vs_dense.py", ["--d-model", "-4"], "--d-model must be >= 1"),
    ("moe_vs_dense.py", ["--seed", "-1"], "--seed must be >= 0")])
def test_scripts_name_the_flag_typed(capsys, script, argv, message):
    assert _load(script).main(argv) == 2
    assert capsys.readouterr().err.startswith(f"error: {message}")


def test_moe_vs_dense_prints_matched_flops(tmp_path):
    text = _run([str(ROOT / "scripts/moe_vs_dense.py"), "--d-model", "16", "--d-ff", "24", "--experts", "4",
                 "--k", "2", "--tokens", "64", "--reps", "1"], cwd=tmp_path)
    # Dense: 2 x 16 x 48 weights; MoE: 2 experts of 2 x 16 x 24 plus the LSH 16 x (2 x 2 bits).
    dense, moe = 2 * 2 * 16 * 48, 2 * 2 * 2 * 16 * 24 + 2 * 16 * 4
    assert _figure(text, "FLOP ratio (MoE / dense, analytic)") == pytest.approx(moe / dense, rel=1e-6)
    gflops = [float(g) for g in re.findall(r"forward GFLOP ([0-9.eE+-]+)", text)]
    assert gflops == pytest.approx([64 * dense / 1e9, 64 * moe / 1e9], rel=1e-4)
    # The printed ratio is that of the two printed fwd+bwd times, each rounded to 0.01 ms (the
    # ratio itself to 0.001): it lies in the interval the roundings allow.
    dense_ms, moe_ms = (float(t) for t in re.findall(r"fwd\+bwd +([0-9.]+) ms", text))
    lo, hi = (moe_ms - 0.005) / (dense_ms + 0.005), (moe_ms + 0.005) / (dense_ms - 0.005)
    assert lo - 5e-4 <= _figure(text, "fwd+bwd time ratio") <= hi + 5e-4


def test_moe_vs_dense_estimate_scales_a_timed_probe(monkeypatch, capsys):
    # Every timed call "takes" 0.5 s; the probe runs on 2048 of the 8192 tokens, so a call of the
    # real run takes 0.5 x 8192 / 2048 = 2 s. The run times 2 blocks (dense, moe-hash), each over
    # 1 warm-up + 2 rounds of a forward and a forward+backward, then one more forward+backward
    # counting saved activations: 2 x (3 x 2 + 1) calls of 2 s = 28 s. (The old estimate divided
    # FLOPs by a fixed 10 GFLOP/s and printed "about 0 s" here.)
    monkeypatch.setattr(moe_block, "time_fn", lambda *args, **kwargs: summarize([500.0]))
    assert _load("moe_vs_dense.py").main(["--d-model", "16", "--d-ff", "24", "--experts", "4",
                                          "--tokens", "8192", "--reps", "2"]) == 0
    assert "on the CPU: about 28 s " in capsys.readouterr().err


def test_help_works_from_anywhere(tmp_path):
    for script in ("benchmark_moe.py", "moe_vs_dense.py"):
        assert "usage" in _run([str(ROOT / "scripts" / script), "--help"], cwd=tmp_path)


def test_engine_cost_json_matches_estimate():
    doc = json.loads(_run(["-m", "engine", "cost", "--json", "--preset", "Llama-2-7B", "--layers", "2"],
                          cwd=ROOT))
    est = estimate(preset_config("Llama-2-7B", n_layers=2))
    assert doc["summary"]["total_params"] == est.total_params
    # 2 layers of 4 x 4096^2 attention and 3 x 4096 x 11008 FFN, untied 32000 x 4096 embeddings x 2.
    assert est.total_params == 2 * (4 * 4096**2 + 3 * 4096 * 11008) + 2 * 32000 * 4096 + 5 * 4096
    assert sum(r["total"] for r in doc["parameters"]) == est.total_params
    assert "MoE / dense" not in doc  # dense config: no ratios


def test_gpu_benchmark_entry_point_runs_without_pandas_and_writes_results(tmp_path):
    # The lead runs it on a GPU box without streamlit (and maybe pandas): block pandas, use bf16.
    code = ("import sys, runpy; sys.modules['pandas'] = None; "
            f"sys.argv = ['bench', '--dtype', 'bf16', '--d-model', '16', '--d-ff', '24', '--experts', '4', '--tokens', '64', "
            f"'--reps', '1', '--warmup', '0', '--out', {str(tmp_path)!r}]; "
            f"runpy.run_path({str(ROOT / 'benchmarks/bench_moe_block.py')!r}, run_name='__main__')")
    text = _run(["-c", code], cwd=tmp_path)
    assert "cost model latency skipped" in text and "time_ratio" in text.splitlines()[-1]
    doc = json.loads((tmp_path / "result.json").read_text())
    assert doc["settings"]["dtype"] == "bf16" and doc["environment"]["torch"]
    rows = {r["block"]: r for r in doc["rows"]}
    dense, moe = 2 * 2 * 16 * 48, 2 * 2 * 2 * 16 * 24 + 2 * 16 * 4  # hash LSH: 2 slots x 2 bits
    assert rows["moe-hash"]["flop_ratio"] == pytest.approx(moe / dense)
    assert rows["dense"]["forward_gflop"] == pytest.approx(64 * dense / 1e9)
    assert "| moe-learned |" in (tmp_path / "result.md").read_text()


def test_moe_vs_dense_zero_d_ff_exits_2_naming_it(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "scripts/moe_vs_dense.py"), "--d-model", "16",
                          "--d-ff", "0", "--tokens", "64", "--reps", "1"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "--d-ff must be >= 1" in out.stderr


def _cli(capsys, *args):
    from engine.cli import main

    code = main(["cost", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_engine_cost_json_memory_table_and_page_defaults(capsys):
    code, text, _ = _cli(capsys, "--json", "--preset", "Llama-2-7B", "--precision", "bf16",
                         "--kv-tokens", "4096")
    doc = json.loads(text)
    mem = {r["component"]: r["bytes"] for r in doc["memory"]}
    assert code == 0
    assert list(mem) == ["weights", "gradients", "optimizer states", "activations", "KV cache"]
    assert round(mem["weights"] / 1e9, 2) == 13.48                  # 2 bytes x 6.738B
    assert mem["KV cache"] == 32 * 2 * 32 * 128 * 2 * 4096         # 2 GiB
    # The page's defaults: 1e12 training tokens (total FLOPs = per-token x 1e12), 64 GPUs.
    flops = {r["row"]: r for r in doc["FLOPs"]}["training (3 x forward)"]
    assert flops["FLOPs for D tokens"] == pytest.approx(flops["FLOPs per token"] * 1e12)
    assert doc["time_to_train"]["gpus"] == 64 and doc["layout"]["ep"] == 1
    assert doc["layout"]["zero"] == 1 and doc["layout"]["checkpointing"] is True
    _, text, _ = _cli(capsys, "--json", "--no-checkpointing", "--zero", "0")
    doc = json.loads(text)
    assert doc["layout"]["checkpointing"] is False and doc["layout"]["zero"] == 0
    assert not doc["memory_per_gpu"]["fits"]  # Mixtral 8x7B's 32k context without them


def test_engine_cost_text_says_whether_it_fits_and_how_long_training_takes(capsys):
    # The page's defaults: Mixtral 8x7B, 1e12 tokens on 64 H200s (141 GB, 989 TFLOP/s bf16) at
    # MFU 0.4 and $2.50 per GPU-hour; the sentences are the page's, under its heading.
    _, text, _ = _cli(capsys)
    doc = json.loads(_cli(capsys, "--json")[1])
    need_gb = sum(r["bytes"] for r in doc["memory"]) / 1e9
    assert f"== Will it fit?\nFits: {need_gb:.1f} GB of 141 GB per GPU.\nTime to train " in text
    flops = estimate(preset_config("Mixtral 8x7B")).train_flops * 1e12
    seconds = flops / (64 * 989e12 * 0.4)
    gpu_hours = 64 * seconds / 3600
    assert (f"Time to train 1e+12 tokens on 64 x H200 141 GB at MFU 40% (typed): "
            f"{seconds / 86400:,.1f} days, {gpu_hours:,.0f} GPU-hours, ${2.5 * gpu_hours:,.0f} at $2.50 "
            f"per GPU-hour ({flops:.3e} training FLOPs, attention causal (S² terms halved)).") in text
    assert "Will it fit?" not in doc  # JSON holds the figures, not the sentences

    _, text, _ = _cli(capsys, "--no-checkpointing", "--zero", "0")
    doc = json.loads(_cli(capsys, "--json", "--no-checkpointing", "--zero", "0")[1])
    need_gb = sum(r["bytes"] for r in doc["memory"]) / 1e9
    advice = doc["memory_per_gpu"]["advice"]
    assert advice[0].startswith("turn on full activation checkpointing")
    assert (f"Does not fit: {need_gb:.1f} GB needed, 141 GB per GPU. What to change:\n"
            + "".join(f"- {a}\n" for a in advice) + "Time to train ") in text


@pytest.mark.parametrize("value", ["-1", "nan", "inf", "0"])
def test_engine_cost_refuses_bad_tokens_naming_the_flag(capsys, value):
    code, _, err = _cli(capsys, "--tokens", value)
    assert code == 2 and "--tokens must be" in err


def test_engine_cost_names_flags_in_errors(capsys):
    assert _cli(capsys, "--heads", "7")[1:] == ("", "error: --heads must divide --d-model (4096), got 7\n")
    code, _, err = _cli(capsys, "--gpus", "6")
    assert code == 2 and err == "error: --gpus must be a multiple of --ep (8), got 6\n"
    code, _, err = _cli(capsys, "--price", "nan")
    assert code == 2 and err == "error: --price must be finite, got nan\n"


def test_benchmark_moe_refuses_negative_tokens(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "scripts/benchmark_moe.py"), "--tokens", "-5"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "--tokens must be > 0" in out.stderr


def test_moe_vs_dense_says_how_long_first_then_progress(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "scripts/moe_vs_dense.py"), "--d-model", "16",
                          "--d-ff", "24", "--tokens", "64", "--reps", "1"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    lines = out.stderr.splitlines()
    assert out.returncode == 0 and lines[0].startswith("timing 2 blocks over 2 rounds")
    assert "about" in lines[0] and lines[-1].strip().endswith("done")
