"""The expert-parallelism page under AppTest: widgets -> tables, bad input, the dispatch button."""

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

import engine.ep_dispatch as ep
from engine.ep_launch import LaunchError
from engine.expert_parallel import EPSettings, rank_batch

ROOT = Path(__file__).resolve().parents[1]
PAGE = "app_pages/expert_parallel.py"


def _page(chdir) -> AppTest:
    chdir(ROOT)
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60)
    # Small, fast settings through the URL; every other widget keeps its default.
    at.query_params.update({"tokens": "256", "d": "64"})
    return at.run().switch_page(PAGE).run()


def _table_with(at: AppTest, *columns: str):
    """The first dataframe on the page that has all `columns`."""
    return next(d.value for d in at.dataframe if set(columns) <= set(d.value.columns))


@pytest.fixture
def at(monkeypatch):
    return _page(monkeypatch.chdir)


def test_round_robin_on_two_ranks_fills_the_table(at):
    at.number_input(key="experts").set_value(4)
    at.number_input(key="ranks").set_value(2)
    at.radio(key="place").set_value("round_robin")
    at.run()
    assert not at.exception and not at.error
    table = at.dataframe[0].value
    assert table["experts"].tolist() == ["0 2", "1 3"]
    s = EPSettings(experts=4, ranks=2, tokens=256, d_model=64)
    pairs = sum(int((rank_batch(s, r)[1] >= 0).sum()) for r in range(2))
    assert table["load_pairs"].sum() == pairs
    # Round robin: odd experts live on rank 1. bf16 rows of 64 values are 128 bytes.
    e0 = rank_batch(s, 0)[1]
    to_rank1 = int(((e0 >= 0) & (e0 % 2 == 1)).sum())
    assert table["sent_off_rank_MB"][0] == pytest.approx(to_rank1 * 128 / 1e6)
    sweep = _table_with(at, "hot_share")
    assert set(sweep["placement"]) == {"contiguous", "round_robin", "greedy"}
    assert len(sweep) == 11 * 3
    assert set(sweep["tokens_per_rank"]) == {256}  # 2 ranks x 256 is under the sweep's cap
    ratio = sweep["max_load"] / sweep["mean_load"]
    assert sweep["slowest_vs_mean"].tolist() == pytest.approx(ratio.tolist())


def test_more_ranks_than_experts_shows_the_error_and_keeps_the_last_result(at):
    at.number_input(key="experts").set_value(4)
    at.number_input(key="ranks").set_value(2)
    at.run()
    at.number_input(key="ranks").set_value(8)
    at.run()
    assert not at.exception
    assert any("ranks must be <= experts" in e.value for e in at.error)
    assert len(at.dataframe[0].value) == 2  # the last good table (2 ranks) is still shown


def test_query_params_reproduce_the_settings(monkeypatch):
    monkeypatch.chdir(ROOT)
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60)
    at.query_params.update({"experts": "6", "ranks": "3", "place": "contiguous", "tokens": "256",
                            "d": "64"})
    at.run().switch_page(PAGE).run()
    assert not at.exception
    assert at.dataframe[0].value["experts"].tolist() == ["0 1", "2 3", "4 5"]


def test_dispatch_button_shows_the_measured_tables(at, monkeypatch):
    calls = []

    def fake_launch(settings, processes, timeout_s):
        calls.append((settings, processes))
        rows = [{"rank": r, "tokens": settings.tokens, "pairs_sent": [1, 1], "layer_ms": 2.0 + r,
                 "plain_ms": 1.0, "max_abs_err": 0.0} for r in range(processes)]
        return {"world": processes, "backend": "gloo", "device": "CPU (test)", "date": "d",
                "torch": "t", "settings": {}, "per_rank": rows,
                "summary": [{"tokens": settings.tokens, "layer_ms": 3.0, "plain_ms": 1.0,
                             "ratio": 1 / 3, "max_abs_err": 0.0}]}

    monkeypatch.setattr(ep, "launch", fake_launch)
    at.number_input(key="procs").set_value(3)
    at.button(key="run_dispatch").click().run()
    assert not at.exception
    assert calls[0][1] == 3 and calls[0][0].tokens == 256
    per_rank = _table_with(at, "layer_ms", "rank")
    assert per_rank["layer_ms"].tolist() == [2.0, 3.0, 4.0]


def test_a_failed_launch_shows_the_workers_output(at, monkeypatch):
    def failing(settings, processes, timeout_s):
        raise LaunchError("dispatch failed (torchrun exit 1):\nrank 1 exited with code 3")

    monkeypatch.setattr(ep, "launch", failing)
    at.button(key="run_dispatch").click().run()
    assert not at.exception
    assert any("dispatch failed" in c.value for c in at.code)


def test_committed_results_show_the_phase_ratios(at, monkeypatch):
    rows = [{"tokens": 64, "chunks": 1, "dispatch_ms": 2.0 + r, "plain_dispatch_ms": 1.5,
             "combine_ms": 4.0, "plain_combine_ms": 1.0, "layer_ms": 8.0, "plain_layer_ms": 2.0,
             "max_abs_err": 0.0} for r in range(2)]
    doc = {"device": "NVIDIA Test", "world": 2, "backend": "nccl", "date": "2026-11-26",
           "torch": "t", "summary": [ep.median_round([ep.summarize(rows)])]}
    monkeypatch.setattr(ep, "committed_results", lambda: [doc])
    at.run()
    assert not at.exception
    table = _table_with(at, "dispatch_ratio", "combine_ratio", "layer_ratio")
    # Slowest rank: dispatch 3 ms against 1.5 ms plain, combine 4 against 1, layer 8 against 2.
    assert table.loc[0, ["dispatch_ratio", "combine_ratio", "layer_ratio"]].tolist() == \
        pytest.approx([0.5, 0.25, 0.25])
    # The configuration (with the GPU work queued before each call and the share of calls
    # replayed from graphs), then the rounds' dispatch ratios beside the reported one.
    assert list(table.columns[:6]) == ["tokens", "chunks", "lead_ms", "graph_share",
                                       "dispatch_ratio", "dispatch_ratio_rounds"]
