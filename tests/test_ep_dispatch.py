"""The real dispatch under torchrun (2 gloo processes): round trip, traffic, faults, bad input.

Every launch is bounded by launch()'s own timeout, which kills the whole process tree.
"""

import contextlib
import datetime
import json
import multiprocessing
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings, strategies as st

import engine.ep_dispatch as ep
import engine.ep_launch as ep_launch
from engine.cli import main
from engine.ep_combine import weighted_rows_sum
from engine.ep_dispatch import expert_gains, launch, median_round, summarize
from engine.ep_launch import LaunchError
from engine.ep_layer import ExpertParallelLayer
from engine.ep_sections import headroom, next_section
from engine.expert_parallel import (EPSettings, contiguous_placement, ep_stats, parse_placement,
                                    rank_batch, token_features)

ROOT = Path(__file__).resolve().parents[1]


def _loop_reference(x, experts, weights, gains):
    """Token by token: sum over slots of weight * (x * gain[expert]), the expert's product in x's
    dtype, the weighted sum in float64 (the layer sums in float32, within the tests' tolerance)."""
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for j in range(experts.shape[1]):
            e = int(experts[t, j])
            if e >= 0:
                y = x[t] * gains[e].to(x.dtype)
                out[t] += y.double() * float(weights[t, j].to(x.dtype))
    return out.to(x.dtype)


@pytest.mark.parametrize("ranks", [2, 3])
def test_round_trip_equals_single_process_reference(tmp_path, ranks):
    # top-k router with k = 3, greedy placement with replicas, a hot expert, and 50 tokens in 3
    # pipelined chunks (17, 17, 16): every path at once. With 3 ranks, rank 1's own rows sit
    # between the others' in slot order, which the dispatch moves last.
    s = EPSettings(experts=6, top_k=3, tokens=50, d_model=16, dtype="fp32", placement="greedy",
                   replicas=2, router="topk", hot_share=0.3, seed=5)
    doc = launch(s, ranks, warmup=0, reps=1, timeout_s=90, chunks=3, dump=tmp_path)
    gains = expert_gains(6, 5)
    predicted = ep_stats(EPSettings(**{**s.__dict__, "ranks": ranks}))
    for r in range(ranks):
        got = torch.load(tmp_path / f"rank{r}.pt")
        ids, experts, weights = rank_batch(EPSettings(**{**s.__dict__, "ranks": ranks}), r)
        assert torch.equal(got["ids"], ids) and torch.equal(got["experts"], experts)
        x = token_features(ids, 16, 5)
        torch.testing.assert_close(got["out"], _loop_reference(x, experts, weights, gains),
                                   rtol=1e-6, atol=1e-6)
        # The rows each rank really sent are the what-if's prediction for that source rank.
        assert got["send"] == list(predicted.pair_matrix[r])
    assert doc["world"] == ranks and doc["backend"] == "gloo"
    assert [row["rank"] for row in doc["per_rank"]] == list(range(ranks))
    assert doc["summary"][0]["max_abs_err"] < 1e-6
    # Every phase's ratio is the slowest rank's plain time over its slowest phase time.
    for phase in ("dispatch", "combine", "layer"):
        slowest = max(row[f"{phase}_ms"] for row in doc["per_rank"])
        plain = max(row[f"plain_{phase}_ms"] for row in doc["per_rank"])
        assert doc["summary"][0][f"{phase}_ratio"] == pytest.approx(plain / slowest)


@pytest.mark.parametrize("slack,overflows", [(0.0, True), (50.0, False)])
def test_routing_that_changes_every_call_matches_the_reference(slack, overflows):
    # Three batches in turn: each call's main sections are sized from the last call's counts
    # (a different batch), so with no slack some rows overflow into the second exchange every
    # few calls; with ample slack none do after the first call. The worker checks every
    # batch's output, and the phases run apart, against reference_layer.
    s = EPSettings(experts=8, top_k=2, tokens=60, d_model=8, dtype="fp32", router="topk", seed=2)
    doc = launch(s, 2, warmup=1, reps=4, timeout_s=90, chunks=2, batches=3, slack=slack)
    summary = doc["summary"][0]
    assert summary["max_abs_err"] < 1e-6
    assert (summary["overflow_share"] > 0) == overflows
    assert all(row["batches"] == 3 for row in doc["per_rank"])


