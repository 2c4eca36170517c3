"""No table on any page shows a missing value as "None" (or an empty cell): every page at its
defaults, in AppTest, each st.dataframe's cells read against what the grid is sent to show."""

from pathlib import Path

import pytest
from streamlit import dataframe_util
from streamlit.testing.v1 import AppTest

ROOT = Path(__file__).resolve().parents[1]
APP = str(ROOT / "app.py")
PAGES = ["home", "routing", "expert_parallel", "attention", "scaling", "cost", "training"]


def _page(name: str, monkeypatch) -> AppTest:
    """The app's page `name` at its defaults, reached as a user does: Home first, then the page."""
    monkeypatch.chdir(ROOT)
    at = AppTest.from_file(APP, default_timeout=120).run().switch_page(f"app_pages/{name}.py").run()
    assert not at.exception and at.title, name
    return at


def _blank_cells(element) -> list[str]:
    """Columns in which a missing value reaches the grid with nothing to show but None: a missing
    cell of the data, unless a pandas Styler gives it display text (routing's na_rep)."""
    value = element.value
    missing = value.isna()
    arrow = element.proto.arrow_data
    if arrow.HasField("styler"):
        shown = dataframe_util.convert_arrow_bytes_to_pandas_df(arrow.styler.display_values)
        text = shown.astype(str).apply(lambda c: c.str.strip())
        missing = missing & text.isin(["", "None", "nan", "NaN"]).to_numpy()
    text_none = value.apply(lambda c: c.map(lambda v: isinstance(v, str) and v in ("None", "nan")))
    return [str(c) for c in value.columns if missing[c].any() or text_none[c].any()]


@pytest.mark.parametrize("page", PAGES)
def test_no_table_shows_none_at_the_defaults(page, monkeypatch):
    at = _page(page, monkeypatch)
    blank = {i: cols for i, d in enumerate(at.dataframe) if (cols := _blank_cells(d))}
    assert blank == {}, f"{page}: tables (by index) with cells shown as None: {blank}"


# The same quantity under the same name on every page: (page, widget key) -> label (prefix).
SAME_NAMES = {
    "Experts E": [("routing", "E"), ("expert_parallel", "experts"), ("training", "E"), ("cost", "experts")],
    "Experts per token k": [("routing", "k"), ("expert_parallel", "k"), ("training", "k"), ("cost", "k")],
    "Ranks R": [("routing", "R"), ("expert_parallel", "ranks"), ("cost", "ep")],
    "Capacity factor C": [("routing", "C"), ("training", "C"), ("cost", "cf")],
    "Zipf exponent s": [("routing", "s"), ("expert_parallel", "zipf")],
}


def _widget(at: AppTest, key: str):
    """The number input or slider with this key."""
    try:
        return at.number_input(key=key)
    except KeyError:
        return at.slider(key=key)


def test_same_quantity_same_name_on_every_page(monkeypatch):
    pages = {p: _page(p, monkeypatch) for p in {p for uses in SAME_NAMES.values() for p, _ in uses}}
    labels = {(p, key): _widget(pages[p], key).label
              for uses in SAME_NAMES.values() for p, key in uses}
    wrong = {use: labels[use] for name, uses in SAME_NAMES.items() for use in uses
             if not labels[use].startswith(name)}
    assert wrong == {}


def test_capacity_factor_takes_one_range_everywhere(monkeypatch):
    """Routing took 0.01, training 0.05 and cost only 1.0 upwards; now each takes the engine's
    range, and each lab's own check refuses just outside it."""
    from engine.cost_memory import TrainLayout
    from engine.routing_lab import LabSettings
    from engine.train_loop import TrainSettings
    from engine.validation import CAPACITY_FACTOR

    lo, hi = CAPACITY_FACTOR
    for page, key in SAME_NAMES["Capacity factor C"]:
        box = _page(page, monkeypatch).number_input(key=key)
        assert (box.min, box.max) == (lo, hi), page
    for build in (lambda c: LabSettings(capacity_factor=c).validate(),
                  lambda c: TrainLayout(capacity_factor=c),
                  lambda c: TrainSettings(capacity=c)):
        build(lo), build(hi)
        for c in (lo * 0.99, hi * 1.01):
            with pytest.raises(ValueError, match="capacity"):
                build(c)
