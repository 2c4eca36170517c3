"""engine.cost_measure on a CPU: a real training step's state bytes by hand, peak against the
model, the committed H200 comparison, refusals."""

import json
from pathlib import Path

import pytest

from engine.cost_measure import compare_runs, extra_ms, measure_step, scaled_copy
from engine.cost_memory import TrainLayout, memory_per_gpu
from engine.cost_model import PRESETS, TransformerConfig

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks/results/cost_memory_h200_2026-12-03.json"
CFG = TransformerConfig(32, 2, 2, 2, 64, 300, 32, "swiglu")


@pytest.mark.slow
def test_cpu_step_state_bytes_by_hand_and_peak_near_the_model():
    # Parameters by hand: 2 x (4 x 32^2 + 3 x 32 x 64) + 2 x 300 x 32 + 5 x 32 = 40,672.
    params = 2 * (4 * 32**2 + 3 * 32 * 64) + 2 * 300 * 32 + 5 * 32
    layout = TrainLayout(precision="fp32", micro_batch=4)
    m = measure_step(CFG, layout, "cpu", warmup_s=0.0, time_s=0.0)
    assert m.static_bytes == 16 * params  # fp32 weights, gradients, Adam m and v
    assert m.steps >= 2 and m.step_ms > 0 and m.saved_bytes > 0
    # A CPU runs RMSNorm unfused (one more fp32 copy per norm than the GPU model counts).
    assert m.peak_bytes == pytest.approx(sum(memory_per_gpu(CFG, layout).values()), rel=0.15)


@pytest.mark.parametrize("layout, match", [
    (TrainLayout(precision="mixed"), "precision must be fp32 or bf16"),
    (TrainLayout(precision="bf16", gpus=2), "one device"),
])
def test_refusals(layout, match):
    with pytest.raises(ValueError, match=match):
        measure_step(CFG, layout, "cpu")


def test_too_large_for_this_machine_is_refused_before_building():
    with pytest.raises(ValueError, match="GiB limit"):
        measure_step(PRESETS["Mixtral 8x7B"], TrainLayout(precision="bf16"), "cpu")


def test_scaled_copy_keeps_ratios():
    small = scaled_copy(PRESETS["Mixtral 8x7B"])
    assert (small.d_model, small.n_layers, small.seq_len, small.vocab) == (256, 2, 256, 8000)
    assert small.d_ff == round(14336 * 256 / 4096) and (small.num_experts, small.top_k) == (8, 2)
    assert small.n_heads // small.n_kv_heads == 4  # Mixtral's GQA ratio 32 / 8


def test_committed_h200_runs_meet_the_targets_on_three_kinds_of_config():
    doc = json.loads(RESULTS.read_text())
    assert "H200" in doc["environment"]["device"]
    rows = compare_runs(doc["runs"], doc["calibration"], extra_ms(doc["moe_blocks"]))
    assert len(rows) == len(doc["runs"])  # every run reported, misses included
    good = [r for r in rows if r["verdict"] == "within"]
    assert all(abs(r["memory error %"]) <= 10 and abs(r["time error %"]) <= 15 for r in good)
    # Dense and MoE, with and without checkpointing, two sequence lengths, among the predicted.
    assert {r["experts"] > 0 for r in good} == {True, False}
    assert {r["checkpointing"] for r in good} == {True, False}
    assert len({r["seq_len"] for r in good}) >= 2
    # Independently: a dense run's predicted time is the calibration's scaled by executed FLOPs.
    calib = next(r for r in doc["runs"] if r["name"] == doc["calibration"])
    assert calib["layout"]["checkpointing"] is False and calib["config"]["num_experts"] == 0