def test_ranks_whose_token_shapes_differ_agree_on_their_split_sizes():
    # Expert Choice gives each rank and batch its own k (the most experts any token got: here
    # 3 and 4 on the two ranks in the second batch). The sections must still come from the same
    # last call on both ends of a pair, or the exchanges mismatch (gloo raised on the sizes).
    s = EPSettings(experts=8, top_k=2, tokens=40, d_model=8, dtype="fp32",
                   router="expert_choice", seed=1)
    doc = launch(s, 2, warmup=1, reps=2, timeout_s=90, chunks=2, batches=3)
    assert doc["summary"][0]["max_abs_err"] < 1e-6


def _uneven_rank(rank, port, errors):
    """Rank `rank` of 2 (gloo): 1 token on rank 0, 5 on rank 1, 3 chunks; three layer calls, each
    checked against reference_layer."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2, timeout=datetime.timedelta(seconds=20))
    try:
        s = EPSettings(experts=4, ranks=2, top_k=2, tokens=[1, 5][rank], d_model=8, dtype="fp32",
                       router="topk", seed=3)
        gains = expert_gains(4, 3)
        layer = ExpertParallelLayer(contiguous_placement(4, 2), gains, rank, torch.device("cpu"),
                                    chunks=3)
        ids, experts, weights = rank_batch(s, rank)
        x = token_features(ids, 8, 3)
        reference = ep.reference_layer(x, experts, weights, gains)
        errors.put(max(float((layer(x, experts, weights, 10 * rank + torch.arange(len(ids)))[0]
                              - reference).abs().max()) for _ in range(3)))
    finally:
        dist.destroy_process_group()


def test_ranks_with_fewer_tokens_than_chunks_agree_with_the_others():
    # A rank with fewer tokens than chunks still runs every chunk (some empty): its counts'
    # exchange must match the other ranks' chunk for chunk (it had fewer chunks, and the
    # exchange's sizes mismatched).
    ctx = multiprocessing.get_context("spawn")
    errors = ctx.Queue()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = [ctx.Process(target=_uneven_rank, args=(r, port, errors)) for r in range(2)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(60)
        if proc.is_alive():
            proc.kill()
    assert [proc.exitcode for proc in procs] == [0, 0]
    assert max(errors.get(timeout=1) for _ in procs) < 1e-6


def test_headroom_adds_slack_square_roots_of_the_last_calls_rows():
    assert [headroom(n, 4.0) for n in (0, 1, 2, 10_000)] == [0, 5, 8, 10_400]
    assert headroom(10_000, 0.0) == 10_000


def test_a_section_grows_to_its_headroom_and_is_kept_until_far_above_it():
    # 4 sqrt(9800) = 395.98: headroom 10196, kept up to 10196 + 2 * 396 = 10988.
    assert next_section(0, 10_000, 4.0) == 10_400  # first sizing
    assert next_section(10_400, 10_100, 4.0) == 10_502  # grown: 10100 + 402
    assert next_section(10_502, 9_800, 4.0) == 10_502  # kept
    assert next_section(10_988, 9_800, 4.0) == 10_988  # kept, at the edge
    assert next_section(10_989, 9_800, 4.0) == 10_196  # cut back
    assert next_section(5, 0, 4.0) == 0


def test_a_rank_that_dies_fails_the_launch_instead_of_hanging():
    s = EPSettings(experts=4, tokens=16, d_model=8)
    with pytest.raises(LaunchError) as err:
        launch(s, 2, warmup=0, reps=1, timeout_s=60, fail_rank=1)
    # A failure reported by torchrun, not our wall-time kill ("did not finish").
    assert "dispatch failed" in str(err.value)


@pytest.mark.parametrize("kwargs,message", [
    ({"processes": 9}, "processes must be >= 1 and <= 8"),
    ({"processes": 0}, "processes must be >= 1"),
    ({"processes": 4, "settings": EPSettings(experts=2)}, "Ranks R must be <= Experts E"),
    ({"processes": 2, "placement_map": "0-3;4-6"}, "misses experts"),
    ({"processes": 3, "placement_map": "0-3;4-7"}, "2 rank groups; the job has 3"),
])
def test_bad_launches_are_refused_before_anything_starts(monkeypatch, kwargs, message):
    def no_popen(*a, **k):
        raise AssertionError("launched despite bad input")

    monkeypatch.setattr(ep_launch.subprocess, "Popen", no_popen)
    settings = kwargs.pop("settings", EPSettings(experts=8))
    with pytest.raises(ValueError, match=message):
        launch(settings, **kwargs)


def _rows(layer_ms):
    """Per-rank rows of two ranks: phase p of rank r takes base_p + r ms, its plain exchange 1 ms."""
    base = {"dispatch": 2.0, "combine": 4.0, "layer": layer_ms}
    return [{"rank": r, "round": 0, "tokens": 8, "chunks": 2, "batches": 1, "lead_ms": 0.0,
             "off_rank_MB": 1.0, "dispatch_GBps": 0.5, "plain_dispatch_GBps": 0.6, "max_abs_err": r * 1e-3,
             "overflow_share": r * 0.25, "graph_share": 1.0 - r * 0.5,
             **{f"{p}_ms": b + r for p, b in base.items()},
             **{f"plain_{p}_ms": 1.0 for p in base}} for r in range(2)]


def test_summary_takes_the_slowest_rank_per_phase():
    s = summarize(_rows(layer_ms=7.0))
    assert (s["dispatch_ms"], s["combine_ms"], s["layer_ms"]) == (3.0, 5.0, 8.0)
    assert s["dispatch_ratio"] == pytest.approx(1 / 3)
    assert s["combine_ratio"] == pytest.approx(1 / 5)
    # Overflow on any rank counts; graphs only where every rank replayed them.
    assert (s["overflow_share"], s["graph_share"]) == (0.25, 0.5)
    assert s["layer_ratio"] == pytest.approx(1 / 8)
    assert s["max_abs_err"] == 1e-3 and s["plain_layer_ms"] == 1.0
    assert s["overflow_share"] == 0.25


def test_the_median_round_is_reported_with_every_rounds_dispatch_ratio():
    rounds = [summarize(_rows(layer_ms=m)) for m in (7.0, 9.0, 8.0)]
    for r, ratio in zip(rounds, (0.5, 0.8, 0.7)):
        r["dispatch_ratio"] = ratio
    picked = median_round(rounds)
    assert picked["dispatch_ratio"] == 0.7 and picked["layer_ms"] == 9.0  # the third round
    assert picked["dispatch_ratio_rounds"] == [0.5, 0.8, 0.7]
    assert median_round(rounds[:2])["dispatch_ratio"] == 0.5  # even count: the lower middle


def test_benchmark_script_imports_the_engine_from_a_file_path():
    # torchrun runs the script by path (not -m): its own sys.path line must find the engine.
    out = subprocess.run([sys.executable, "benchmarks/bench_ep_nccl.py", "--help"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120, env={"PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert "--chunks" in out.stdout and "--tokens" in out.stdout


def test_report_writes_json_and_markdown(tmp_path, capsys):
    args = ep.build_parser().parse_args(["--out", str(tmp_path)])
    rows = _rows(layer_ms=9.0)
    ep._report(args, "gloo", 2, torch.device("cpu"), EPSettings(ranks=2, tokens=64),
               [median_round([summarize(rows)])], rows)
    doc = json.loads((tmp_path / "ep_gloo_2ranks.json").read_text())
    assert doc["summary"][0]["dispatch_ratio"] == pytest.approx(1.0 / 3.0)
    assert doc["summary"][0]["layer_ratio"] == pytest.approx(1.0 / 10.0)
    assert {"device", "date", "torch", "nccl"} <= doc.keys()
    md = (tmp_path / "ep_gloo_2ranks.md").read_text()
    assert md.startswith("```text") and "0.3333" in md and "dispatch_ratio" in capsys.readouterr().out


def test_cli_what_if_tables_add_up(capsys):
    assert main(["dispatch", "--experts", "8", "--ranks", "2", "--tokens", "100", "--d-model", "10",
                 "--dtype", "fp32", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    s = EPSettings(experts=8, ranks=2, tokens=100, d_model=10, dtype="fp32")
    pairs = sum(int((rank_batch(s, r)[1] >= 0).sum()) for r in range(2))
    assert sum(row["load_pairs"] for row in doc["per rank"]) == pairs
    assert doc["placement"] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    # The matrix is the page heatmap's: off-rank cells (same-rank ones null), adding up to the
    # summary's off-rank MB; each off-rank pair is a row of 10 fp32 values.
    matrix = doc["off-rank dispatch MB (combine = transpose)"]
    assert [matrix[i][str(i)] for i in range(2)] == [None, None]
    assert matrix[0]["1"] + matrix[1]["0"] == pytest.approx(doc["summary"][0]["dispatch_off_rank_MB"])
    assert doc["summary"][0]["dispatch_off_rank_MB"] == pytest.approx(
        doc["summary"][0]["leave_share"] * pairs * 10 * 4 / 1e6)


@pytest.mark.parametrize("argv, flag", [(["--experts", "-5"], "--experts"), (["--ranks", "0"], "--ranks"),
                                        (["--top-k", "0"], "--top-k"), (["--tokens", "0"], "--tokens"),
                                        (["--d-model", "0"], "--d-model"), (["--zipf", "-1"], "--zipf"),
                                        (["--hot-share", "1.5"], "--hot-share"), (["--seed", "-1"], "--seed"),
                                        (["--placement", "greedy", "--replicas", "-1"], "--replicas"),
                                        (["--ranks", "128"], "--ranks")])
def test_cli_errors_name_the_flag_typed(capsys, argv, flag):
    assert main(["dispatch", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {flag} "), err
    assert not any(label in err for label in ("Experts E", "Ranks R", "Zipf exponent", "Hot expert", "Seed"))


@pytest.mark.parametrize("flag, field, others", [
    ("experts", "experts", {}), ("ranks", "ranks", {"experts": 4096}),
    ("top-k", "top_k", {"router": "topk", "experts": 64}), ("tokens", "tokens", {}),
    ("d-model", "d_model", {}), ("zipf", "zipf", {}), ("seed", "seed", {})])
def test_cli_help_states_the_default_and_the_largest_value_the_engine_takes(capsys, flag, field,
                                                                            others):
    """`dispatch --help` says "... to HI ... (default D)" for each setting: D is EPSettings'
    default, HI the largest value it accepts (one more is refused)."""
    with pytest.raises(SystemExit):
        main(["dispatch", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps help across lines
    own = text.split(f" --{flag} {flag.upper().replace('-', '_')} ")[1].split(" --")[0]
    hi = float(re.search(r"to ([0-9.]+)", own).group(1))
    assert float(re.search(r"\(default ([0-9.]+)\)", own).group(1)) == getattr(EPSettings(), field)
    top = int(hi) if isinstance(getattr(EPSettings(), field), int) else hi
    EPSettings(**{**others, field: top}).validated()
    with pytest.raises(ValueError):
        EPSettings(**{**others, field: top + 1}).validated()


def test_cli_refuses_a_map_that_misses_an_expert(capsys):
    assert main(["dispatch", "--experts", "8", "--map", "0-3;4-6"]) == 2
    assert "misses experts [7]" in capsys.readouterr().err
    assert parse_placement("0-3;4-7", 8).num_ranks == 2


@pytest.fixture(scope="module")
def one_rank_group():
    """A one-process gloo group in this process: the layer's plan and pipeline without torchrun."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@settings(max_examples=15, deadline=None)
