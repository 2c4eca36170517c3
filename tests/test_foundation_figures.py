"""The shared figure builders draw the same traces as Plotly Express (a second implementation)."""

import numpy as np
import pandas as pd
import plotly.express as px
import pytest

from app_pages._ui import WEBGL_POINTS, bar_figure, line_figure


def _traces(fig):
    return [(t.name, list(t.x), [float(v) for v in t.y]) for t in fig.data]


@pytest.fixture
def table():
    rng = np.random.default_rng(0)
    return pd.DataFrame({"router": np.repeat(["b", "a", "c"], 5), "x": np.tile(np.arange(5), 3),
                         "y": rng.random(15), "extra": np.arange(15)})


def test_line_matches_plotly_express(table):
    ours = line_figure(table, "x", "y", "router", hover=("extra",), line_shape="hv", order=["c", "a", "b"])
    ref = px.line(table, x="x", y="y", color="router", line_shape="hv",
                  category_orders={"router": ["c", "a", "b"]})
    assert _traces(ours) == _traces(ref)
    assert all(t.line.shape == "hv" for t in ours.data)
    assert [list(t.customdata[:, 0]) for t in ours.data] == [list(range(10, 15)), list(range(5, 10)),
                                                             list(range(5))]


def test_wide_line_and_bars_match_plotly_express(table):
    wide = table[table["router"] == "a"]
    assert _traces(line_figure(wide, "x", ["y", "extra"], markers=True)) == \
        _traces(px.line(wide, x="x", y=["y", "extra"], markers=True))
    ours = bar_figure(table, "x", "y", "router", barmode="group")
    assert _traces(ours) == _traces(px.bar(table, x="x", y="y", color="router", barmode="group"))
    assert ours.layout.barmode == "group"


def test_many_points_draw_with_webgl():
    n = WEBGL_POINTS + 1
    big = pd.DataFrame({"x": np.arange(n), "y": np.ones(n)})
    assert line_figure(big, "x", "y").data[0].type == "scattergl"
    assert line_figure(big.head(10), "x", "y").data[0].type == "scatter"


def test_error_bars_match_plotly_express(table):
    table = table.assign(err=table["y"] / 10)
    ours = line_figure(table, "x", "y", "router", markers=True, error_y="err")
    ref = px.line(table, x="x", y="y", color="router", markers=True, error_y="err")
    assert _traces(ours) == _traces(ref)
    assert [list(t.error_y.array) for t in ours.data] == [list(t.error_y.array) for t in ref.data]
