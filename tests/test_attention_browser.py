"""The attention page's long runs in a real browser: Stop ends a running sweep at its next row and
the page says so; nothing from the stopped run is shown."""

from __future__ import annotations

import time

import pytest

from tests import browser_support as bs

pytestmark = [pytest.mark.browser, pytest.mark.slow]

# Estimated about a minute on the 2-core reference machine: still running when Stop is pressed.
LONG = {"src": "Run here", "preset": "custom", "S": ["256", "512", "1024"], "D": "64", "hidden": "512",
        "tokens": "8192", "dtype": "fp32", "causal": "off"}


def test_stop_ends_a_running_sweep(page, server):
    bs.open_page(page, server, "attention", LONG)
    page.get_by_text("Estimated ").first.wait_for(timeout=60_000)
    # A busy machine estimates this over the CPU limit and offers it at reduced size: either runs long enough.
    reduced = page.get_by_text("Run at reduced size")
    (reduced.first if reduced.count() else page.get_by_test_id("stBaseButton-primary").first).click()
    page.get_by_text("Timing attention kernels").first.wait_for(timeout=120_000)  # the sweep is under way
    time.sleep(1)
    page.get_by_test_id("stBaseButton-secondary").filter(has_text="Stop").first.click()
    page.get_by_text("The last run was stopped before it finished; nothing from it is shown.").wait_for(
        timeout=120_000)
    bs.wait_for_run(page, page.evaluate("window.__st.done") - 1, timeout_s=120)
    assert bs.table_count(page) == 0 and not bs.exceptions(page)