@given(e=st.integers(1, 9), k=st.integers(1, 3), t=st.integers(1, 30), chunks=st.integers(1, 5),
       seed=st.integers(0, 50), router=st.sampled_from(["topk", "hash"]))
def test_one_rank_layer_equals_the_loop_for_any_chunking(one_rank_group, e, k, t, chunks, seed,
                                                         router):
    # hash routes k <= 2 and empties a duplicate slot (-1): the combine must skip it.
    k = min(k, e, 2 if router == "hash" else 3)
    s = EPSettings(experts=e, ranks=1, top_k=k, tokens=t, d_model=4, dtype="fp32",
                   router=router, seed=seed)
    ids, experts, weights = rank_batch(s, 0)
    x = token_features(ids, 4, seed)
    gains = expert_gains(e, seed)
    expected = _loop_reference(x, experts, weights, gains)
    layer = ExpertParallelLayer(contiguous_placement(e, 1), gains, 0, torch.device("cpu"), chunks)
    out, splits = layer(x, experts, weights, torch.arange(t))
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    assert splits.send == splits.recv == [int((experts >= 0).sum())]
    # The phases run apart, as the benchmark times them, give the same output.
    d = layer.dispatch(x, experts, torch.arange(t))
    for m in range(len(d.rows)):
        layer.experts(d, m)
    torch.testing.assert_close(layer.combine(d, weights), expected, rtol=1e-6, atol=1e-6)


