"""engine.attention_bench and `python -m engine attention`: FLOPs by hand, masks, shapes, refusals,
run-time estimates, stopping, the cross-check column, CPU sweeps and the committed H200 results."""

import json
import math
import re
import types

import pandas as pd
import pytest
import torch

from engine import attention_backends as abk
from engine import attention_bench as ab
from engine import attention_estimate as aest
from engine import attention_masks as am
from engine import attention_shapes as ash
from engine.cli import main
from tests.test_attention_wrapper import naive_attention

TINY = ab.SweepSettings(seqlens=(32, 64), head_dims=(16,), causal=(False, True), dtypes=("fp32",), tokens=128,
                        hidden=32, backends=("fa4", "fa3", "sdpa-flash", "sdpa-cudnn", "sdpa-math", "wrapper"),
                        rep_ms=2.0, warmup_ms=0.0, min_reps=2, device="cpu")


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
    ({"backends": ("fa5",)}, "backend must be one of"),
    ({"masks": ("window-0",)}, "mask window must be >= 1"),
    ({"masks": ("window-x",)}, "mask window must be an integer"),
    ({"masks": ("diagonal",)}, "mask must be one of causal, window-1k"),
    ({"rep_ms": 0.5}, "rep_ms must be >= 1.0"),
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

    monkeypatch.setattr(ab, "make_inputs", no_alloc)
    monkeypatch.setattr(ab, "matmul_ceiling", no_alloc)
    big = ab.settings_for("quick", seqlens=(65536,), tokens=2**22, hidden=8192, head_dims=(128,), device="cpu")
    with pytest.raises(ValueError, match="would need about .* GiB"):
        ab.run_sweep(big)


def _dense_reference(t, shape):
    """float64 attention over the whole batch with the mask built by brute force, softcap applied."""
    q, k, v = (t[n].double().transpose(1, 2) for n in ("q", "k", "v"))
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = q @ k.transpose(-1, -2) / math.sqrt(shape.head_dim)
    if shape.mask == "softcap":
        s = am.SOFTCAP * torch.tanh(s / am.SOFTCAP)
    n, w = shape.seqlen, am.window_of(shape.mask)
    keep = torch.zeros(shape.batch, n, n, dtype=torch.bool)
    for b in range(shape.batch):
        for i in range(n):
            for j in range(i + 1):
                same_doc = shape.mask != "documents" or bool(t["doc"][b, i] == t["doc"][b, j])
                keep[b, i, j] = same_doc and (w is None or i - j <= w)
    return torch.softmax(s.masked_fill(~keep[:, None], -math.inf), -1) @ v, keep


@pytest.mark.parametrize("mask", ["none", "causal", "window-5", "documents", "softcap"])
def test_reference_slice_and_dq_match_a_brute_force_float64_reference(mask):
    shape = ab.Shape(batch=2, seqlen=40, heads=4, kv_heads=2, head_dim=8, causal=mask != "none", dtype="fp32",
                     mask=mask)
    t = abk.make_inputs(shape, torch.device("cpu"), seed=3, backends=["fa4"], grad=False)
    if mask == "documents":
        t["doc"] = torch.tensor([[0] * 13 + [1] * 20 + [2] * 7, [0] * 30 + [1] * 10], dtype=torch.int32)
    dout = torch.randn(40, 2, 8, dtype=torch.float64)
    ref, dq = abk.reference(t, shape, dout)  # (rows, group, D): batch 0, kv head 0's two query heads
    full, keep = _dense_reference(t, shape) if mask != "none" else (
        naive_attention(*(t[n].transpose(1, 2) for n in ("q", "k", "v"))), None)
    torch.testing.assert_close(ref.double(), full[0, :2].transpose(0, 1), rtol=1e-5, atol=1e-6)
    q = t["q"].detach().double().requires_grad_(True)
    again = _dense_reference({**t, "q": q}, shape)[0] if mask != "none" else naive_attention(
        q.transpose(1, 2), t["k"].transpose(1, 2), t["v"].transpose(1, 2))
    (want,) = torch.autograd.grad(again[0, :2].transpose(0, 1), q, dout)
    torch.testing.assert_close(dq.double(), want[0, :, :2], rtol=1e-4, atol=1e-6)
    if keep is not None and mask != "documents":  # kept pairs, by brute force, for the FLOP count
        assert am.kept_pairs(mask, 40, 2) == int(keep.sum())


