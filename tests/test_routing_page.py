"""The routing page (AppTest) and `python -m engine route`: settings from the URL, tables that hold
what the engine computes, bad input shown while the last result stays."""

import base64
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from streamlit.testing.v1 import AppTest

from engine import workloads as wl
from engine.cli import main
from engine.moe_router import HashRouter, SwitchRouter, load_balance_std
from engine.routing_lab import LIMITS, PRESETS, LabSettings, run_lab

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"T": "4096", "E": "16", "routers": ["hash", "topk", "deepseek"], "steps": "5"}


def _page(query: dict) -> AppTest:
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120)
    at.switch_page("app_pages/routing.py")
    at.query_params.update(query)
    return at.run()


def _metrics(at: AppTest) -> pd.DataFrame:
    # The metrics, shown in two tables that share the router column.
    return pd.concat([at.dataframe[i].value.set_index("router") for i in (0, 1)], axis=1)


def test_cold_link_reproduces_the_engine_tables():
    at = _page(SMALL)
    assert not at.exception and not at.error
    assert at.number_input(key="T").value == 4096 and at.number_input(key="E").value == 16
    shown = _metrics(at)
    want = run_lab(LabSettings(num_tokens=4096, num_experts=16, routers=("hash", "topk", "deepseek"),
                               deepseek_steps=5)).metrics.set_index("router")
    assert list(shown.index) == ["Hash", "Top-k softmax", "DeepSeek-V3 bias"]
    # A column with gaps (no aux loss for hash) is shown as text, "%.4f", with "–" for the gap.
    gaps = [c for c in want.columns if want[c].isna().any()]
    assert gaps == ["aux loss"] and shown.loc["Hash", "aux loss"] == "–"
    for col in gaps:
        want[col] = ["–" if pd.isna(v) else f"{v:.4f}" for v in want[col]]
        shown[col], want[col] = shown[col].astype(object), want[col].astype(object)
    assert sorted(shown.columns) == sorted(want.columns)  # every column, in one of the two tables
    pd.testing.assert_frame_equal(shown[want.columns], want)
    # The hash row is the seed API on the same Zipf ids; each row carries its own null: k = 2
    # independent hash slots sqrt((E-1)/(kT)), k = 2 distinct experts sqrt((E-k)/(kT)).
    ids = wl.token_ids("zipf", 4096, 32_000, 1.0, seed=0)
    assert shown.loc["Hash", "CV"] == pytest.approx(load_balance_std(HashRouter(16, 2, 0)(ids)))
    assert shown.loc["Hash", "null CV"] == pytest.approx(math.sqrt(15 / (2 * 4096)))
    assert shown.loc["Top-k softmax", "null CV"] == pytest.approx(math.sqrt(14 / (2 * 4096)))
    assert len(at.get("plotly_chart")) == 3  # histogram, per-rank load, DeepSeek balance


def _values(v) -> list[float]:
    """A plotly array from a figure's JSON: a list, or plotly's typed array {dtype, bdata (base64)}."""
    if isinstance(v, dict):
        return np.frombuffer(base64.b64decode(v["bdata"]), dtype=v["dtype"]).astype(float).tolist()
    return [float(x) for x in v]


def test_histogram_is_in_capacity_units_so_capped_routers_top_out_at_c():
    """tokens / (k T / E) with each router's k: Switch (k 1) and GShard (k 2) keep at most
    ceil(C k T / E) tokens per expert, so their highest point is that over k T / E; Expert Choice
    fills every expert to it; routers that drop nothing average exactly 1."""
    t, e, c = 4096, 16, 1.25
    at = _page({"T": str(t), "E": str(e), "C": str(c), "routers": ["topk", "switch", "gshard", "expert_choice"]})
    assert not at.exception and not at.error
    spec = json.loads(at.get("plotly_chart")[0].proto.spec)
    # The two reference lines are named in the legend, not by labels over the curves.
    *routers, even, cap = spec["data"]
    assert (even["name"], cap["name"]) == ("k T / E: every slot routed, evenly", "capacity C = 1.25")
    assert even["y"] == cap["y"] == [None] and not spec["layout"].get("annotations")
    assert sorted(s["y0"] for s in spec["layout"]["shapes"]) == [1.0, c]
    ys = {tr["name"]: _values(tr["y"]) for tr in routers}
    for name, k in (("Switch top-1", 1), ("GShard top-2", 2)):
        assert max(ys[name]) == pytest.approx(math.ceil(c * k * t / e) / (k * t / e), abs=1e-4)
    assert all(y == pytest.approx(math.ceil(c * 2 * t / e) / (2 * t / e), abs=1e-4) for y in ys["Expert Choice"])
    assert sum(ys["Top-k softmax"]) / e == pytest.approx(1.0, abs=1e-3)
    assert spec["layout"]["yaxis"]["title"]["text"] == "tokens / (k T / E)"