def test_reference_layer_matches_the_loop_in_bf16():
    s = EPSettings(experts=5, ranks=1, top_k=2, tokens=40, d_model=8, dtype="bf16", seed=3)
    ids, experts, weights = rank_batch(s, 0)
    x = token_features(ids, 8, 3, torch.bfloat16)
    gains = expert_gains(5, 3)
    # float32 against float64 accumulation: at most one bf16 rounding step apart.
    torch.testing.assert_close(ep.reference_layer(x, experts, weights, gains),
                               _loop_reference(x, experts, weights, gains), rtol=8e-3, atol=1e-6)


def test_committed_results_newest_first(tmp_path):
    # Only the dispatch's own results (with a summary table): not the sweep's nor the training's.
    for name, date in [("ep_nccl_2ranks.json", "2026-01-02"), ("ep_nccl_4ranks.json", "2026-03-01"),
                       ("other.json", "2027-01-01"), ("ep_sweep_nccl_2ranks.json", "2027-01-02"),
                       ("ep_train_bench_2ranks.json", "2027-01-03")]:
        doc = {"date": date} if "sweep" in name or "train" in name else {"date": date, "summary": []}
        (tmp_path / name).write_text(json.dumps(doc))
    assert [d["date"] for d in ep.committed_results(tmp_path)] == ["2026-03-01", "2026-01-02"]


