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


def _table(at, column):
    return next(d.value for d in at.dataframe if column in d.value.columns)


def _params_total(at):
    table = _table(at, "active")
    return int(table["total"].sum()), int(table["active"].sum())


def test_default_page_shows_mixtral_parameters():
    at = _page()
    assert not at.exception
    total, active = _params_total(at)
    assert total == pytest.approx(PUBLISHED["Mixtral 8x7B"][0], rel=0.01)
    assert active == pytest.approx(PUBLISHED["Mixtral 8x7B"][1], rel=0.01)
    flops = _table(at, "FLOPs per token").set_index("row")["FLOPs per token"]
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
    # Once, in the words on the page (labels, not engine names).
    assert [e.value for e in at.error] == ['"heads" must divide "d_model" (4096), got 7']
    assert _params_total(at) == before  # last good result stays


def test_cold_link_with_query_params_reproduces_figures():
    at = _page(preset="Mixtral 8x7B", experts="16", k="1", layers="4")
    assert not at.exception
    cfg = PRESETS["Mixtral 8x7B"].replace(num_experts=16, top_k=1, n_layers=4)
    assert _params_total(at) == (estimate(cfg).total_params, estimate(cfg).active_params)


def test_experts_0_is_the_dense_model_whatever_k_and_ranks_were():
    """E = 0 is a dense model whatever k was, not an error: k and R are greyed at 1 (the engine,
    given both, refuses k = 2 for a dense model); setting E again brings back the k typed."""
    at = _page()
    at.number_input(key="k").set_value(4).run()
    at.number_input(key="experts").set_value(0).run()
    assert not at.exception and not at.error
    cfg = PRESETS["Mixtral 8x7B"].replace(num_experts=0, top_k=1)
    total = estimate(cfg).total_params
    assert _params_total(at) == (total, total)
    fixed = {w.key: (w.value, w.disabled) for w in at.number_input if w.key in ("k_dense", "ep_dense")}
    assert fixed == {"k_dense": (1, True), "ep_dense": (1, True)}
    at.number_input(key="experts").set_value(8).run()
    assert not at.error and at.number_input(key="k").value == 4
    top4 = estimate(PRESETS["Mixtral 8x7B"].replace(top_k=4))
    assert _params_total(at) == (top4.total_params, top4.active_params)


def test_timing_button_runs_blocks_at_small_size():
    at = _page(layers="1")
    at.number_input(key="bd").set_value(16)
    at.number_input(key="bt").set_value(64)
    at.number_input(key="reps").set_value(1)
    at.button(key="runtiming").click().run()
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


def test_will_it_fit_defaults_advice_and_time_to_train():
    from engine.cost_memory import TrainLayout, memory_per_gpu
    from engine.cost_time import time_to_train

    at = _page()
    cfg = PRESETS["Mixtral 8x7B"]
    # The default fits an H200: ZeRO-1 and full checkpointing, as a 64-GPU run would use them.
    need = sum(memory_per_gpu(cfg, TrainLayout(gpus=64, ep=8, zero=1, checkpointing=True)).values())
    assert need <= 141e9 and not at.warning
    assert at.success[0].value.startswith(f"Fits: {need / 1e9:.1f} GB of 141 GB per GPU")
    line = next(m.value for m in at.markdown if m.value.startswith("Time to train"))
    t = time_to_train(3 * estimate(cfg).forward_flops * 1e12, 64, 989e12, 0.4, 2.5)
    assert f"{t.days:,.1f} days" in line and f"\\${t.cost:,.0f}" in line  # \$: a dollar in Markdown
    at.checkbox(key="ckpt").uncheck().run()
    need = sum(memory_per_gpu(cfg, TrainLayout(gpus=64, ep=8, zero=1)).values())
    warning = at.warning[0].value
    assert warning.startswith(f"Does not fit: {need / 1e9:.1f} GB needed, 141 GB per GPU")
    assert "turn on full activation checkpointing" in warning and "(fits)" in warning
    # On an 80 GB GPU from ZeRO 0 no single change fits: the page says which changes fit together.
    at.number_input(key="zero").set_value(0)
    at.selectbox(key="gpu").set_value("H100 80 GB").run()
    both = sum(memory_per_gpu(cfg, TrainLayout(gpus=64, ep=8, zero=1, checkpointing=True)).values())
    assert (f"together, full activation checkpointing, ZeRO stage 1: {both / 1e9:.1f} GB per GPU "
            "(fits)") in at.warning[0].value


