"""Every page in a real browser: a cold deep link with settings in the URL draws its figures and
tables with no exception, the CSV download parses and agrees with the settings, a widget change
redraws a figure and updates the URL, and that URL, opened cold in a new session, reproduces
exactly the same figures.

Pages come from app.py itself, so a page added there is tested (at least for a clean cold load
and a screenshot) before anyone writes its entry in browser_support.PAGES.
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



def _same(shown: str, value: object) -> bool:
    """A widget's text equals the setting (numbers compared as numbers: '0.50' is 0.5)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(shown.replace(",", "")) == pytest.approx(float(value))
    return shown == str(value)


@pytest.mark.parametrize("path", APP_PATHS, ids=lambda p: p or "home")
def test_page_end_to_end(browser, page, server, path):
    """Cold link, screenshot, content, CSV, widget change, and the changed link reproduced cold."""
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
        assert bs.query_of(page).get(key, str(value)) == str(value), key
    before = bs.figures(page)
    assert len(before) >= spec.figures
    assert bs.table_count(page) >= spec.tables
    assert bs.table_overflow_px(page)[:spec.fit_tables] == [0] * spec.fit_tables
    assert bs.misaligned_inputs(page) == []

    if spec.csv is not None:
        table = bs.download_csv(page, spec.csv)
        assert len(table) > 0
        assert set(spec.csv_columns) <= set(table.columns)
        assert spec.csv_check is None or spec.csv_check(table, spec.query)

    if spec.change is not None:
        key, value = spec.change
        bs.rerun(page, lambda: bs.set_widget(page, key, value), spec.figures)
        after = bs.figures(page)
        assert bs.exceptions(page) == []
        assert len(after) == len(before) and after != before
        assert bs.query_of(page)[key] == str(value)
        fresh = bs.new_app_page(browser)
        try:
            bs.open_page(fresh, server, path, bs.query_of(page), spec.figures)
            assert bs.figures(fresh) == after
            assert bs.foreign_requests(fresh) == []
        finally:
            fresh.context.close()
    # Nothing but the app's own host: no icon font, no CDN, no tracker (closed networks).
    assert bs.foreign_requests(page) == []


def test_navigation_and_home_links(page, server):
    """The sidebar lists exactly app.py's pages in order; Home links to every lab, and a click on
    a link opens that lab."""
    bs.open_page(page, server, "")
    assert bs.nav_paths(page) == APP_PATHS
    links = page.get_by_test_id("stPageLink").locator("a")
    hrefs = links.evaluate_all("as => as.map(a => new URL(a.href).pathname.replace(/^\\//, ''))")
    assert sorted(hrefs) == sorted(APP_PATHS[1:])
    target = hrefs[-1]
    figures = SPECS.get(target, bs.PageSpec(target)).figures
    bs.rerun(page, lambda: links.nth(len(hrefs) - 1).click(), figures)
    assert urllib.parse.urlsplit(page.url).path.strip("/") == target
    assert bs.exceptions(page) == []
