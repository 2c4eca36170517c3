"""engine.attention_bench and `python -m engine attention`: FLOPs by hand, shapes, refusals, CPU sweep."""

import json
import math

import pandas as pd
import pytest
import torch

from engine import attention_bench as ab
from engine.cli import main
from tests.test_attention_wrapper import naive_attention

TINY = ab.SweepSettings(seqlens=(32, 64), head_dims=(16,), causal=(False, True), dtypes=("fp32",), tokens=128,
                        hidden=32, backends=("fa3", "sdpa-flash", "sdpa-cudnn", "sdpa-math", "wrapper"),
                        reps=2, warmup=0, device="cpu")


def test_flops_by_hand():
    # 4 * B * H * Sq * Sk * D = 4 * 2 * 3 * 5 * 6 * 7 = 5040
    assert ab.attention_flops(2, 3, 5, 6, 7) == 5040
    assert ab.attention_flops(2, 3, 5, 6, 7, causal=True) == 2520
    assert ab.attention_flops(2, 3, 5, 6, 7, mode="fwd+bwd") == 5040 * 3.5
    # FA3 paper point: 16k tokens at seqlen 16k, hidden 2048, head dim 128 -> 16 heads.
    assert ab.attention_flops(1, 16, 16384, 16384, 128) == 4 * 16 * 16384**2 * 128
    with pytest.raises(ValueError, match="mode must be one of fwd, fwd\\+bwd"):
        ab.attention_flops(1, 1, 1, 1, 1, mode="bwd")


