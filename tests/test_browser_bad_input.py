"""Bad input in a real browser: malformed and oversized uploads, absurd numbers, FA3 on a CPU.

Each case must end with a friendly message, no exception element (no traceback), the last good
figures still on screen, the refusal in the server log, and a next action that works.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests import browser_support as bs

pytestmark = pytest.mark.browser


def _knee_csv(knee: float, seed: int) -> bytes:
    """A broken power law (slopes -0.1 then -0.3, knee at `knee`) with 1% noise, as CSV bytes."""
    rng = np.random.default_rng(seed)
    n = np.logspace(6, 11, 24)
    loss = 3.0 * (n / knee) ** np.where(n < knee, -0.1, -0.3) * np.exp(rng.normal(0, 0.01, n.size))
    return ("params,loss\n" + "".join(f"{a:.6g},{b:.6g}\n" for a, b in zip(n, loss))).encode()


# (file name, bytes, words the error must contain)
BAD_UPLOADS = [
    ("latin1.csv", b"params,loss\n1e6,2.5\n\xff\xfe2e6,2.4\n", "UTF-8"),
    ("header_only.csv", b"params,loss\n", "no rows"),
    ("quote.csv", b'params,loss\n1e6,"2.5\n2e6,2.4\n', "not a readable CSV"),
    ("words.csv", b"params,loss\nabc,def\n2e6,2.4\n", "not a number"),
    # Markup in a cell is data: shown as text, never as HTML, and refused as a number.
    ("markup.csv", b"params,loss\n<img src=x onerror=alert(1)>,2.5\n2e6,2.4\n", "not a number"),
]


def _upload(page, name: str, data: bytes) -> None:
    page.get_by_test_id("stFileUploaderDropzoneInput").set_input_files(
        files=[{"name": name, "mimeType": "text/csv", "buffer": data}])


def test_scaling_bad_uploads_keep_the_last_good_fit(page, server):
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    bs.open_page(page, server, "scaling", {"src": "upload"})
    bs.rerun(page, lambda: _upload(page, "good.csv", _knee_csv(1e9, 0)), figures=3)
    good = bs.figures(page)
    assert len(good) == 3 and bs.errors(page) == []

    for name, data, words in BAD_UPLOADS:
        bs.rerun(page, lambda: _upload(page, name, data), figures=3)
        assert bs.exceptions(page) == [], name
        errors = bs.errors(page)
        assert errors and all(words in e for e in errors), (name, errors)
        assert bs.figures(page) == good, name
        assert "Traceback" not in page.content()
    assert page.locator("[data-testid=stMain] img[src=x]").count() == 0 and dialogs == []

    # Over the 5 MiB cap: the browser refuses it before the server reads a byte.
    big = b"params,loss\n" + b"1000000,2.5\n" * (6 * 2**20 // 12)
    _upload(page, "big.csv", big)
    page.get_by_test_id("stFileUploader").get_by_text("or smaller").wait_for(timeout=10_000)
    assert bs.exceptions(page) == [] and bs.figures(page) == good

    # The next action works: another good table, another fit, no error left on screen.
    bs.rerun(page, lambda: _upload(page, "good2.csv", _knee_csv(1e8, 1)), figures=3)
    assert bs.errors(page) == [] and bs.exceptions(page) == []
    assert bs.figures(page) != good
    log = server.log.read_text()
    assert "input refused by scaling_table: upload must be UTF-8" in log
    assert "Traceback" not in log


def test_scaling_bad_upload_says_it_once(page, server):
    bs.open_page(page, server, "scaling", {"src": "upload"})
    bs.rerun(page, lambda: _upload(page, "good.csv", _knee_csv(1e9, 0)), figures=3)
    bs.rerun(page, lambda: _upload(page, *BAD_UPLOADS[0][:2]), figures=3)
    assert len(bs.errors(page)) == 1


def test_routing_absurd_numbers(page, server):
    spec = bs.PAGES["routing"]
    bs.open_page(page, server, "routing", spec.query, spec.figures)
    good = bs.figures(page)

    # Inside the widget's range but refused by the engine (groups must divide E): the field named
    # as on the page.
    page.get_by_text("More settings").click()
    bs.rerun(page, lambda: bs.set_widget(page, "groups", 3), spec.figures)
    errors = bs.errors(page)
    assert len(errors) == 1 and errors[0].endswith(
        "Expert groups must divide the 32 experts into groups of 2 or more, got 3")
    assert bs.exceptions(page) == [] and bs.figures(page) == good

    # Outside the widget's range: the browser refuses it and nothing runs.
    bs.type_number(page, "E", "1" + "0" * 15)
    bs.widget(page, "E").get_by_text("outside the allowed range").wait_for(timeout=10_000)
    assert bs.exceptions(page) == [] and bs.figures(page) == good

    # The next action works: a valid group count and a new expert count redraw.
    bs.rerun(page, lambda: bs.set_widget(page, "groups", 1), spec.figures)
    assert bs.errors(page) == [] and bs.figures(page) == good
    bs.rerun(page, lambda: bs.set_widget(page, "E", 16), spec.figures)
    assert bs.errors(page) == [] and bs.exceptions(page) == []
    assert bs.figures(page) != good
    assert "input refused by routing: Expert groups" in server.log.read_text()


def test_expert_parallel_absurd_cold_link(page, server):
    """A shared link with sizes over the budget: a message naming the limit, then recovery."""
    bs.open_page(page, server, "expert-parallel",
                 {"experts": 64, "ranks": 64, "tokens": 65536, "router": "hash"})
    errors = bs.errors(page)
    assert len(errors) == 1 and "Ranks R x Tokens per rank" in errors[0]
    # Only the hot-expert sweep draws: it caps its own token count by design.
    assert bs.exceptions(page) == [] and len(bs.figures(page)) == 1
    bs.rerun(page, lambda: bs.set_widget(page, "ranks", 4), figures=3)
    assert bs.errors(page) == [] and len(bs.figures(page)) == 3


def test_attention_fa3_on_cpu(page, server):
    """FA3 alone on a CPU: the banner says why it is not used, the sweep explains each row, and
    adding an SDPA backend then gives a figure."""
    bs.open_page(page, server, "attention", {"src": "Run here", "preset": "quick", "backends": ["fa3"]})
    banner = page.get_by_test_id("stAlertContainer").first.inner_text()
    if "CUDA none" not in banner:
        pytest.skip("a GPU is present: FA3 on a CPU is not what this machine does")
    assert "FA3: not used" in banner
    run = page.get_by_role("button", name="Run sweep")
    bs.rerun(page, run.click, timeout_s=120)
    assert bs.exceptions(page) == [] and bs.errors(page) == []
    assert "No backend ran" in " ".join(page.get_by_test_id("stAlertContainer").all_inner_texts())
    rows = bs.download_csv(page, "attention_sweep.csv")
    assert len(rows) > 0 and set(rows["backend"]) == {"fa3"}
    assert (rows["status"] != "ok").all() and rows["note"].str.len().gt(0).all()

    menu = bs.widget(page, "backends")
    menu.locator("input").first.click()
    bs.rerun(page, lambda: page.get_by_role("option", name="sdpa-math", exact=True).click())
    page.keyboard.press("Escape")
    bs.rerun(page, run.click, figures=1, timeout_s=120)
    assert bs.exceptions(page) == [] and len(bs.figures(page)) == 1
    rows = bs.download_csv(page, "attention_sweep.csv")
    assert set(rows.loc[rows["status"] == "ok", "backend"]) == {"sdpa-math"}