@pytest.mark.parametrize("key, value, message", [
    ("gpus", 6, '"GPUs N" must be a multiple of "Ranks R (expert-parallel)" (8), got 6'),
    ("mfu", 1.5, '"MFU" must be <= 1.0, got 1.5'),
    ("zero", 5, '"ZeRO stage" must be >= 0 and <= 3, got 5'),
    ("mb", 0, '"micro-batch (sequences)" must be >= 1'),
])
def test_bad_layout_input_shows_one_message_naming_the_field(key, value, message):
    at = _page()
    at.number_input(key=key).set_value(value).run()
    assert not at.exception
    assert len(at.error) == 1 and at.error[0].value.startswith(message)
    at.number_input(key=key).set_value({"gpus": 64, "mfu": 0.4, "zero": 1, "mb": 1}[key]).run()
    assert not at.error


def test_a_cold_link_with_a_bad_mfu_refuses_only_the_time_to_train():
    at = _page(mfu="7")
    assert not at.exception
    assert [e.value for e in at.error] == ['"MFU" must be <= 1.0, got 7.0']
    assert _params_total(at) == _params_total(_page())  # the figures MFU does not change stay
    assert at.success and not any(m.value.startswith("Time to train") for m in at.markdown)


def test_a_refused_time_keeps_its_own_gpu_and_a_refused_layout_shows_one_error():
    at = _page()
    line = next(m.value for m in at.markdown if m.value.startswith("Time to train"))
    assert "64 x H200 141 GB at MFU 40% (typed)" in line
    at.number_input(key="gpus").set_value(0).run()  # refused by the layout: one error, not two
    assert len(at.error) == 1 and at.error[0].value.startswith('"GPUs N" must be >= 1')
    assert next(m.value for m in at.markdown if m.value.startswith("Time to train")) == line
    at.number_input(key="gpus").set_value(64)
    at.number_input(key="mfu").set_value(7.0).run()
    at.selectbox(key="gpu").set_value("H100 80 GB").run()  # the memory follows; the time is the last good
    assert [e.value for e in at.error] == ['"MFU" must be <= 1.0, got 7.0']
    assert "Showing the last valid result." in [c.value for c in at.caption]
    assert at.success[0].value.endswith("of 80 GB per GPU.")
    assert next(m.value for m in at.markdown if m.value.startswith("Time to train")) == line


@pytest.mark.slow
def test_measure_button_runs_a_scaled_step_on_this_cpu():
    at = _page(layers="2")
    at.button(key="measure").click().run(timeout=180)
    assert not at.exception and not at.error
    labels = [m.label for m in at.metric]
    assert "Peak memory, measured" in labels and "Step time, measured" in labels
    assert next(m.value for m in at.metric if m.label == "Step time error") == "n/a"  # first run


def test_committed_h200_comparison_is_shown_without_none():
    at = _page()
    table = _table(at, "verdict")
    assert len(table) == 7 and (table["verdict"] == "within").sum() >= 4
    assert "None" not in table.astype(str).to_numpy().ravel().tolist()
    assert any("MFU" in c.value and "H200" in c.value for c in at.caption)


def test_kv_tokens_take_the_engine_range_and_a_bad_link_value_is_named():
    """0 (off) to the engine's MAX_KV_TOKENS; `kvtok=-5` read "must be >= 1", though 0 is valid."""
    from engine.cost_memory import MAX_KV_TOKENS

    at = _page(kvtok="-5")
    kv = at.number_input(key="kvtok")
    assert (kv.min, kv.max, kv.value) == (0, MAX_KV_TOKENS, 0)
    assert not at.error
    assert [w.value for w in at.warning] == [
        "Some settings in the link could not be used: `kvtok=-5` (using `0`)."]
