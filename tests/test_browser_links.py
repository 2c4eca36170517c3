"""Deep links in a real browser: a setting the page cannot use is named in a notice at the top
(what the link said, what the page uses instead); a usable link shows none. Streamlit alone would
drop such a parameter from the URL without a word."""

from __future__ import annotations

import pytest

from engine.cost_model import PRESETS
from engine.routing_lab import LabSettings
from tests import browser_support as bs

pytestmark = pytest.mark.browser
D = LabSettings()


def _notice(page) -> str:
    """The link notice's text ("" without one); a page's own warnings (e.g. /cost's "Does not
    fit") are not it."""
    return " ".join(t for t in page.get_by_test_id("stAlertContentWarning").all_inner_texts()
                    if "settings in the link" in t)


@pytest.mark.parametrize("path, query, expected", [
    # Below the widget's minimum and not a number: both named, with the value used instead.
    ("routing", {"E": -5, "T": "abc"}, ("E=-5", "T=abc", f"using {D.num_experts:,}",
                                                f"using {D.num_tokens:,}")),
    ("cost", {"preset": "Nope"}, ("preset=Nope", f"using {next(iter(PRESETS))}")),
    ("cost", {"nope": 3}, ("nope=3", "not a setting of this page")),
])
def test_unusable_link_settings_are_named(page, server, path, query, expected):
    bs.open_page(page, server, path, query)
    text = _notice(page)
    for part in expected:
        assert part in text, (part, text)
    assert bs.exceptions(page) == []


def test_usable_link_shows_no_notice(page, server):
    # E=16 is kept; k at its default is dropped from the URL by Streamlit: both are used.
    bs.open_page(page, server, "routing", {"E": 16, "k": D.top_k})
    assert _notice(page) == ""
    assert bs.widget_value(page, "E") == "16"


def test_navigating_between_pages_shows_no_notice(page, server):
    """Moving to other pages and back (the settings come back with the URL) is not a link to
    complain about."""
    bs.open_page(page, server, "routing", {"E": 16, "R": 4})
    for target in ("cost", "routing", ""):
        link = page.get_by_test_id("stSidebarNav").locator(f'a[href$="/{target}"]').first
        bs.rerun(page, link.click)
        assert _notice(page) == "", target
    assert bs.exceptions(page) == []