def test_paper_preset_shapes_follow_tokens_and_hidden():
    shapes = ab.shapes_of(ab.PRESETS["fa3-paper"])
    assert len(shapes) == 3 * 2 * 6
    for sh in shapes:
        assert sh.batch * sh.seqlen == 16384 and sh.heads * sh.head_dim == 2048 and sh.kv_heads == sh.heads
    assert {(sh.head_dim, sh.heads) for sh in shapes} == {(64, 32), (128, 16), (256, 8)}
    gqa = ab.shapes_of(ab.PRESETS["gqa"])
    assert {sh.heads // sh.kv_heads for sh in gqa} == {1, 4, 8}


@pytest.mark.parametrize("override, match", [
    ({"head_dims": (12,)}, "head_dim must be a multiple of 8"),
    ({"head_dims": (64,), "hidden": 96}, "dividing hidden"),
    ({"gqa": (3,)}, "gqa must divide the head count"),
    ({"backends": ("fa4",)}, "backend must be one of"),
    ({"backends": ("sdpa-math", "sdpa-math")}, "backends must not repeat"),
    ({"seqlens": ()}, "must each be non-empty"),
    ({"seqlens": (8,)}, "seqlen must be >= 16"),
    ({"dtypes": ("fp8",)}, "dtype must be one of"),
    ({"device": "tpu"}, "device must be one of"),
])
def test_bad_settings_raise_before_anything_runs(override, match):
    with pytest.raises(ValueError, match=match):
        ab.run_sweep(ab.settings_for("quick", **override))


def test_oversize_sweep_is_refused_before_allocating(monkeypatch):
    def no_alloc(*args, **kwargs):
        raise AssertionError("allocated inputs for a sweep that should have been refused")

    monkeypatch.setattr(ab, "_make_inputs", no_alloc)
    monkeypatch.setattr(ab, "matmul_ceiling", no_alloc)
    big = ab.settings_for("quick", seqlens=(65536,), tokens=2**22, hidden=8192, head_dims=(128,), device="cpu")
    with pytest.raises(ValueError, match="would need about .* GiB"):
        ab.run_sweep(big)


def test_reference_slice_matches_a_float64_reference():
    shape = ab.Shape(batch=2, seqlen=40, heads=4, kv_heads=2, head_dim=8, causal=True, dtype="fp32")
    t = ab._make_inputs(shape, torch.device("cpu"), seed=3, need_bhsd=False, grad=False)
    ref = ab._reference(t, shape)  # (rows, group, D): batch 0, kv head 0's two query heads
    full = naive_attention(*(t[n].transpose(1, 2) for n in ("q", "k", "v")), causal=True)
    torch.testing.assert_close(ref.double(), full[0, :2].transpose(0, 1), rtol=1e-5, atol=1e-6)


def test_cpu_sweep_rows_are_labelled_timed_and_checked():
    result = ab.run_sweep(TINY)
    t = result.table
    assert len(t) == 2 * 2 * 5  # shapes x backends, every backend listed even when it cannot run
    assert list(t["backend"][:5]) == list(TINY.backends)
    assert set(t.loc[t["backend"] == "sdpa-cudnn", "note"]) == {"CUDA only"}
    assert set(t.loc[t["backend"] == "fa3", "status"]) == {"unavailable"}
    ok = t[t["status"] == "ok"]
    assert set(ok["backend"]) == {"sdpa-flash", "sdpa-math", "wrapper"}
    assert (ok["batch"] == 128 // ok["seqlen"]).all() and (ok["heads"] == 2).all()
    assert (ok["rel_err"] < 1e-5).all()  # fp32 against the fp32 reference
    for _, r in ok.iterrows():
        flops = 4 * r["batch"] * r["heads"] * r["seqlen"] ** 2 * r["head_dim"] / (2 if r["causal"] else 1)
        assert r["tflops"] == pytest.approx(flops / (r["ms"] / 1e3) / 1e12)
        assert r["frac_matmul"] == pytest.approx(r["tflops"] / result.matmul_tflops["fp32"])
    assert ok.loc[ok["backend"] == "wrapper", "note"].str.startswith("attention(): ").all()
    back = ab.SweepResult.from_json(result.to_json())
    pd.testing.assert_frame_equal(back.table, t)


def test_an_oom_or_missing_kernel_fails_one_row_only(monkeypatch):
    real = ab._runner

    def runner(backend, t, shape):
        if backend == "sdpa-math" and shape.seqlen == 64:
            def boom():
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")
            return boom, True
        if backend == "sdpa-flash" and shape.causal:
            def nokernel():
                raise RuntimeError("No available kernel. Aborting execution.")
            return nokernel, True
        return real(backend, t, shape)

    monkeypatch.setattr(ab, "_runner", runner)
    t = ab.run_sweep(ab.replace(TINY, backends=("sdpa-flash", "sdpa-math"))).table
    status = {(r.seqlen, r.causal, r.backend): r.status for r in t.itertuples()}
    assert status == {(32, False, "sdpa-flash"): "ok", (32, False, "sdpa-math"): "ok",
                      (64, False, "sdpa-flash"): "ok", (64, False, "sdpa-math"): "OOM",
                      (32, True, "sdpa-flash"): "error", (32, True, "sdpa-math"): "ok",
                      (64, True, "sdpa-flash"): "error", (64, True, "sdpa-math"): "OOM"}
    assert t.loc[t["status"] == "OOM", "note"].str.contains("Tried to allocate 8.00 GiB").all()


def test_math_backend_is_skipped_when_its_scores_cannot_fit(monkeypatch):
    shape = ab.shapes_of(TINY)[-1]  # seqlen 64: 2 * 2 * 64 * 64 scores
    assert ab.math_bytes(shape, "fwd") == 3 * 2 * 2 * 64 * 64 * 4 + 64 * 64
    # Inputs take 131072 bytes per shape (twice that must fit); math scores take 99328 bytes at seqlen 32
    # and 200704 at 64, so 300000 bytes leave room for the first and not the second.
    monkeypatch.setattr(ab, "memory_budget", lambda device: 300_000)
    t = ab.run_sweep(ab.replace(TINY, backends=("sdpa-math",))).table
    assert list(t["status"]) == ["ok", "skipped", "ok", "skipped"]


def test_speedup_uses_the_fastest_timed_sdpa_backend():
    keys = dict(dtype="bf16", head_dim=128, causal=False, batch=1, seqlen=4096, heads=16, kv_heads=16)
    rows = [
        {**keys, "backend": "fa3", "status": "ok", "ms": 1.0, "tflops": 600.0},
        {**keys, "backend": "sdpa-flash", "status": "ok", "ms": 2.0, "tflops": 300.0},
        {**keys, "backend": "sdpa-cudnn", "status": "error", "ms": 0.1, "tflops": 6000.0},  # not timed
        {**keys, "backend": "sdpa-math", "status": "ok", "ms": 40.0, "tflops": 15.0},
        {**keys, "backend": "flex", "status": "ok", "ms": 0.5, "tflops": 1200.0},  # not an SDPA backend
    ]
    s = ab.speedup_table(pd.DataFrame(rows))
    assert len(s) == 1
    assert (s["best_sdpa"][0], s["best_sdpa_tflops"][0], s["speedup"][0]) == ("sdpa-flash", 300.0, 2.0)


@pytest.mark.parametrize("name", sorted(ab.committed_results()))
def test_committed_gpu_sweeps_are_consistent_with_the_flop_formula(name):
    path = ab.committed_results()[name]
    res = ab.load_result(path)
    raw = json.loads(path.read_text())["matmul_tflops"]  # one float in documents from before per-dtype ceilings
    assert res.matmul_tflops == (raw if isinstance(raw, dict) else {"bf16": raw})
    ok = res.table[res.table["status"] == "ok"]
    card = name.split("_")[2].upper()  # attention_sweep_<card>_<date>: the file name says the device
    assert card in res.env["device"] and not ok.empty
    flops = [ab.attention_flops(r.batch, r.heads, r.seqlen, r.seqlen, r.head_dim, r.causal) for r in ok.itertuples()]
    recomputed = pd.Series(flops, index=ok.index) / (ok["ms"] / 1e3) / 1e12
    pd.testing.assert_series_equal(recomputed, ok["tflops"], check_names=False, rtol=1e-9)


def test_an_h100_sweep_is_committed():
    assert any("_h100_" in name for name in ab.committed_results())


def test_cli_prints_the_same_rows_as_json(capsys):
    argv = ["attention", "--preset", "quick", "--seqlens", "32", "--head-dims", "16", "--hidden", "32",
            "--tokens", "64", "--causal", "both", "--dtypes", "fp32", "--backends", "sdpa-math,sdpa-flash",
            "--reps", "1", "--device", "cpu", "--json"]
    assert main(argv) == 0
    doc = json.loads(capsys.readouterr().out)
    rows = doc["attention rows"]
    assert [(r["causal"], r["backend"]) for r in rows] == [
        (False, "sdpa-math"), (False, "sdpa-flash"), (True, "sdpa-math"), (True, "sdpa-flash")]
    assert all(r["batch"] == 2 and r["heads"] == 2 and r["status"] == "ok" for r in rows)
    assert doc["settings"]["device"] == "cpu"


def test_cli_loads_a_committed_result_and_rejects_bad_input(capsys):
    path = next(iter(ab.committed_results().values()))
    assert main(["attention", "--load", str(path)]) == 0
    out = capsys.readouterr().out
    assert "FA3 speed-up over the best SDPA backend" in out and "sdpa-cudnn" in out
    assert main(["attention", "--head-dims", "12"]) == 2
    assert "head_dim must be a multiple of 8" in capsys.readouterr().err
    assert main(["attention", "--load", "no/such/file.json"]) == 2


def test_quick_preset_is_cpu_sized():
    shapes = ab.shapes_of(ab.PRESETS["quick"])
    # Largest problem: tokens * seqlen * hidden * 4 FLOPs = 1024 * 512 * 256 * 4 ~ 0.5 GFLOP.
    assert max(ab.attention_flops(s.batch, s.heads, s.seqlen, s.seqlen, s.head_dim) for s in shapes) <= 1e9
    assert math.prod(len(x) for x in (ab.PRESETS["quick"].seqlens, ab.PRESETS["quick"].causal)) == len(shapes)
