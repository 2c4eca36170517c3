"""The attention page through AppTest: committed H200 results first on a CPU, run-here one click
away, estimates and refusals, the training-step view, bad input, URL settings."""

from pathlib import Path

from streamlit.testing.v1 import AppTest

from engine import attention_bench as ab
from engine.attention_train import ModelShape, training_view

APP = str(Path(__file__).resolve().parents[1] / "app.py")
PAGE = "app_pages/attention.py"


def _page(query: dict | None = None) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=120)
    at.query_params.update(query or {})
    return at.switch_page(PAGE).run()


def _texts(at: AppTest) -> list[str]:
    return [e.value for kind in ("info", "caption", "markdown", "warning", "success") for e in getattr(at, kind)]


def test_cpu_machine_opens_on_the_committed_h200_results():
    at = _page()
    assert not at.exception
    assert at.radio(key="src").value == "Committed GPU results"
    assert at.selectbox(key="file").value == "H200, 2026-12-03: FA3-paper shapes, forward + backward"
    assert any("Measured on an NVIDIA H200, 2026-12-03, not on this machine" in t for t in _texts(at))
    assert not any("lent" in t.lower().split() for t in _texts(at))
    assert any("not used: " in i.value and "**FA4:**" in i.value for i in at.info)  # why FA4/FA3 are not used here
    # The training-step view at its defaults equals the engine's view of the committed rows.
    train = ab.load_result(ab.committed_results()["attention_sweep_h200_2026-12-03_paper-train"])
    expected = training_view(train.table, ModelShape())
    assert at.metric[0].label == f"Fastest: {expected['backend'][0]}"
    assert at.metric[0].value == f"{expected['ms_per_step'][0]:.1f} ms per step"


def test_run_here_is_one_click_away_and_waits_for_the_button():
    at = _page()
    at.radio(key="src").set_value("Run here").run()
    assert not at.exception and at.selectbox(key="preset").value == "quick"
    assert any(c.value.startswith("Estimated ") for c in at.caption)
    assert not at.dataframe  # nothing is timed until Run is pressed


def test_custom_run_shows_rows_for_every_backend():
    at = _page({"src": "Run here", "preset": "custom", "S": ["32", "64"], "D": "16", "hidden": "32",
                "tokens": "128", "causal": "off", "dtype": "fp32"})
    at.multiselect(key="backends").set_value(["sdpa-math", "sdpa-cudnn"]).run()
    assert at.multiselect(key="S").value == [32, 64]  # the URL set the widgets
    at.button[0].click().run()
    assert not at.exception and not at.error
    rows = at.dataframe[-1].value
    assert list(zip(rows["seqlen"], rows["backend"], rows["status"])) == [
        (32, "sdpa-math", "ok"), (32, "sdpa-cudnn", "unavailable"),
        (64, "sdpa-math", "ok"), (64, "sdpa-cudnn", "unavailable")]
    assert list(rows["batch"]) == [4, 4, 2, 2] and set(rows["heads"]) == {2}
    ok = rows[rows["status"] == "ok"]
    # fp32 math against the fp32 reference; rows that did not run show "–" there (text column).
    assert (ok["rel err vs fp32"].astype(float) < 1e-5).all()
    assert set(rows.loc[rows["status"] != "ok", "rel err vs fp32"]) == {"–"}
    assert any("Measured on this machine" in c.value for c in at.caption)


def test_gpu_sized_preset_on_a_cpu_is_refused_with_its_estimate_and_offered_smaller():
    at = _page({"src": "Run here", "preset": "fa3-paper"})
    assert not at.exception
    warning = at.warning[0].value
    assert "would take about" in warning and "on this CPU" in warning and "reduced size" in warning
    run = next(b for b in at.button if b.label == "Run sweep")
    assert run.disabled
    assert any(b.label.startswith("Run at reduced size (about ") for b in at.button)


def test_bad_custom_shape_is_an_error_message_not_a_crash():
    at = _page({"src": "Run here", "preset": "custom", "D": "64", "hidden": "96", "S": "32"})
    assert not at.exception
    assert "head_dim must be a multiple of 8 dividing hidden (96), got 64" in at.error[0].value


def test_committed_results_render_from_a_cold_link():
    name = "attention_sweep_h200_2026-12-03_paper-fwd"
    at = _page({"src": "Committed GPU results", "file": "H200, 2026-12-03: FA3-paper shapes, forward"})
    assert not at.exception
    expected = ab.load_result(ab.committed_results()[name])
    speed_fa4, speed_fa3, rows = at.dataframe[0].value, at.dataframe[1].value, at.dataframe[2].value
    assert len(rows) == len(expected.table) == 36 * 7
    assert list(speed_fa4["speedup"].round(6)) == list(expected.speedups("fa4")["speedup"].round(6))
    assert list(speed_fa3["speedup"].round(6)) == list(expected.speedups("fa3")["speedup"].round(6))
    fa4 = rows[(rows["backend"] == "fa4") & (rows["seqlen"] == 16384) & (rows["head_dim"] == 128) & rows["causal"]]
    # FA3 did not run on this card: its rows read "–", so the timing columns are shown as text in
    # their formats (ms "%.4f", TFLOP/s "%.1f"): agree to the digits shown.
    assert set(rows.loc[rows["status"] != "ok", "ms"]) == {"–"}
    ms, tflops = float(fa4["ms"].iloc[0]), float(fa4["tflops"].iloc[0])
    want = ab.attention_flops(1, 16, 16384, 16384, 128, causal=True) / (ms / 1e3) / 1e12
    assert abs(tflops - want) <= 0.05 + want * 0.5e-4 / ms
    assert any(c.value.startswith("Timer cross-check: ") for c in at.caption)


def test_a_new_preset_brings_its_backends_and_a_link_keeps_chosen_ones():
    at = _page({"src": "Run here", "backends": ["fa3", "sdpa-math"]})
    assert at.multiselect(key="backends").value == ["fa3", "sdpa-math"]  # from the URL
    at.selectbox(key="preset").set_value("masks").run()
    assert at.multiselect(key="backends").value == list(ab.PRESETS["masks"].backends)
