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
import re
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

try:
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
except ImportError:  # the browser tests skip; scripts fail on launch with a clear import error
    PlaywrightTimeout = TimeoutError

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "artifacts"
CHROMIUM = "/usr/bin/chromium"
# Flags for a closed network: no background requests, no sandbox as root, software rendering.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 1280, "height": 1600}

# Counts finished script runs in the page itself. Waiting for the `running` attribute from Python
# misses fast reruns (a 50 ms run can start and end between two polls); a MutationObserver with
# old values sees every transition the DOM shows. A fast run can also show none: when a run's
# messages (new_session ... script_finished) arrive back to back, React renders their state
# updates in one batch and data-test-script-state never leaves 'notRunning' (the page does show
# the run's output; docs/run_state_batching.md has a reproduction). So the page also watches its
# websocket for script_finished messages: one that no transition accounted for counts once its
# messages have been handled (100 ms later, after the render React queued for them).
_RUN_COUNTER_JS = """
(() => {
  window.__st = {done: 0, state: null, t: 0, batched: 0};
  const finish = (t) => { window.__st.done++; window.__st.t = t; };  // t: in-page clock
  const watch = (app) => {
    window.__st.state = app.getAttribute('data-test-script-state');
    new MutationObserver((records) => {
      const now = app.getAttribute('data-test-script-state');
      records.forEach((r, i) => {
        const next = i + 1 < records.length ? records[i + 1].oldValue : now;
        if (next === 'notRunning' && r.oldValue !== 'notRunning') finish(performance.now());
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
  // A ForwardMsg whose top-level fields include field 6 (script_finished).
  const isFinished = (b) => {
    let i = 0;
    const varint = () => { let v = 0, k = 0, x; do { x = b[i++]; v += (x & 127) * 2 ** k; k += 7; }
                           while (x & 128 && i < b.length); return v; };
    while (i < b.length) {
      const tag = varint(), wire = tag & 7;
      if (Math.floor(tag / 8) === 6) return true;
      if (wire === 0) varint(); else if (wire === 2) { const n = varint(); i += n; }
      else if (wire === 1) i += 8; else if (wire === 5) i += 4; else return false;
    }
    return false;
  };
  const Native = window.WebSocket;
  window.WebSocket = class extends Native {
    constructor(...args) {
      super(...args);
      this.addEventListener('message', (e) => {  // registered before the app's own handler
        if (!(e.data instanceof ArrayBuffer) || e.data.byteLength > 64
            || !isFinished(new Uint8Array(e.data))) return;
        const seen = window.__st.done, t = performance.now();
        setTimeout(() => {
          if (window.__st.done === seen && window.__st.state === 'notRunning') {
            window.__st.batched++;
            finish(t);
          }
        }, 100);
      });
    }
  };
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


# Any URL not served by this machine's own app (ws:// to the app is not routed at all).
_FOREIGN = re.compile(r"^(?!https?://(127\.0\.0\.1|localhost)(:\d+)?/)(?!data:|blob:)")


def new_app_page(browser: Any) -> Any:
    """A page at 1280x1600 in a fresh context (own Streamlit session) that counts script runs.

    Requests to any host but the app's own are refused and recorded (foreign_requests): the app
    runs on closed networks and must not make a viewer's browser call out. Close it with
    `page.context.close()`.
    """
    context = browser.new_context(viewport=VIEWPORT)
    context.foreign_requests = []

    def refuse(route: Any) -> None:
        context.foreign_requests.append(route.request.url)
        route.abort()

    context.route(_FOREIGN, refuse)
    page = context.new_page()
    page.add_init_script(_RUN_COUNTER_JS)
    # The server's own count of finished runs, from the websocket: tells a run that never happened
    # from one the page did not show.
    context.server_runs = 0

    def frame(payload: Any) -> None:
        if isinstance(payload, bytes) and len(payload) < 64 and _is_script_finished(payload):
            context.server_runs += 1

    page.on("websocket", lambda ws: ws.on("framereceived", frame))
    return page


def _is_script_finished(payload: bytes) -> bool:
    from streamlit.proto.ForwardMsg_pb2 import ForwardMsg

    try:
        return ForwardMsg.FromString(payload).WhichOneof("type") == "script_finished"
    except Exception:  # noqa: BLE001 - a frame of another kind
        return False


def server_runs(page: Any) -> int:
    """Script runs the server reported finished to this page's session (script_finished messages)."""
    return page.context.server_runs


def foreign_requests(page: Any) -> list[str]:
    """URLs this page's context asked for from any host but the app's own (refused)."""
    return list(page.context.foreign_requests)


