"""Every page in a real browser: a cold deep link with settings in the URL draws its figures and
tables with no exception, a widget change redraws the figure, the CSV download parses, and the
changed URL, opened cold in a new session, reproduces the same figures.

Pages come from app.py itself, so a page added there is tested (at least for a clean cold load)
before anyone writes its entry in browser_support.PAGES.
"""

from __future__ import annotations

import re
import urllib.parse

import pytest

from tests import browser_support as bs

pytestmark = pytest.mark.browser

# Every url_path in app.py, plus '' for the default page (Home).
APP_PATHS = [""] + re.findall(r'url_path="([^"]+)"', (bs.ROOT / "app.py").read_text())
SPECS = {spec.path: spec for spec in bs.PAGES.values()}


def _query(page) -> dict[str, str]:
    return dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(page.url).query))


def _same(shown: str, value: object) -> bool:
    """A widget's text equals the setting (numbers compared as numbers: '0.50' is 0.5)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(shown.replace(",", "")) == pytest.approx(float(value))
    return shown == str(value)


def test_navigation_lists_every_page_of_app_py(page, server):
    """The sidebar offers exactly the pages app.py declares, in that order."""
    bs.open_page(page, server, "")
    assert bs.nav_paths(page) == APP_PATHS


@pytest.mark.parametrize("path", APP_PATHS, ids=lambda p: p or "home")
def test_cold_deep_link(page, server, path):
    """Cold link (with the page's settings in the URL): drawn, no exception, no error; screenshot."""
    spec = SPECS.get(path, bs.PageSpec(path))
    bs.open_page(page, server, path, spec.query, spec.figures)
    (bs.ARTIFACTS / "pages").mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(bs.ARTIFACTS / "pages" / f"{path or 'home'}.png"), full_page=True)
    assert bs.exceptions(page) == []
    assert bs.errors(page) == []
    assert page.get_by_test_id("stMainBlockContainer").inner_text().strip() != ""
    # The settings in the link are the settings on screen, and they stay in the URL (Streamlit
    # drops a parameter that equals the widget's default).
    for key, value in spec.query.items():
        assert _same(bs.widget_value(page, key), value), key
        assert _query(page).get(key, str(value)) == str(value)
    assert len(bs.figures(page)) >= spec.figures
    assert bs.table_count(page) >= spec.tables


INTERACTIVE = [s for s in bs.PAGES.values() if s.change is not None]


@pytest.mark.parametrize("spec", INTERACTIVE, ids=lambda s: s.path)
def test_widget_change_redraws_and_link_reproduces(browser, page, server, spec):
    """Changing a widget redraws the first figure and updates the URL; that URL, opened cold in a
    new session, shows exactly the same figures."""
    bs.open_page(page, server, spec.path, spec.query, spec.figures)
    before = bs.figures(page)
    key, value = spec.change
    bs.rerun(page, lambda: bs.set_widget(page, key, value))
    after = bs.figures(page)
    assert bs.exceptions(page) == []
    assert after and after[0] != before[0]
    assert _query(page)[key] == str(value)

    fresh = bs.new_app_page(browser)
    try:
        bs.open_page(fresh, server, spec.path, _query(page), spec.figures)
        assert bs.figures(fresh) == after
    finally:
        fresh.context.close()


DOWNLOADS = [s for s in bs.PAGES.values() if s.csv is not None]


@pytest.mark.parametrize("spec", DOWNLOADS, ids=lambda s: s.path)
def test_csv_download_parses(page, server, spec):
    """The page's CSV download is a parseable table with the documented columns and some rows."""
    bs.open_page(page, server, spec.path, spec.query, spec.figures)
    table = bs.download_csv(page, spec.csv)
    assert len(table) > 0
    assert set(spec.csv_columns) <= set(table.columns)
    if spec.csv_check is not None:
        assert spec.csv_check(table, spec.query)


def test_home_links_open_every_lab(page, server):
    """Each lab link on Home leads to its page, which runs without an exception."""
    bs.open_page(page, server, "")
    labels = page.get_by_test_id("stPageLink").all_inner_texts()
    assert len(labels) == len(APP_PATHS) - 1
    visited = []
    for label in labels:
        bs.open_page(page, server, "")
        bs.rerun(page, lambda: page.get_by_test_id("stPageLink").filter(has_text=label).click())
        visited.append(urllib.parse.urlsplit(page.url).path.strip("/"))
        assert bs.exceptions(page) == [], label
    assert sorted(visited) == sorted(APP_PATHS[1:])