@pytest.mark.parametrize("mask, n", [("window-1", 7), ("window-3", 10), ("window-4k", 5000), ("causal", 33)])
def test_kept_pairs_by_counting(mask, n):
    w = am.window_of(mask)
    want = sum(min(i, w if w is not None else i) + 1 for i in range(n))
    assert am.kept_pairs(mask, n, batch=3) == 3 * want


def test_documents_cover_the_sequence_and_count_pairs_per_document():
    rows = am.doc_lengths(5000, batch=2, seed=1)
    assert all(sum(r) == 5000 and len(r) == 4 and min(r) >= 1 for r in rows)  # 5000 // 1024 = 4 documents
    assert am.kept_pairs("documents", 5000, 2, seed=1) == sum(n * (n + 1) // 2 for r in rows for n in r)
    ids = am.document_ids(5000, 2, 1, torch.device("cpu"))
    assert [torch.bincount(ids[b]).tolist() for b in range(2)] == rows
    cu, longest = am.cu_seqlens(5000, 2, 1, torch.device("cpu"))
    assert cu.tolist() == [0, *torch.tensor([n for r in rows for n in r]).cumsum(0).tolist()] and longest == max(
        n for r in rows for n in r)
    shape = ab.Shape(2, 5000, 4, 4, 64, True, "bf16", "documents")
    assert ash.shape_flops(shape, "fwd", seed=1) == 4 * 4 * 64 * am.kept_pairs("documents", 5000, 2, 1)


def test_cpu_sweep_rows_are_labelled_timed_and_checked():
    result = ab.run_sweep(TINY)
    t = result.table
    assert len(t) == 2 * 2 * 6  # shapes x backends, every backend listed even when it cannot run
    assert list(t["backend"][:6]) == list(TINY.backends)
    assert set(t.loc[t["backend"] == "sdpa-cudnn", "note"]) == {"CUDA only"}
    assert set(t.loc[t["backend"].isin(["fa3", "fa4"]), "status"]) == {"unavailable"}
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
    real = ab.runner

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

    monkeypatch.setattr(ab, "runner", runner)
    t = ab.run_sweep(ab.replace(TINY, backends=("sdpa-flash", "sdpa-math"))).table
    status = {(r.seqlen, r.causal, r.backend): r.status for r in t.itertuples()}
    assert status == {(32, False, "sdpa-flash"): "ok", (32, False, "sdpa-math"): "ok",
                      (64, False, "sdpa-flash"): "ok", (64, False, "sdpa-math"): "OOM",
                      (32, True, "sdpa-flash"): "error", (32, True, "sdpa-math"): "ok",
                      (64, True, "sdpa-flash"): "error", (64, True, "sdpa-math"): "OOM"}
    assert t.loc[t["status"] == "OOM", "note"].str.contains("Tried to allocate 8.00 GiB").all()


def test_math_backend_is_skipped_when_its_scores_cannot_fit(monkeypatch):
    s = ab.replace(TINY, seqlens=(32, 128), backends=("sdpa-math",))
    shape = ab.shapes_of(s)[1]  # seqlen 128: batch 1, 2 heads
    assert ab.math_bytes(shape, "fwd") == 3 * 1 * 2 * 128 * 128 * 4 + 128 * 128
    # Inputs take 131072 bytes per shape in both layouts (twice that must fit); math takes 102400 bytes
    # at seqlen 32 and 409600 at 128, so 300000 bytes leave room for the first and not the second.
    assert ab.input_bytes(shape, s.backends) == 131072
    monkeypatch.setattr(ab, "memory_budget", lambda device: 300_000)
    t = ab.run_sweep(s).table
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
    ok = res.table[res.table["status"] == "ok"]
    card = name.split("_")[2].upper()  # attention_sweep_<card>_<date>_<section>: the file name says the device
    assert card in res.env["device"] and not ok.empty
    mode = res.settings["mode"]
    flops = [ash.shape_flops(ab.Shape(r.batch, r.seqlen, r.heads, r.kv_heads, r.head_dim, r.causal, r.dtype, r.mask),
                             mode, res.settings["seed"]) for r in ok.itertuples()]
    recomputed = pd.Series(flops, index=ok.index) / (ok["ms"] / 1e3) / 1e12
    pd.testing.assert_series_equal(recomputed, ok["tflops"], check_names=False, rtol=1e-9)
    # Cross-check column: the harness's median against do_bench's on the same callable, in percent.
    pct = 100 * (ok["ms"] / ok["do_bench_ms"] - 1)
    # JSON keeps 10 digits
    pd.testing.assert_series_equal(pct, ok["vs_do_bench_pct"], check_names=False, rtol=1e-6, atol=1e-6)
    assert (ok["rel_err"] < 1e-2).all() and ((ok["dq_err"] < 2e-2) | ok["dq_err"].isna()).all()


def test_the_h200_results_hold_fa4_forward_and_backward_at_steady_clocks():
    files = ab.committed_results()
    train = ab.load_result(files["attention_sweep_h200_2026-12-03_paper-train"])
    assert train.settings["mode"] == "fwd+bwd" and train.env["device"] == "NVIDIA H200"
    ok = train.table[train.table["status"] == "ok"]
    assert set(ok["backend"]) >= {"fa4", "sdpa", "sdpa-cudnn", "sdpa-flash"}
    assert ok["sm_mhz"].between(300, 2100).all() and ok["power_w"].between(50, 800).all()
    # The settled rerun: every row warmed up at least do_bench's 25 ms, queued from the host, two windows each.
    assert (ok["warmup_ms"] >= 25).all() and (ok["host_ms"] > 0).all() and (ok["window_range_pct"] >= 0).all()
    assert train.table.loc[train.table["backend"] == "fa3", "note"].eq("fa3-fwd is forward only").all()
    assert ok["dq_err"].notna().all()
    masks = ab.load_result(files["attention_sweep_h200_2026-12-03_masks"])
    assert set(masks.table["mask"]) == set(am.MASKS)


def test_cli_prints_the_same_rows_as_json(capsys):
    argv = ["attention", "--preset", "quick", "--seqlens", "32", "--head-dims", "16", "--hidden", "32",
            "--tokens", "64", "--causal", "both", "--dtypes", "fp32", "--backends", "sdpa-math,sdpa-flash",
            "--rep-ms", "1", "--device", "cpu", "--json"]
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
    assert "FA4 speed-up over the best SDPA backend" in out and "sdpa-cudnn" in out
    assert main(["attention", "--head-dims", "12", "--device", "cpu"]) == 2
    assert "--head-dims must be a multiple of 8" in capsys.readouterr().err
    assert main(["attention", "--load", "no/such/file.json"]) == 2


@pytest.mark.parametrize("flag, value", [("--seqlens", "8"), ("--tokens", "0"), ("--hidden", "4"),
                                         ("--backends", "fa9"), ("--dtypes", "fp8x"), ("--mode", "bwd"),
                                         ("--rep-ms", "0"), ("--windows", "0"), ("--masks", "zz"),
                                         ("--gqa", "0"), ("--preset", "nope")])
def test_cli_errors_name_the_flag_typed(capsys, flag, value):
    assert main(["attention", "--device", "cpu", flag, value]) == 2
    err = capsys.readouterr().err
    assert f"error: {flag} " in err and "_" not in err.split("got")[0], err


def test_quick_preset_is_cpu_sized():
    shapes = ab.shapes_of(ab.PRESETS["quick"])
    # Largest problem: tokens * seqlen * hidden * 4 FLOPs = 1024 * 512 * 256 * 4 ~ 0.5 GFLOP.
    assert max(ab.attention_flops(s.batch, s.heads, s.seqlen, s.seqlen, s.head_dim) for s in shapes) <= 1e9
    assert math.prod(len(x) for x in (ab.PRESETS["quick"].seqlens, ab.PRESETS["quick"].causal)) == len(shapes)


class _Closed(BaseException):
    """Stands for Streamlit's StopException (a BaseException) when a page's session ends."""


def test_a_progress_callback_that_raises_stops_the_sweep_at_once(monkeypatch):
    timed = []
    real = ab._time_row
    monkeypatch.setattr(ab, "_time_row", lambda shape, b, *a: timed.append(b) or real(shape, b, *a))

    def progress(done, total, label):
        if done >= 2:
            raise _Closed()

    with pytest.raises(_Closed):
        ab.run_sweep(ab.replace(TINY, backends=("sdpa-flash", "sdpa-math")), progress=progress)
    assert timed == ["sdpa-flash", "sdpa-math"]  # the rows before the stop, none after


def test_crosscheck_times_each_rows_own_callable():
    seen = []

    def crosscheck(fn):
        seen.append(fn)
        fn()
        return 2.0

    t = ab.run_sweep(ab.replace(TINY, seqlens=(32,), backends=("sdpa-math",), windows=3),
                     crosscheck=crosscheck).table
    assert len(seen) == 3 * len(t) and (t["do_bench_ms"] == 2.0).all()  # 3 windows per row
    pd.testing.assert_series_equal(t["vs_do_bench_pct"], 100 * (t["ms"] / 2.0 - 1), check_names=False)


def test_a_row_without_crosscheck_is_the_median_of_its_windows(monkeypatch):
    """One slow window must not move the figure: three windows of 1, 1.3 (slow) and 1.02 ms give
    1.02 ms, and a window-to-window range of (1.3 - 1) / 1.02. Only the first window settles the clock."""
    medians, settles = iter([1.0, 1.3, 1.02]), []

    def fake_steady(fn, device, *args, settle=None, **kw):
        fn()
        if settle is None:  # the matmul ceiling's timing, not the row's
            return ab.Timing(1.0, 1.0, 1.0, 5)
        settles.append(settle)
        m = next(medians)
        return ab.Timing(m, 0.9 * m, 1.1 * m, 5)

    monkeypatch.setattr(ab, "steady_time", fake_steady)
    t = ab.run_sweep(ab.replace(TINY, seqlens=(32,), causal=(False,), backends=("sdpa-math",))).table
    assert settles == [True, False, False]
    assert t["ms"].iloc[0] == pytest.approx(1.02) and t["window_range_pct"].iloc[0] == pytest.approx(100 * 0.3 / 1.02)
    assert math.isnan(t["do_bench_ms"].iloc[0])


def test_masked_cpu_sweep_checks_output_and_dq_and_counts_kept_pairs():
    s = ab.replace(TINY, seqlens=(64,), masks=("causal", "window-8", "documents", "softcap"), mode="fwd+bwd",
                   backends=("fa4", "sdpa", "sdpa-math"))
    t = ab.run_sweep(s).table.set_index(["mask", "backend"])
    assert t.loc[("softcap", "sdpa"), "note"] == "SDPA has no softcap"
    assert t.loc[("window-8", "fa4"), "status"] == "unavailable"
    ok = t[t["status"] == "ok"]
    assert len(ok) == 6 and (ok["rel_err"] < 1e-5).all() and (ok["dq_err"] < 1e-5).all()
    r = ok.loc[("window-8", "sdpa")]
    flops = 4 * 2 * 16 * am.kept_pairs("window-8", 64, 2) * 3.5  # heads 2, head dim 16, fwd+bwd 3.5x
    assert r["tflops"] == pytest.approx(flops / (r["ms"] / 1e3) / 1e12)


def test_a_window_reaching_past_the_sequence_is_a_row_that_says_why():
    t = ab.run_sweep(ab.replace(TINY, seqlens=(32,), masks=("window-4k",), backends=("sdpa",))).table
    assert list(t["status"]) == ["unavailable"]
    assert t["note"][0] == "window 4096 covers the whole sequence (32 tokens): the same as the causal row"


def test_estimate_by_hand_and_reduced_settings_fit():
    s = ab.replace(TINY, seqlens=(64,), causal=(False,), backends=("sdpa-math", "sdpa-cudnn"), rep_ms=10.0,
                   warmup_ms=5.0, min_reps=3, windows=2)
    # One shape (batch 2, 2 heads, D 16): 4*2*2*64*64*16 = 1,048,576 FLOPs at 1e-6 TFLOP/s = 1.048576 s per
    # call, x2.5 for math; cudnn does not run on a CPU. Row: two windows of max(5 ms, t) warm-up and
    # max(10 ms, 3t) timed, plus first call, reference and memory probe: 2 (t + 3t) + 3t = 11t.
    t = 2.5 * 1.048576
    assert aest.estimate_seconds(s, torch.device("cpu"), tflops=1e-6) == pytest.approx(11 * t)
    paper = ab.PRESETS["fa3-paper"]
    small = aest.reduced(paper, torch.device("cpu"), 60.0, tflops=1e-3)
    cpu = torch.device("cpu")
    assert aest.estimate_seconds(small, cpu, 1e-3) <= 60.0 < aest.estimate_seconds(paper, cpu, 1e-3)
    assert small.backends == paper.backends and small.dtypes == paper.dtypes
    assert [aest.format_seconds(x) for x in (0.2, 45, 600, 7200, 10 * 86400)] == [
        "1 s", "45 s", "10 min", "2.0 h", "10 days"]


def test_cli_refuses_a_gpu_sized_preset_on_a_cpu_with_its_estimate(capsys, monkeypatch):
    monkeypatch.setattr(ab, "run_sweep", lambda *a, **k: pytest.fail("ran a refused sweep"))
    assert main(["attention", "--preset", "fa3-paper", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert re.search(r"would take about [\d.]+ (h|days|min) on this CPU", err) and "--reduce" in err


def test_cli_shows_progress_and_the_training_view(capsys):
    argv = ["attention", "--model", "2,64,4,2,16,3", "--device", "cpu", "--backends", "sdpa,sdpa-math",
            "--rep-ms", "1", "--json"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "estimated" in captured.err and re.search(r"\[1/2\] .* left: sdpa-math", captured.err)
    doc = json.loads(captured.out)
    rows = {r["backend"]: r for r in doc["attention rows"]}
    assert rows["sdpa"]["batch"] == 2 and rows["sdpa"]["heads"] == 4 and rows["sdpa"]["kv_heads"] == 2
    view = {r["backend"]: r for r in doc["training step (attention, forward+backward)"]}
    assert view["sdpa-math"]["ms_per_step"] == pytest.approx(3 * rows["sdpa-math"]["ms"])
    assert view["sdpa"]["speedup_vs_default"] == 1.0


def test_fa4_documents_runner_passes_the_longest_document_from_the_host(monkeypatch):
    seen = {}

    def varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal):
        seen.update(cu=cu_seqlens_q.tolist(), longest=(max_seqlen_q, max_seqlen_k), causal=causal, q=q.shape)
        return q.clone(), None

    monkeypatch.setattr(abk.fa, "_FA4_MODULE", types.SimpleNamespace(flash_attn_varlen_func=varlen))
    shape = ab.Shape(2, 3000, 4, 4, 16, True, "fp32", "documents")
    t = abk.make_inputs(shape, torch.device("cpu"), seed=5, backends=["fa4"], grad=False)
    assert t["longest_doc"].device.type == "cpu"
    fn, bhsd = abk.runner("fa4", t, shape)
    out = fn()
    lengths = [n for r in am.doc_lengths(3000, 2, 5) for n in r]
    assert seen["longest"] == (max(lengths), max(lengths)) and seen["causal"] is True
    assert seen["cu"] == [0, *torch.tensor(lengths).cumsum(0).tolist()] and seen["q"] == (6000, 4, 16)
    assert not bhsd and out.shape == t["q"].shape


def test_estimate_costs_nothing_for_rows_the_sweep_would_skip():
    cpu = torch.device("cpu")
    # SDPA-math's scores at seqlen 16k, hidden 2048, head dim 64 (32 heads) are over the CPU budget: skipped.
    big = ab.replace(ab.PRESETS["fa3-paper"], seqlens=(16384,), head_dims=(64,), causal=(False,),
                     backends=("sdpa-math", "fa4", "sdpa-cudnn"), dtypes=("fp32",))
    assert ab.why_skip(ab.shapes_of(big)[0], "sdpa-math", big, cpu, ab.memory_budget(cpu)).startswith("skipped")
    assert aest.estimate_seconds(big, cpu, tflops=1e-3) == 0.0
    plan = aest.plan_run(big, cpu, 1.0, tflops=1e-3)
    assert plan == aest.RunPlan(0.0, False)


def test_plan_run_offers_the_reduced_sweep_only_over_the_limit():
    cpu = torch.device("cpu")
    paper = ab.PRESETS["fa3-paper"]
    plan = aest.plan_run(paper, cpu, 60.0, tflops=1e-3)
    assert plan.too_long and plan.estimate_s == aest.estimate_seconds(paper, cpu, 1e-3) > 60.0
    assert plan.reduced == aest.reduced(paper, cpu, 60.0, 1e-3)
    assert plan.reduced_s == aest.estimate_seconds(plan.reduced, cpu, 1e-3) <= 60.0
    quick = aest.plan_run(plan.reduced, cpu, 60.0, tflops=1e-3)
    assert not quick.too_long and quick.reduced is None and quick.estimate_s == plan.reduced_s
