"""The scaling page under AppTest: bundled data, the synthetic generator, filters, bad input, URL."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from engine.scaling_data import load_dataset

ROOT = Path(__file__).resolve().parents[1]
PAGE = "app_pages/scaling.py"
# Small uncertainty settings keep each run fast; every other widget keeps its default.
FAST = {"boot": "200", "forms": ["power", "broken"]}


def _page(monkeypatch, **query) -> AppTest:
    monkeypatch.chdir(ROOT)
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=90)
    at.query_params.update({**FAST, **query})
    return at.run().switch_page(PAGE).run()


def _table(at: AppTest, *columns: str):
    """The first dataframe on the page with all `columns`."""
    return next(d.value for d in at.dataframe if set(columns) <= set(d.value.columns))


def _estimate(at: AppTest, quantity: str) -> float:
    t = _table(at, "quantity", "estimate")
    return float(t.loc[t["quantity"] == quantity, "estimate"].iloc[0])


def test_default_page_fits_the_14_training_points_of_the_bnsl_table(monkeypatch):
    at = _page(monkeypatch)
    assert not at.exception and not at.error
    df = load_dataset("bnsl_4digit")
    points = _table(at, "line", "fitted", "train")
    assert points["train"].sum() == 14 and len(points) == 17
    assert points.loc[~points["train"], "x"].tolist() == [800.0, 864.0, 928.0]
    # the knee of 4-digit addition sits between 544 and 608 (the steep drop starts there)
    assert 544 < _estimate(at, "breakpoint") < 608
    forms = _table(at, "form", "holdout_rmsle")
    held = df[df["split"] != "train"]
    a, b = np.polyfit(np.log(df.loc[df["split"] == "train", "training_dataset_size"]),
                      np.log(df.loc[df["split"] == "train", "test_cross_entropy"]), 1)
    pred = a * np.log(held["training_dataset_size"]) + b
    ref = np.sqrt(np.mean((pred - np.log(held["test_cross_entropy"])) ** 2))
    assert forms.set_index("form").loc["power", "holdout_rmsle"] == pytest.approx(ref, rel=1e-9)


def test_noise_free_synthetic_knee_is_recovered_and_the_url_reproduces_it(monkeypatch):
    at = _page(monkeypatch, src="synthetic", noise="0.0", knee="8.5", s1="-0.1", s2="-0.3")
    assert not at.exception and not at.error
    assert _estimate(at, "breakpoint") == pytest.approx(10 ** 8.5, rel=1e-6)
    assert _estimate(at, "slope_after") == pytest.approx(-0.3, abs=1e-9)
    detect = _table(at, "noise", "detection_rate")
    assert detect["detection_rate"].iloc[0] == 1.0  # the lowest noise always finds this knee
    # Large numbers read 3.162e8, never 3.162e+08; the interval is written "a to b".
    metric = next(m for m in at.metric if m.label == "Breakpoint")
    assert metric.value == "3.16e8"
    low, high = _table(at, "quantity", "low").set_index("quantity").loc["breakpoint", ["low", "high"]]
    ci = next(c.value for c in at.caption if " CI " in c.value)
    assert ci.startswith(f"95% CI {float(low):.4g} to {float(high):.4g}".replace("e+0", "e"))


def test_filter_on_the_chinchilla_table_keeps_the_pandas_rows(monkeypatch):
    at = _page(monkeypatch, src="chinchilla", fcol="tokens", frange="1e9,5e9")
    assert not at.exception and not at.error
    df = load_dataset("chinchilla")
    kept = df[(df["tokens"] >= 1e9) & (df["tokens"] <= 5e9)]
    assert _estimate(at, "n train") == len(kept)


def test_bad_filter_shows_an_error_and_keeps_the_last_result(monkeypatch):
    at = _page(monkeypatch)
    before = _estimate(at, "breakpoint")
    at.selectbox(key="fcol").set_value("training_dataset_size")
    at.text_input(key="frange").set_value("lots,").run()
    assert not at.exception
    assert any("filter low bound for 'training_dataset_size' must be a number" in e.value for e in at.error)
    assert _estimate(at, "breakpoint") == before
    at.text_input(key="frange").set_value("500,600").run()  # 5 points: too few for this hold-out
    assert any("at least" in e.value for e in at.error)
    assert _estimate(at, "breakpoint") == before


@pytest.mark.parametrize("query, error", [
    ({"m": "20"}, 'need at least 2 * "Min points per segment" = 40 distinct sizes for two '
                  'segments, got 14'),
    # The bundled table has 17 rows: k may be 4 to 17.
    ({"hold": "first_k", "k": "200"}, '"k" (the k smallest sizes) must be >= 4 and <= 17, got 200'),
])
def test_fit_settings_refused_by_the_data_are_named_by_their_labels(monkeypatch, query, error):
    at = _page(monkeypatch, **query)
    assert not at.exception and [e.value for e in at.error] == [error]


def test_a_filter_range_without_a_filter_column_says_it_is_unused(monkeypatch):
    at = _page(monkeypatch, frange="abc")
    assert not at.exception and not at.error
    assert "The filter range applies once a Filter column is chosen." in [i.value for i in at.info]


def test_column_names_from_the_data_are_not_rendered_as_html_in_the_charts(monkeypatch):
    """Plotly draws <b>, <a href> ... in titles; a column name from an upload must show as text."""
    import json

    import streamlit as st

    import engine.scaling_data as sd

    name = '<a href="https://example.com">size</a>'
    real = sd.load_dataset
    monkeypatch.setattr(sd, "load_dataset",
                        lambda n: real(n).rename(columns={"training_dataset_size": name}))
    st.cache_data.clear()
    try:
        at = _page(monkeypatch)
        assert not at.exception and not at.error
        specs = [json.loads(c.proto.spec) for c in at.get("plotly_chart")]
        titles = [s["layout"]["xaxis"]["title"]["text"] for s in specs if "title" in s["layout"].get("xaxis", {})]
        assert titles and all("<a" not in t and "&lt;a href" in t for t in titles[:2])
    finally:
        st.cache_data.clear()


@pytest.mark.parametrize("query", [{}, {"src": "synthetic"}])
def test_labels_on_log_axes_sit_at_their_lines(monkeypatch, query):
    """On a log x axis plotly places an annotation at log10(x): every label of a log-x figure must
    be where its line or band is drawn (x in data units), inside the plotted x range."""
    at = _page(monkeypatch, **query)
    specs = [json.loads(c.proto.spec) for c in at.get("plotly_chart")]
    checked = 0
    for s in specs:
        lay = s["layout"]
        if lay.get("xaxis", {}).get("type") != "log":
            continue
        xs = [x for t in s["data"] for x in (t.get("x") or []) if isinstance(x, (int, float)) and x > 0]
        edges = [v for sh in lay.get("shapes", []) for v in (sh.get("x0"), sh.get("x1")) if sh.get("xref") == "x"]
        for a in lay.get("annotations", []):
            at_x = 10 ** a["x"]
            assert min(xs + edges) * 0.99 <= at_x <= max(xs + edges) * 1.01, (a["text"], at_x)
            assert any(abs(at_x / e - 1) < 1e-9 for e in edges), (a["text"], at_x, edges)
            # Shifted a few pixels away from the line, on the side the text extends to.
            assert a["xshift"] == (4 if a["xanchor"] == "left" else -4), a["text"]
            checked += 1
    assert checked >= (3 if query else 1)


def test_p_value_at_the_monte_carlo_floor_reads_as_a_bound(monkeypatch):
    """The bundled table's break is far beyond every simulated null: p = 1 / (999 + 1) is a floor."""
    at = _page(monkeypatch)
    shown = next(m.value for m in at.metric if m.label == "sup-F p-value")
    assert shown == "≤ 0.001"