def test_combine_sum_rounds_like_the_reference_in_bf16():
    # sum_j rows[position[t, j]] * w[t, j] with w first rounded to bf16, in float32, rounded once.
    gen = torch.Generator().manual_seed(4)
    rows = torch.randn(300, 64, generator=gen).to(torch.bfloat16)
    position = torch.randint(0, 300, (200, 2), generator=gen)
    weights = torch.rand(200, 2, generator=gen)
    w = weights.to(torch.bfloat16).float()
    expected = (rows[position[:, 0]].float() * w[:, :1] + rows[position[:, 1]].float() * w[:, 1:])
    assert torch.equal(weighted_rows_sum(rows, position, weights), expected.to(torch.bfloat16))


@pytest.mark.parametrize("fails", [False, True])
def test_a_rank_leaves_the_group_after_a_barrier_only_when_its_work_finished(monkeypatch, fails):
    calls = []
    monkeypatch.setattr(ep_launch.dist, "barrier", lambda: calls.append("barrier"))
    monkeypatch.setattr(ep_launch.dist, "destroy_process_group", lambda: calls.append("destroy"))
    with pytest.raises(ValueError) if fails else contextlib.nullcontext():
        with ep_launch.in_group(lambda: calls.append("cleanup")):
            calls.append("work")
            if fails:
                raise ValueError("a bad setting")
    # After an error a barrier would wait on ranks that may have died: leave at once.
    assert calls == (["work", "cleanup", "destroy"] if fails else ["work", "cleanup", "barrier", "destroy"])