def query_of(page) -> dict[str, str]:
    """The query parameters of the page's current URL."""
    return dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(page.url).query))


def page_url(base: str, path: str, query: dict[str, Any] | None = None) -> str:
    """`base/path?query` with the query URL-encoded."""
    q = urllib.parse.urlencode(query or {}, doseq=True)  # lists: one parameter per item
    return f"{base}/{path}" + (f"?{q}" if q else "")


def wait_for_render(page, figures: int = 0, timeout_s: float = 30.0) -> list[str]:
    """Wait for the run to finish and at least `figures` plotly charts, all drawn; returns the
    charts' settled signatures (figures_now).

    Plotly's component and some widgets load lazily (a skeleton stands in meanwhile): a fast run
    can finish before any chart element exists, so the caller also says how many to expect.
    """
    page.wait_for_selector(_IDLE, timeout=timeout_s * 1000)
    page.wait_for_function(
        """n => { if (document.querySelector('[data-testid=stMain] [data-testid=stSkeleton]'))
                      return false;  // a lazily loaded element is still on its way
                  const cs = [...document.querySelectorAll('[data-testid=stPlotlyChart]')];
                  return cs.length >= n && cs.every(c => {
                      const g = c.querySelector('.js-plotly-plot');
                      return g && Array.isArray(g.data); }); }""",
        arg=figures, timeout=timeout_s * 1000)
    # Plotly redraws a chart after the run's last message: settle on two equal readings.
    deadline = time.monotonic() + timeout_s
    last = figures_now(page)
    while time.monotonic() < deadline:
        page.wait_for_timeout(250)
        now = figures_now(page)
        if now == last:
            return now
        last = now
    raise TimeoutError("figures kept changing")


def open_page(page, base: str, path: str, query: dict[str, Any] | None = None,
              figures: int = 0, timeout_s: float = 60.0) -> float:
    """Cold-load `path?query`, wait until `figures` charts are drawn; returns the seconds taken."""
    t0 = time.perf_counter()
    page.goto(page_url(base, path, query))
    # A run counted since this document loaded, so a previous page's state cannot satisfy it.
    wait_for_run(page, 0, timeout_s)
    wait_for_render(page, figures, timeout_s)
    return time.perf_counter() - t0


def wait_for_run(page, done_before: int, timeout_s: float = 60.0) -> None:
    """Wait until a script run has finished after `done_before` runs had (window.__st.done)."""
    try:
        page.wait_for_function(
            f"window.__st.done > {done_before} && window.__st.state === 'notRunning'",
            timeout=timeout_s * 1000)
    except PlaywrightTimeout:
        raise AssertionError(f"no script run finished within {timeout_s:.0f} s on {page.url} "
                             f"(state {page.evaluate('window.__st')})") from None


def rerun(page, action: Callable[[], Any], figures: int = 0, timeout_s: float = 60.0) -> float:
    """Do `action`, wait for the script run it starts to finish and redraw; returns seconds."""
    before = page.evaluate("window.__st.done")
    t0 = time.perf_counter()
    action()
    wait_for_run(page, before, timeout_s)
    wait_for_render(page, figures, timeout_s)
    return time.perf_counter() - t0


def timed_rerun(page, action: Callable[[], Any], figures: int = 0,
                timeout_s: float = 60.0) -> float:
    """Like rerun(), but returns the in-page milliseconds from the action to the run's end."""
    t0 = page.evaluate("performance.now()")
    rerun(page, action, figures, timeout_s)
    return page.evaluate("window.__st.t") - t0


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
    hint = widget(page, key).get_by_test_id("InputInstructions")
    hint.wait_for(timeout=5000)
    box.press("Enter")
    try:
        hint.wait_for(state="hidden", timeout=3000)
    except PlaywrightTimeout:  # still pending: the widget refused the number, or a re-render
        # raced the key press; press again, as a user would (harmless if refused).
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


# Canonical JSON of a chart's traces and title: keys sorted, plotly's private keys (_...) dropped,
# binary arrays as plain lists. Plotly rewrites gd.data while drawing (key order, decoded
# typed arrays), so the raw JSON of one figure differs from moment to moment.
_FIGURES_JS = """() => {
  const canon = v => {
    if (Array.isArray(v)) return v.map(canon);
    if (ArrayBuffer.isView(v)) return Array.from(v);
    if (v && typeof v === 'object') {
      if (v.bdata !== undefined && v._inputArray) return Array.from(v._inputArray);
      const o = {};
      for (const k of Object.keys(v).sort()) if (!k.startsWith('_')) o[k] = canon(v[k]);
      return o;
    }
    return v;
  };
  // Streamlit's chart theme wraps a title in <b> each time it redraws a kept chart, so the depth
  // of <b><b>... depends on how often it redrew: bold is styling, the signature drops it.
  const title = g => {
    const t = canon((g.layout || {}).title);
    if (t && typeof t.text === 'string') t.text = t.text.replace(/<\\/?b>/g, '');
    return t;
  };
  return [...document.querySelectorAll('[data-testid=stPlotlyChart] .js-plotly-plot')]
    .map(g => JSON.stringify([canon(g.data), title(g)]));
}"""


