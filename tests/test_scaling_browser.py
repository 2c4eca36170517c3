"""The scaling page in Chromium: after a refused upload the earlier table's results say so."""

from __future__ import annotations

import pytest

from tests import browser_support as bs
from tests.test_browser_bad_input import _knee_csv, _upload

pytestmark = pytest.mark.browser


def _alerts(page, kind: str) -> list[str]:
    return page.locator(f"[data-testid=stMain] [data-testid=stAlertContent{kind}]").all_inner_texts()


def test_results_after_a_refused_upload_are_marked_as_the_earlier_files(page, server):
    bs.open_page(page, server, "scaling", {"src": "upload"})
    bs.rerun(page, lambda: _upload(page, "first.csv", _knee_csv(1e8, 1)), figures=3)
    # Replacing the file: the page ends on the new table's results. (That no run in between shows
    # fewer charts is not asserted: it held in about half of the runs on a quiet machine.)
    bs.rerun(page, lambda: _upload(page, "good.csv", _knee_csv(1e9, 0)), figures=3)
    assert any("A break is supported" in t for t in _alerts(page, "Success"))
    assert _alerts(page, "Warning") == []

    bs.rerun(page, lambda: _upload(page, "words.csv", b"params,loss\nabc,def\n2e6,2.4\n"), figures=3)
    assert _alerts(page, "Success") == []  # no green verdict under the new file's name
    assert any("earlier table (upload 'good.csv'), not of upload 'words.csv'" in t
               for t in _alerts(page, "Warning"))
    assert any(t.startswith("Last valid result (upload 'good.csv'): A break is supported")
               for t in _alerts(page, "Info"))
