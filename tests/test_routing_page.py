"""The routing page (AppTest) and `python -m engine route`: settings from the URL, tables that hold
what the engine computes, bad input shown while the last result stays."""

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch
from streamlit.testing.v1 import AppTest

from engine import workloads as wl
from engine.cli import main
from engine.moe_router import HashRouter, SwitchRouter, load_balance_std
from engine.routing_lab import NULL_LABEL, LabSettings, run_lab

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"T": "4096", "E": "16", "routers": ["hash", "topk", "deepseek"], "steps": "5"}


def _page(query: dict) -> AppTest:
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120)
    at.switch_page("app_pages/routing.py")
    at.query_params.update(query)
    return at.run()


def _metrics(at: AppTest) -> pd.DataFrame:
    return at.dataframe[0].value.set_index("router")


def test_cold_link_reproduces_the_engine_tables():
    at = _page(SMALL)
    assert not at.exception and not at.error
    assert at.number_input(key="T").value == 4096 and at.number_input(key="E").value == 16
    shown = _metrics(at)
    want = run_lab(LabSettings(num_tokens=4096, num_experts=16, routers=("hash", "topk", "deepseek"),
                               deepseek_steps=5)).metrics.set_index("router")
    assert list(shown.index) == ["Hash", "Top-k softmax", "DeepSeek-V3 bias", NULL_LABEL]
    pd.testing.assert_frame_equal(shown, want)
    # The hash row is the seed API on the same Zipf ids; the null row is sqrt((E-1)/(kT)).
    ids = wl.token_ids("zipf", 4096, 32_000, 1.0, seed=0)
    assert shown.loc["Hash", "CV"] == pytest.approx(load_balance_std(HashRouter(16, 2, 0)(ids)))
    assert shown.loc[NULL_LABEL, "CV"] == pytest.approx(math.sqrt(15 / (2 * 4096)))
    assert len(at.get("plotly_chart")) == 3  # histogram, per-rank load, DeepSeek balance


def test_bad_input_shows_the_error_and_keeps_the_last_result():
    at = _page(SMALL)
    before = _metrics(at)
    at.number_input(key="C").set_value(0.0).run()
    assert not at.exception
    assert "capacity_factor must be > 0" in at.error[0].value
    pd.testing.assert_frame_equal(_metrics(at), before)
    at.number_input(key="C").set_value(1.25)
    at.number_input(key="T").set_value(1 << 22)
    at.number_input(key="E").set_value(1024).run()
    assert "these settings would need about" in at.error[0].value
    pd.testing.assert_frame_equal(_metrics(at), before)


def test_cli_json_matches_an_independent_recomputation(capsys):
    argv = ["route", "--tokens", "3000", "--experts", "8", "--routers", "hash,switch",
            "--workload", "uniform", "--vocab", "500", "--capacity-factor", "1.0", "--json"]
    assert main(argv) == 0
    doc = json.loads(capsys.readouterr().out)
    rows = {r["router"]: r for r in doc["metrics"]}
    ids = wl.token_ids("uniform", 3000, 500, seed=0)
    assert rows["Hash"]["CV"] == pytest.approx(load_balance_std(HashRouter(8, 2, 0)(ids)))
    switch = SwitchRouter(8, 1, 64, 0, capacity_factor=1.0)(wl.embed(ids, 500, 64, seed=0))
    assert rows["Switch top-1"]["tokens unrouted"] == pytest.approx(
        float((switch.experts[:, 0] < 0).double().mean()))
    assert rows[NULL_LABEL]["CV"] == pytest.approx(math.sqrt(7 / 6000))
    assert doc["settings"]["capacity_slots"] == math.ceil(2 * 3000 / 8)
    counts = [r["tokens"] for r in doc["tokens per expert"] if r["router"] == "Hash"]
    assert sum(counts) == rows["Hash"]["slots routed"]


def test_cli_bad_input_exits_2_with_the_argument_named(capsys):
    assert main(["route", "--k", "0"]) == 2
    assert "top_k must be >= 1" in capsys.readouterr().err
    assert main(["route", "--routers", "hash,magic"]) == 2
    assert "routers must be one of" in capsys.readouterr().err
    assert torch.get_default_dtype() == torch.float32