def test_chinchilla_by_model_size_fits_every_row(monkeypatch):
    """Model sizes repeat across compute budgets: offered as x and fitted on all 245 rows."""
    at = _page(monkeypatch, src="chinchilla", x="Model Size")
    assert not at.exception and not at.error
    assert at.selectbox(key="x").value == "Model Size"
    assert _estimate(at, "n train") == 245


def test_the_readme_fit_command_reproduces_the_page_defaults(monkeypatch, capsys):
    """README's `python -m engine fit ...` line: same rows, knee and interval as the default page."""
    import json
    import shlex

    from engine.cli import main

    line = next(s for s in (ROOT / "README.md").read_text().splitlines() if " -m engine fit " in s)
    args = shlex.split(line.split(" -m engine ", 1)[1])
    monkeypatch.chdir(ROOT)
    assert main([*args, "--json", "--n-sim", "19", "--n-boot", "50", "--forms", "power"]) == 0
    doc = json.loads(capsys.readouterr().out)
    cli = {r["quantity"]: r for r in next(v for k, v in doc.items() if k.startswith("two-segment fit"))}
    at = _page(monkeypatch)
    page = _table(at, "quantity", "estimate").set_index("quantity")
    assert doc["model"]["n"] == page.loc["n train", "estimate"] == 14
    assert cli["breakpoint"]["estimate"] == pytest.approx(page.loc["breakpoint", "estimate"], rel=1e-12)
    for col in ("low", "high"):  # columns with gaps ("–") are shown as text, "%g"
        assert f"{cli['breakpoint'][col]:g}" == page.loc["breakpoint", col]


