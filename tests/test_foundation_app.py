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