def test_bad_input_shows_the_error_and_keeps_the_last_result():
    at = _page(SMALL)
    before = _metrics(at)
    # Inside every widget's range, refused by the engine with the field named as on the page.
    at.number_input(key="groups").set_value(3).run()
    assert not at.exception
    assert at.error[0].value == "Expert groups must divide the 16 experts into groups of 2 or more, got 3"
    pd.testing.assert_frame_equal(_metrics(at), before)
    at.number_input(key="groups").set_value(1)
    at.number_input(key="T").set_value(1 << 22)
    at.number_input(key="E").set_value(1024).run()
    assert "these settings would need about" in at.error[0].value
    pd.testing.assert_frame_equal(_metrics(at), before)


def test_only_skipped_routers_show_why_and_the_page_stays_up():
    # The balanced hash table needs token ids; on hidden states it is skipped, and with it alone
    # there is no table to show (the page raised KeyError 'router').
    at = _page({"wl": "gaussian", "routers": ["balanced_hash"], "T": "2048"})
    assert not at.exception and not at.error
    assert [i.value for i in at.info] == ["Hash (balanced table) needs token ids: skipped for "
                                          "hidden states."]
    assert not at.dataframe


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
    assert rows["Hash"]["null CV"] == pytest.approx(math.sqrt(7 / 6000))
    assert rows["Switch top-1"]["null CV"] == pytest.approx(math.sqrt(7 / 3000))
    assert doc["settings"]["capacity_slots"] == math.ceil(2 * 3000 / 8)
    counts = [r["tokens"] for r in doc["tokens per expert"] if r["router"] == "Hash"]
    assert sum(counts) == rows["Hash"]["slots routed"]


def test_cli_text_shows_the_notes_the_page_shows(capsys):
    """GShard's note on what its capacity dropped reaches the text output, as on the page."""
    argv = ["route", "--tokens", "4096", "--experts", "16", "--routers", "hash,gshard"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert main(argv + ["--json"]) == 0
    notes = json.loads(capsys.readouterr().out)["notes"]
    assert len(notes) == 1 and notes[0].startswith("GShard top-2: ")
    assert f"== notes\n{notes[0]}\n" in text


def test_cli_bad_input_exits_2_with_the_argument_named(capsys):
    assert main(["route", "--k", "0"]) == 2
    assert "error: --k must be >= 1" in capsys.readouterr().err
    assert main(["route", "--experts", "1"]) == 2
    assert "error: --experts must be >= 2 and <= 1024, got 1" in capsys.readouterr().err
    assert main(["route", "--routers", "hash,magic"]) == 2
    assert "--routers must be one of" in capsys.readouterr().err
    assert torch.get_default_dtype() == torch.float32


def test_page_inputs_allow_exactly_what_the_engine_accepts():
    at = _page(SMALL)
    for key, name in {"T": "num_tokens", "E": "num_experts", "k": "top_k", "R": "num_ranks",
                      "V": "vocab_size", "C": "capacity_factor", "seed": "seed",
                      "groups": "n_groups", "tgroups": "topk_groups",
                      "scale": "route_scale"}.items():
        widget = at.number_input(key=key)
        assert (widget.min, widget.max) == LIMITS[name], key
    for name in ("capacity_factor", "seed", "num_tokens"):  # both bounds pass the engine's check
        for bound in LIMITS[name]:
            LabSettings(**{name: bound}, routers=("hash",)).validate()
    # A hash-only run at the page's largest T allocates no router scores and is accepted.
    LabSettings(num_tokens=LIMITS["num_tokens"][1], routers=("hash", "balanced_hash")).validate()
    LabSettings(num_tokens=4_000_000, routers=("hash",)).validate()


def test_deepseek_v3_preset_button_sets_v3_settings():
    at = _page({**SMALL, "routers": ["topk", "deepseek"], "T": "2048"})
    at.button[0].click().run()
    assert not at.exception and not at.error
    v3 = PRESETS["DeepSeek-V3"]
    assert at.number_input(key="E").value == v3["num_experts"] == 256
    assert at.number_input(key="k").value == v3["top_k"] == 8
    assert (at.number_input(key="groups").value, at.number_input(key="tgroups").value,
            at.number_input(key="scale").value) == (8, 4, 2.5)
    shown = _metrics(at)
    assert shown.loc["DeepSeek-V3 bias", "k"] == 8
    assert shown.loc["DeepSeek-V3 bias", "slots routed"] == 8 * 2048


def test_a_link_with_no_routers_says_so_once():
    """`routers=` is the page with every router removed: the one error says what is needed; the
    link notice does not also claim the value could not be used (it was)."""
    at = _page({"routers": [""], "T": "4096"})
    assert not at.exception and at.multiselect(key="routers").value == []
    assert [e.value for e in at.error] == [
        "Routers must name at least one of hash, balanced_hash, topk, switch, gshard, "
        "expert_choice, deepseek"]
    assert not at.warning


def test_experts_below_the_ranks_place_one_expert_per_rank_and_say_so():
    """E = 4 under the default R = 8 (a natural step in a demo) is not an error: the per-rank load
    uses R = E, and a note says so."""
    at = _page({**SMALL, "E": "4"})
    assert not at.exception and not at.error
    assert at.number_input(key="R").value == 8
    assert [i.value for i in at.info if "Ranks R" in i.value] == [
        "Ranks R = 8 is more than Experts E = 4: the per-rank load uses R = 4, one expert per rank."]
    assert "Per-rank load (R = 4)" in [h.value for h in at.subheader]