def figures_now(page) -> list[str]:
    """One canonical JSON signature (traces and title) per plotly chart, in page order."""
    return page.evaluate(_FIGURES_JS)


def figures(page) -> list[str]:
    """The figures' signatures once every chart has finished drawing."""
    return wait_for_render(page)


def table_count(page) -> int:
    """Number of tables (st.dataframe and st.table) on the page."""
    return page.locator("[data-testid=stDataFrame], [data-testid=stTable]").count()


def table_overflow_px(page) -> list[int]:
    """For each drawn table (st.dataframe's grid; none in a closed expander), in page order, how
    many pixels of it lie beyond its width: 0 when no sideways scrolling is needed."""
    return page.evaluate("""() => [...document.querySelectorAll('[data-testid=stDataFrame] .dvn-scroller')]
        .map(s => s.scrollWidth - s.clientWidth)""")


def misaligned_inputs(page) -> list[str]:
    """Labels of drawn number and text inputs whose box sits lower than that of an input at the same
    place (n-th element) in another column of the same st.columns row: a label that wraps pushes
    its box down unless the row aligns at the bottom."""
    return page.evaluate("""() => {
        const out = [], groups = new Map();
        const inputs = '[data-testid=stNumberInput], [data-testid=stTextInput]';
        for (const w of document.querySelectorAll(inputs)) {
            const col = w.closest('[data-testid=stColumn]'), box = w.querySelector('input');
            const rect = box.getBoundingClientRect();
            if (!col || rect.height === 0) continue;  // not in columns, or in a closed expander
            const items = [...col.querySelectorAll('[data-testid=stElementContainer]')]
                .filter(e => e.closest('[data-testid=stColumn]') === col);
            const place = items.indexOf(w.closest('[data-testid=stElementContainer]'));
            const key = [col.closest('[data-testid=stHorizontalBlock]'), place];
            const found = [...groups.keys()].find(k => k[0] === key[0] && k[1] === key[1]);
            if (found) groups.get(found).push([w.innerText.split('\\n')[0], rect.top]);
            else groups.set(key, [[w.innerText.split('\\n')[0], rect.top]]);
        }
        for (const boxes of groups.values()) {
            const top = Math.min(...boxes.map(([, t]) => t));
            out.push(...boxes.filter(([, t]) => t - top > 1).map(([label]) => label));
        }
        return out;
    }""")


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
    agrees with what the settings imply. figures/tables: at least this many on the page. fit_tables:
    the first this many drawn tables fit the page's width (the ones a viewer reads first).
    """

    path: str
    query: dict[str, Any] = field(default_factory=dict)
    change: tuple[str, Any] | None = None
    csv: str | None = None
    csv_columns: tuple[str, ...] = ()
    csv_check: Callable[[Any, dict[str, Any]], bool] | None = None
    figures: int = 0
    tables: int = 0
    fit_tables: int = 0


def _ep_ranks_ok(t, q: dict[str, Any]) -> bool:
    """One row per rank; each token is 1..k pairs (the hash router drops a repeated expert);
    every byte sent off a rank is received by another."""
    pairs = t["load_pairs"].sum()
    return (list(t["rank"]) == list(range(q["ranks"]))
            and q["tokens"] * q["ranks"] <= pairs <= q["tokens"] * q["ranks"] * q["k"]
            and math.isclose(t["sent_off_rank_MB"].sum(), t["received_off_rank_MB"].sum(),
                             rel_tol=1e-9))


def _routing_counts_ok(t, q: dict[str, Any]) -> bool:
    """Per router: every expert once, load/mean averages 1 and is tokens / mean tokens, and the
    load ranks are a permutation of 0..E-1."""
    e = q["E"]
    for _, g in t.groupby("router"):
        if sorted(g["expert"]) != list(range(e)) or sorted(g["load rank"]) != list(range(e)):
            return False
        mean = g["tokens"].mean()
        if mean > 0 and not (math.isclose(g["load/mean"].mean(), 1.0, rel_tol=1e-9)
                             and ((g["load/mean"] - g["tokens"] / mean).abs() < 1e-9).all()):
            return False
    return t["router"].nunique() >= 2


def _scaling_points_ok(t, q: dict[str, Any]) -> bool:
    """Every row of the bundled file, train rows as its split says, residual = ln(y) - ln(fit)."""
    import numpy as np
    import pandas as pd

    data = pd.read_csv(ROOT / "data" / "bnsl_4digit_addition.csv")
    return (len(t) == len(data) and int(t["train"].sum()) == int((data["split"] == "train").sum())
            and sorted(t["x"]) == sorted(data["training_dataset_size"])
            and np.allclose(t["residual"], np.log(t["y"]) - np.log(t["fitted"]), atol=1e-9))


def _attention_rows_ok(t, q: dict[str, Any]) -> bool:
    """TFLOP/s = 4 B H S^2 D / ms, halved when causal, times 1 (forward) or 3.5 (with backward)
    for the whole sweep; rows that did not run say why."""
    ok = t[t["status"] == "ok"]
    flops = 4.0 * ok["batch"] * ok["heads"] * ok["seqlen"] ** 2 * ok["head_dim"]
    flops = flops.where(~ok["causal"].astype(bool), flops / 2)
    factor = ok["tflops"] / (flops / (ok["ms"] * 1e-3) / 1e12)
    failed = t[t["status"] != "ok"]
    return (len(ok) > 0 and any(((factor - f).abs() <= 1e-6 * f).all() for f in (1.0, 3.5))
            and failed["note"].fillna("").str.len().gt(0).all())


def _cost_params_ok(t, q: dict[str, Any]) -> bool:
    """Mixtral 8x7B shapes (d 4096, 32 layers, SwiGLU d_ff 14336, vocab 32000, untied) with E
    experts, k active: three d x d_ff matrices per expert, an E x d router, two embeddings."""
    rows = t.set_index("component")
    expert = 3 * 4096 * 14336 * 32
    return (rows.loc["experts", "total"] == q["experts"] * expert
            and rows.loc["experts", "active"] == q["k"] * expert
            and rows.loc["router", "total"] == q["experts"] * 4096 * 32
            and rows.loc["embeddings", "total"] == 2 * 32000 * 4096)


def _newest_attention_result() -> str:
    """The committed sweep the attention page shows first (newest file name)."""
    from engine.attention_bench import committed_results

    return next(iter(committed_results()), "attention_sweep_none")


# One entry per page in app.py, filled in from each page's widget keys as the pages land.
PAGES: dict[str, PageSpec] = {
    "home": PageSpec("", tables=1),
    "routing": PageSpec(
        "routing", query={"wl": "zipf", "T": 16384, "E": 32, "k": 2, "R": 4, "s": 1.2},
        change=("E", 16), csv="routing_counts.csv",
        csv_columns=("router", "expert", "tokens", "load/mean", "load rank"),
        csv_check=_routing_counts_ok, figures=3, tables=2, fit_tables=2),
    "expert-parallel": PageSpec(
        "expert-parallel",
        # hash router and 4 ranks: the hot-expert sweep under it costs seconds, not tens of them.
        query={"experts": 32, "ranks": 4, "k": 2, "tokens": 1024, "router": "hash", "zipf": 1.2,
               "place": "greedy"},
        change=("ranks", 2), csv="ep_ranks.csv",
        csv_columns=("rank", "experts", "load_pairs", "sent_off_rank_MB",
                     "received_off_rank_MB"),
        csv_check=_ep_ranks_ok, figures=3, tables=2, fit_tables=2),
    # Committed GPU results: figures without timing anything on this machine.
    "attention": PageSpec(
        "attention", query={"src": "Committed GPU results"},
        csv=f"{_newest_attention_result()}.csv",
        csv_columns=("backend", "status", "batch", "heads", "seqlen", "head_dim", "ms", "tflops"),
        csv_check=_attention_rows_ok, figures=1, tables=1),
    "scaling": PageSpec(
        "scaling", query={"src": "bnsl_4digit", "seed": 3}, change=("seed", 4),
        csv="scaling_predictions.csv", csv_columns=("x", "y", "fitted", "residual", "train"),
        csv_check=_scaling_points_ok, figures=3, tables=3, fit_tables=3),
    "cost": PageSpec(
        "cost", query={"preset": "Mixtral 8x7B", "experts": 16, "k": 4}, change=("k", 1),
        csv="cost_params.csv", csv_columns=("component", "total", "active"),
        csv_check=_cost_params_ok, figures=1, tables=2, fit_tables=3),
}
