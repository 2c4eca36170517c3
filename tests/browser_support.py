"""Headless Chromium (Debian's) driven by Playwright, a Streamlit server on a free port, and the
few page operations the browser tests and scripts/screenshot.py share.

Widgets are found by their key: Streamlit puts the class `st-key-<key>` on the element container
of every keyed widget, and each page binds its settings to query parameters named like the keys,
so the key in a cold link's query is also the handle to the widget on screen.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "artifacts"
CHROMIUM = "/usr/bin/chromium"
# Flags for a closed network: no background requests, no sandbox as root, software rendering.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 1280, "height": 1600}

# Counts finished script runs in the page itself. Waiting for the `running` attribute from Python
# misses fast reruns (a 50 ms run can start and end between two polls); a MutationObserver with
# old values sees every transition, so "a run finished after my click" is exact.
_RUN_COUNTER_JS = """
(() => {
  window.__st = {done: 0, state: null};
  const watch = (app) => {
    window.__st.state = app.getAttribute('data-test-script-state');
    new MutationObserver((records) => {
      const now = app.getAttribute('data-test-script-state');
      records.forEach((r, i) => {
        const next = i + 1 < records.length ? records[i + 1].oldValue : now;
        if (next === 'notRunning' && r.oldValue !== 'notRunning') window.__st.done++;
      });
      window.__st.state = now;
    }).observe(app, {attributes: true, attributeOldValue: true,
                     attributeFilter: ['data-test-script-state']});
  };
  const find = new MutationObserver(() => {
    const app = document.querySelector('[data-testid=stApp]');
    if (app) { find.disconnect(); watch(app); }
  });
  find.observe(document, {childList: true, subtree: true});
})();
"""
_IDLE = "[data-testid='stApp'][data-test-script-state='notRunning']"


def chromium_available() -> bool:
    """True when Debian's Chromium and the playwright package are both installed."""
    try:
        import playwright  # noqa: F401
    except ImportError:
        return False
    return os.access(CHROMIUM, os.X_OK)


