"""The attention page through AppTest: run-here on CPU, committed GPU results, bad input, URL settings."""

from pathlib import Path

from streamlit.testing.v1 import AppTest

from engine import attention_bench as ab

APP = str(Path(__file__).resolve().parents[1] / "app.py")
PAGE = "app_pages/attention.py"


def _page(query: dict | None = None) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=120)
    at.query_params.update(query or {})
    return at.switch_page(PAGE).run()


def test_default_page_waits_for_the_button_and_shows_why_fa3_is_not_used():
    at = _page()
    assert not at.exception
    assert at.selectbox(key="preset").value == "quick"  # CPU default
    assert "FA3:** not used" in at.info[0].value
    assert not at.dataframe  # nothing is timed until Run is pressed


def test_custom_run_shows_rows_for_every_backend():
    at = _page({"preset": "custom", "S": ["32", "64"], "D": "16", "hidden": "32", "tokens": "128",
                "causal": "off", "dtype": "fp32", "reps": "1", "backends": ["sdpa-math", "sdpa-cudnn"]})
    assert at.multiselect(key="S").value == [32, 64]  # the URL set the widgets
    at.button[0].click().run()
    assert not at.exception and not at.error
    rows = at.dataframe[-1].value
    assert list(zip(rows["seqlen"], rows["backend"], rows["status"])) == [
        (32, "sdpa-math", "ok"), (32, "sdpa-cudnn", "unavailable"),
        (64, "sdpa-math", "ok"), (64, "sdpa-cudnn", "unavailable")]
    assert list(rows["batch"]) == [4, 4, 2, 2] and set(rows["heads"]) == {2}
    ok = rows[rows["status"] == "ok"]
    assert (ok["rel_err"] < 1e-5).all()  # fp32 math against the fp32 reference


def test_bad_custom_shape_is_an_error_message_not_a_crash():
    at = _page({"preset": "custom", "D": "64", "hidden": "96", "S": "32"})
    at.button[0].click().run()
    assert not at.exception
    assert "head_dim must be a multiple of 8 dividing hidden (96), got 64" in at.error[0].value


def test_committed_results_render_from_a_cold_link():
    name, path = next(iter(ab.committed_results().items()))
    at = _page({"src": "Committed GPU results", "file": name})
    assert not at.exception
    expected = ab.load_result(path)
    label = next(i.value for i in at.info if "not on this machine" in i.value)
    assert expected.env["device"] in label and expected.created[:10] in label
    speed, rows = at.dataframe[0].value, at.dataframe[1].value
    assert len(rows) == len(expected.table) == 36 * 6
    assert list(speed["speedup"].round(6)) == list(expected.speedups()["speedup"].round(6))
    fa3 = rows[(rows["backend"] == "fa3") & (rows["seqlen"] == 16384) & (rows["head_dim"] == 128) & ~rows["causal"]]
    want = ab.attention_flops(1, 16, 16384, 16384, 128) / (fa3["ms"].iloc[0] / 1e3) / 1e12
    assert abs(fa3["tflops"].iloc[0] - want) < 1e-6 * want
