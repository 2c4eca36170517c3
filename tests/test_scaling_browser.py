"""The scaling page in Chromium: replacing an upload keeps the charts on screen; after a refused
upload the earlier table's results say so."""

from __future__ import annotations

import pytest

from tests import browser_support as bs
from tests.test_browser_bad_input import _knee_csv, _upload

pytestmark = pytest.mark.browser


def _alerts(page, kind: str) -> list[str]:
    return page.locator(f"[data-testid=stMain] [data-testid=stAlertContent{kind}]").all_inner_texts()


def _replace(page, name: str, data: bytes, warning: str = "") -> None:
    """Upload `name` and wait for the run that read it: a replacement may first finish a run
    without a file (its warning names the earlier file), so wait until the warnings are exactly
    those the new file brings: `warning` in one of them, or none when it is empty."""
    before = page.evaluate("window.__st.done")
    _upload(page, name, data)
    page.wait_for_function(
        """([done, want]) => {
             const ws = [...document.querySelectorAll(
               '[data-testid=stMain] [data-testid=stAlertContentWarning]')].map(e => e.innerText);
             return window.__st.done > done && window.__st.state === 'notRunning'
                    && (want ? ws.some(w => w.includes(want)) : ws.length === 0); }""",
        arg=[before, warning], timeout=60_000)
    bs.wait_for_render(page, 3)


# Records the fewest charts on the page from now on (a page emptier for a moment reads fewer).
_WATCH = """() => { window.__fewest = 1e9; new MutationObserver(() => { window.__fewest = Math.min(
    window.__fewest, document.querySelectorAll('[data-testid=stMain] [data-testid=stPlotlyChart]').length);
  }).observe(document.body, {subtree: true, childList: true, attributes: true}); }"""


def test_replacing_a_file_never_shows_fewer_charts(page, server):
    bs.open_page(page, server, "scaling", {"src": "upload"})
    bs.rerun(page, lambda: _upload(page, "first.csv", _knee_csv(1e8, 1)), figures=3)
    page.evaluate(_WATCH)
    # Removing the file runs the page without one (the step a replacement passes through, where
    # it may or may not be overtaken by the upload): the earlier results stay, marked.
    bs.rerun(page, lambda: page.get_by_test_id("stFileChipDeleteBtn").first.click(), figures=3)
    assert any("earlier table (upload 'first.csv')" in t for t in _alerts(page, "Warning"))
    _replace(page, "second.csv", _knee_csv(1e9, 2))
    _replace(page, "third.csv", _knee_csv(1e9, 3))
    assert page.evaluate("window.__fewest") == 3


def test_results_after_a_refused_upload_are_marked_as_the_earlier_files(page, server):
    bs.open_page(page, server, "scaling", {"src": "upload"})
    bs.rerun(page, lambda: _upload(page, "first.csv", _knee_csv(1e8, 1)), figures=3)
    _replace(page, "good.csv", _knee_csv(1e9, 0))
    assert any("A break is supported" in t for t in _alerts(page, "Success"))

    _replace(page, "words.csv", b"params,loss\nabc,def\n2e6,2.4\n", "not of upload 'words.csv'")
    assert _alerts(page, "Success") == []  # no green verdict under the new file's name
    assert any("earlier table (upload 'good.csv'), not of upload 'words.csv'" in t
               for t in _alerts(page, "Warning"))
    assert any(t.startswith("Last valid result (upload 'good.csv'): A break is supported")
               for t in _alerts(page, "Info"))
