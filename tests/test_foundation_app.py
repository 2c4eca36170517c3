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
