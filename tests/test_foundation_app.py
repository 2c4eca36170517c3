"""The app shell: navigation over every page and the home page's environment table."""

from pathlib import Path

import torch
from streamlit.testing.v1 import AppTest

APP = str(Path(__file__).resolve().parents[1] / "app.py")


def test_home_page_renders_environment_and_links():
    at = AppTest.from_file(APP, default_timeout=60).run()
    assert not at.exception
    assert at.title[0].value == "ScaleLab"
    table = at.table[0].value
    assert table["torch"].iloc[0] == torch.__version__
    assert "Device" in at.sidebar.caption[0].value


def test_guarded_shows_engine_errors_without_markdown_links():
    def page():
        from app_pages._ui import guarded

        def refuse():
            raise ValueError("cell ![](http://example.invalid/x.png) in column 'loss' is not a number")

        guarded("demo", refuse)

    at = AppTest.from_function(page).run()
    assert not at.exception
    body = at.error[0].value
    assert "![](" not in body and "!\\[\\](http://example.invalid/x.png)" in body


def test_unused_link_settings_by_hand():
    """Which link parameters a page did not use, checked against values worked out by hand."""
    from app_pages._ui import unused_link_settings

    values = {"E": 64, "T": 65536, "s": 1.2, "routers": ["hash", "topk"], "tied": False,
              "preset": "Mixtral 8x7B", "target": None, "forms": []}
    link = {"E": ["-5"],                # refused: the widget kept its default
            "T": ["65536"],             # used
            "s": ["1.20"],              # used: the same number written differently
            "routers": ["hash", "magic"],  # one name dropped
            "tied": ["false"],          # used (Streamlit writes booleans in lower case)
            "preset": ["Nope"],         # not an option
            "target": [""],             # an empty number input: used
            "forms": [""],              # an empty multiselect: used (the page says what it needs)
            "embed": ["true"],          # Streamlit's own parameter
            "zz": ["1"]}                # no such widget on the page
    assert unused_link_settings(link, values) == [
        ("E", "-5", "64"), ("routers", "hash, magic", "hash, topk"),
        ("preset", "Nope", "Mixtral 8x7B"), ("zz", "1", None)]


def test_sidebar_names_cores_and_threads():
    at = AppTest.from_file(APP, default_timeout=60).run()
    import os

    text = at.sidebar.caption[0].value
    assert f"{len(os.sched_getaffinity(0))} cores" in text
    # configure_torch pins one intra-op thread per session; torch.get_num_threads() here would read
    # this test thread's OpenMP setting, not the script thread's.
    assert "computes with 1 thread per session" in text


def test_table_shows_a_dash_for_missing_values():
    def page():
        import numpy as np
        import pandas as pd

        from app_pages._ui import table

        table(pd.DataFrame({"router": ["a", "b"], "k": [2, 1], "CV": [0.123456, np.nan],
                            "note": ["x", None]}), formats={"CV": "%.4f", "k": "%d"}, hide_index=True)

    at = AppTest.from_function(page).run()
    assert not at.exception
    shown = at.dataframe[0].value
    assert list(shown["CV"]) == ["0.1235", "–"] and list(shown["note"]) == ["x", "–"]
    assert list(shown["k"]) == [2, 1]  # no gap: still numbers