@contextlib.contextmanager
def launch_browser() -> Iterator["object"]:
    """A Playwright Chromium browser using the system binary (never a downloaded one)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield browser
        finally:
            browser.close()


def free_port() -> int:
    """An unused TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def streamlit_server(timeout_s: float = 60.0, log_path: Path | None = None) -> Iterator[str]:
    """Run `streamlit run app.py` on 127.0.0.1:<free port>; yield its base URL once healthy.

    The server's output goes to `log_path` (default artifacts/streamlit-<port>.log when that folder
    exists), so tests can check that errors hidden from the user were logged.
    """
    port = free_port()
    if log_path is None and ARTIFACTS.is_dir():
        log_path = ARTIFACTS / f"streamlit-{port}.log"
    log = open(log_path, "w") if log_path is not None else subprocess.DEVNULL
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "app.py", "--server.port", str(port),
         "--server.address", "127.0.0.1", "--server.headless", "true"],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                with urllib.request.urlopen(f"{base}/_stcore/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"streamlit did not become healthy on port {port}")
            time.sleep(0.3)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        if log is not subprocess.DEVNULL:
            log.close()


def new_app_page(browser: Any) -> Any:
    """A page at 1280x1600 in a fresh context (own Streamlit session) that counts script runs.

    Close it with `page.context.close()`.
    """
    page = browser.new_context(viewport=VIEWPORT).new_page()
    page.add_init_script(_RUN_COUNTER_JS)
    return page


def page_url(base: str, path: str, query: dict[str, Any] | None = None) -> str:
    """`base/path?query` with the query URL-encoded."""
    q = urllib.parse.urlencode(query or {})
    return f"{base}/{path}" + (f"?{q}" if q else "")


def wait_for_app(page, timeout_s: float = 30.0) -> None:
    """Wait until Streamlit's script run has finished (stApp's data-test-script-state)."""
    page.wait_for_selector(_IDLE, timeout=timeout_s * 1000)


def wait_for_render(page, figures: int = 0, timeout_s: float = 30.0) -> None:
    """Wait for the run to finish and at least `figures` plotly charts, all drawn.

    Plotly's component loads lazily: a fast run can finish before any chart element exists, so
    the caller says how many to expect.
    """
    wait_for_app(page, timeout_s)
    page.wait_for_function(
        """n => { const cs = [...document.querySelectorAll('[data-testid=stPlotlyChart]')];
                  return cs.length >= n && cs.every(c => {
                      const g = c.querySelector('.js-plotly-plot');
                      return g && Array.isArray(g.data); }); }""",
        arg=figures, timeout=timeout_s * 1000)


def open_page(page, base: str, path: str, query: dict[str, Any] | None = None,
              figures: int = 0, timeout_s: float = 60.0) -> float:
    """Cold-load `path?query`, wait until `figures` charts are drawn; returns the seconds taken."""
    t0 = time.perf_counter()
    page.goto(page_url(base, path, query))
    # stApp reads notRunning before the first run starts: wait for a run to have finished.
    page.wait_for_function("window.__st.done > 0 && window.__st.state === 'notRunning'",
                           timeout=timeout_s * 1000)
    wait_for_render(page, figures, timeout_s)
    return time.perf_counter() - t0


def rerun(page, action: Callable[[], Any], timeout_s: float = 60.0) -> float:
    """Do `action`, wait for the script run it starts to finish and redraw; returns seconds."""
    before = page.evaluate("window.__st.done")
    t0 = time.perf_counter()
    action()
    page.wait_for_function(f"window.__st.done > {before} && window.__st.state === 'notRunning'",
                           timeout=timeout_s * 1000)
    wait_for_render(page, timeout_s=timeout_s)
    return time.perf_counter() - t0


def widget(page, key: str):
    """The element container of the widget with this key."""
    return page.locator(f".st-key-{key}")


def widget_kind(page, key: str) -> str:
    """The Streamlit test id of the widget with this key, e.g. 'stNumberInput'."""
    return widget(page, key).locator("[data-testid^=st]").first.get_attribute("data-testid")


def type_number(page, key: str, text: str) -> None:
    """Type `text` into a number or text input and press Enter (no wait for a run)."""
    box = widget(page, key).locator("input").first
    box.fill(text)
    # Enter only commits once React has seen the edit: it shows "Press Enter to apply" then.
    widget(page, key).get_by_test_id("InputInstructions").wait_for(timeout=5000)
    box.press("Enter")


def set_widget(page, key: str, value: Any) -> None:
    """Set the widget `key` to `value` the way a user would (no wait for a run)."""
    kind = widget_kind(page, key)
    w = widget(page, key)
    if kind in ("stNumberInput", "stTextInput"):
        type_number(page, key, str(value))
    elif kind == "stSelectbox":
        w.locator("input").first.click()
        page.get_by_role("option", name=str(value), exact=True).click()
    elif kind == "stRadio":
        w.get_by_text(str(value), exact=True).click()
    elif kind == "stCheckbox":
        box = w.locator("input[type=checkbox]")
        if box.is_checked() != bool(value):
            w.locator("label").first.click()
    elif kind == "stSlider":
        # Arrow keys step the thumb (select_slider included, whose range value is an index); each
        # step is a rerun, so tests change sliders by a step or two.
        thumb = w.locator("input[type=range]").first
        thumb.focus()
        for _ in range(200):
            shown = float(thumb.get_attribute("aria-valuetext").replace(",", ""))
            if math.isclose(shown, float(value)):
                break
            thumb.press("ArrowRight" if shown < float(value) else "ArrowLeft")
        else:
            raise ValueError(f"slider {key} cannot reach {value}")
    else:
        raise NotImplementedError(f"set_widget: {kind} ({key})")


def widget_value(page, key: str) -> str:
    """What the widget `key` shows, as text (number, selected option, slider value, ...)."""
    kind = widget_kind(page, key)
    w = widget(page, key)
    if kind in ("stNumberInput", "stTextInput", "stSelectbox"):
        return w.locator("input").first.input_value()
    if kind == "stSlider":  # the shown text: select_slider's range value is an index
        return w.locator("input[type=range]").first.get_attribute("aria-valuetext")
    if kind == "stCheckbox":
        return str(w.locator("input[type=checkbox]").is_checked())
    if kind == "stRadio":
        return w.locator("input[type=radio]:checked").first.evaluate(
            "e => e.closest('label').innerText").strip()
    raise NotImplementedError(f"widget_value: {kind} ({key})")


def figures(page) -> list[str]:
    """One JSON signature (traces and title) per plotly chart on the page, in page order."""
    return page.evaluate(
        """() => [...document.querySelectorAll('[data-testid=stPlotlyChart] .js-plotly-plot')]
                 .map(g => JSON.stringify([g.data, (g.layout || {}).title]))""")


def table_count(page) -> int:
    """Number of tables (st.dataframe and st.table) on the page."""
    return page.locator("[data-testid=stDataFrame], [data-testid=stTable]").count()


def exceptions(page) -> list[str]:
    """Texts of exception elements (tracebacks or Streamlit's redacted error box)."""
    return page.get_by_test_id("stException").all_inner_texts()


def errors(page) -> list[str]:
    """Texts of st.error boxes on the page."""
    return page.get_by_test_id("stAlertContentError").all_inner_texts()


def download(page, filename: str) -> bytes:
    """Click the download button labelled `filename` and return the downloaded bytes."""
    button = page.get_by_test_id("stDownloadButton").filter(has_text=filename).locator("button")
    with page.expect_download() as info:
        button.first.click()
    return Path(info.value.path()).read_bytes()


def download_csv(page, filename: str):
    """Download `filename` (a CSV) and parse it with pandas."""
    import pandas as pd

    return pd.read_csv(io.BytesIO(download(page, filename)))


def nav_paths(page) -> list[str]:
    """URL paths of every page listed in the sidebar navigation ('' for the default page)."""
    hrefs = page.get_by_test_id("stSidebarNav").locator("a").evaluate_all(
        "as => as.map(a => new URL(a.href).pathname)")
    return [h.strip("/") for h in hrefs]


def write_json(name: str, doc: dict[str, Any]) -> Path:
    """Write `doc` to artifacts/<name> (created if missing) and return the path."""
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    path.write_text(json.dumps(doc, indent=2))
    return path



@dataclass(frozen=True)
class PageSpec:
    """What one page's browser test does: open a cold link with `query`, then `change` a widget.

    path: the url_path in app.py ('' is Home). query: settings for the cold link (keys are widget
    keys). change: (key, value) that must redraw the first figure. csv: a download button label
    whose file must parse and hold `csv_columns`; csv_check(table, query) is True when the table
    agrees with what the settings imply. figures/tables: at least this many on the page.
    """

    path: str
    query: dict[str, Any] = field(default_factory=dict)
    change: tuple[str, Any] | None = None
    csv: str | None = None
    csv_columns: tuple[str, ...] = ()
    csv_check: Callable[[Any, dict[str, Any]], bool] | None = None
    figures: int = 0
    tables: int = 0


# One entry per page in app.py, filled in from each page's widget keys as the pages land.
PAGES: dict[str, PageSpec] = {
    "home": PageSpec("", tables=1),
    "expert-parallel": PageSpec(
        "expert-parallel",
        # hash router and 4 ranks: the hot-expert sweep under it costs seconds, not tens of them.
        query={"experts": 32, "ranks": 4, "k": 2, "tokens": 1024, "router": "hash", "zipf": 1.2,
               "place": "greedy"},
        change=("ranks", 2), csv="ep_ranks.csv",
        csv_columns=("rank", "experts", "load_pairs", "sent_off_rank_MB",
                     "received_off_rank_MB"),
        # One row per rank; each token is 1..k pairs (the hash router drops a repeated expert);
        # every byte sent off a rank is received by another.
        csv_check=lambda t, q: (list(t["rank"]) == list(range(q["ranks"]))
                                and q["tokens"] * q["ranks"] <= t["load_pairs"].sum()
                                <= q["tokens"] * q["ranks"] * q["k"]
                                and math.isclose(t["sent_off_rank_MB"].sum(),
                                                 t["received_off_rank_MB"].sum(), rel_tol=1e-9)),
        figures=3, tables=2),
}
