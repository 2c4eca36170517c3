"""Session fixtures for the browser tests: one Streamlit server and one Chromium per session.

Browser tests are skipped (not failed) where Debian's Chromium is missing; scripts/test.sh
installs it, so CI runs them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from tests import browser_support as bs


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip every @pytest.mark.browser test cleanly when Chromium or playwright is missing."""
    if bs.chromium_available():
        return
    skip = pytest.mark.skip(reason=f"{bs.CHROMIUM} or the playwright package is missing")
    for item in items:
        if "browser" in item.keywords:
            item.add_marker(skip)


class Server(str):
    """The app's base URL, carrying the path of the server's log."""

    log: Path


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One `streamlit run app.py` on 127.0.0.1 for the whole session."""
    log = tmp_path_factory.mktemp("streamlit") / "server.log"
    with bs.streamlit_server(log_path=log) as base:
        url = Server(base)
        url.log = log
        yield url


@pytest.fixture(scope="session")
def browser() -> Iterator[object]:
    """One headless Chromium for the whole session; tests open their own contexts."""
    with bs.launch_browser() as b:
        yield b


@pytest.fixture
def page(browser):
    """A fresh context (own cookies, own Streamlit session) with one app page; the test fails if
    the page asked any host but the app's own for anything."""
    p = bs.new_app_page(browser)
    yield p
    foreign = bs.foreign_requests(p)
    p.context.close()
    assert foreign == [], f"requests to other hosts: {foreign}"