def test_interval_method_is_named_and_switchable(monkeypatch):
    at = _page(monkeypatch)
    assert any("(calibrated)" in c.value for c in at.caption)
    default = _table(at, "quantity", "low").set_index("quantity").loc["breakpoint"]
    at = _page(monkeypatch, ci="bootstrap", cmp="true")
    assert not at.exception and not at.error
    assert any("CI" in c.value and " to " in c.value and "(bootstrap)" in c.value for c in at.caption)
    methods = _table(at, "method", "breakpoint_low").set_index("method")
    assert set(methods.index) == {"calibrated", "profile", "bootstrap", "residual"}
    assert f"{methods.loc['calibrated', 'breakpoint_low']:g}" == default["low"]  # shown "%g"


def test_sizes_near_1e20_read_with_an_exponent_in_every_table(monkeypatch):
    """The grid's printf writes %g below 1e21 without an exponent (Chinchilla's breakpoint read
    102302042342268450000 beside its interval's 3.28506e+19): such columns are sent as text."""
    at = _page(monkeypatch, src="chinchilla")
    summary = _table(at, "quantity", "estimate")
    row = summary[summary["quantity"] == "breakpoint"].iloc[0]
    assert all(re.fullmatch(r"\d\.\d+e\+(19|20)", row[c]) for c in ("estimate", "low", "high")), row
    assert float(row["low"]) < float(row["estimate"]) < float(row["high"])
    points = _table(at, "x", "fitted")
    assert all(re.fullmatch(r"\d(\.\d+)?e\+\d\d", v) for v in points["x"])


def test_a_break_beside_a_smooth_form_that_fits_as_well_says_so(monkeypatch):
    """Chinchilla's break is supported, but BNSL's BIC is 7.8 lower and the saturating form's 0.6
    higher (the forms table): the verdict says a smooth bend fits as well, not only 'supported'."""
    at = _page(monkeypatch, src="chinchilla", forms=["power", "saturating", "broken", "bnsl"])
    forms = _table(at, "form", "bic").set_index("form")["bic"]
    d = {f: forms[f] - forms["broken"] for f in ("saturating", "bnsl")}
    assert not at.success
    (verdict,) = [w.value for w in at.warning if w.value.startswith("A break is supported")]
    assert f"(BIC against the break: bnsl {d['bnsl']:+.1f}; saturating {d['saturating']:+.1f})" in verdict
