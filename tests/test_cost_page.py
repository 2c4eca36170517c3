"""The cost page in AppTest: presets, bad fields beside the field, URL settings, timing button."""

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from engine.cost_model import PRESETS, PUBLISHED, estimate

APP = str(Path(__file__).resolve().parents[1] / "app.py")


def _page(**query):
    at = AppTest.from_file(APP, default_timeout=60)
    for k, v in query.items():
        at.query_params[k] = v
    return at.switch_page("app_pages/cost.py").run()


def _params_total(at):
    table = at.dataframe[0].value
    return int(table["total"].sum()), int(table["active"].sum())


def test_default_page_shows_mixtral_parameters():
    at = _page()
    assert not at.exception
    total, active = _params_total(at)
    assert total == pytest.approx(PUBLISHED["Mixtral 8x7B"][0], rel=0.01)
    assert active == pytest.approx(PUBLISHED["Mixtral 8x7B"][1], rel=0.01)
    flops = at.dataframe[1].value.set_index("row")["FLOPs per token"]
    assert flops["training (3 x forward)"] == 3 * flops["forward total"]
    assert flops["6N (N = active params)"] == 6 * active


def test_preset_switch_loads_all_fields():
    at = _page()
    at.selectbox(key="preset").select("Llama-2-7B").run()
    assert not at.exception
    assert at.number_input(key="kv").value == 32 and at.number_input(key="experts").value == 0
    assert _params_total(at)[0] == pytest.approx(6.74e9, rel=0.01)


def test_bad_field_error_beside_field_keeps_last_result():
    at = _page()
    before = _params_total(at)
    at.number_input(key="heads").set_value(7).run()
    assert not at.exception
    assert any("n_heads must divide d_model (4096)" in e.value for e in at.error)
    assert _params_total(at) == before  # last good result stays


def test_cold_link_with_query_params_reproduces_figures():
    at = _page(preset="Mixtral 8x7B", experts="16", k="1", layers="4")
    assert not at.exception
    cfg = PRESETS["Mixtral 8x7B"].replace(num_experts=16, top_k=1, n_layers=4)
    assert _params_total(at) == (estimate(cfg).total_params, estimate(cfg).active_params)


def test_timing_button_runs_blocks_at_small_size():
    at = _page(layers="1")
    at.number_input(key="bd").set_value(16)
    at.number_input(key="bt").set_value(64)
    at.number_input(key="reps").set_value(1)
    at.button[0].click().run()
    assert not at.exception
    timing = at.dataframe[-1].value.set_index("block")
    assert list(timing.index) == ["dense", "moe-hash", "moe-learned"]
    # Mixtral's d_ff/d_model = 3.5 -> expert d_ff 56 at d_model 16; dense width k x 56 = 112.
    assert timing.loc["dense", "d_ff"] == 112 and timing.loc["moe-learned", "d_ff"] == 56
    assert timing.loc["moe-learned", "flop_ratio"] == pytest.approx((2 * 3 * 2 * 16 * 56 + 2 * 16 * 8)
                                                                     / (2 * 3 * 16 * 112))


def test_cold_link_with_only_a_preset_loads_that_preset():
    at = _page(preset="Switch-Base-128")
    assert not at.exception
    assert at.number_input(key="experts").value == 128 and at.checkbox(key="tied").value
    assert _params_total(at)[0] == pytest.approx(7.4e9, rel=0.01)
