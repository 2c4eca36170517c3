"""How fast every page answers in a real browser, on this machine.

    .venv/bin/python benchmarks/bench_pages.py [--changes 8] [--pages routing,cost] [--json]
        [--baseline ../other-checkout] [--profile]

Starts `streamlit run app.py` on a free port and drives each page in headless Chromium
(tests/browser_support.py). Per page it prints:
- first render: a new browser context (empty cache, new session) opening the page at its defaults;
  seconds from navigation start to the page's last DOM change once the run has finished and every
  chart is drawn and settled (in-page clock, as for a widget change); `wall` is the same seen from
  Python, which adds up to a settle poll (250 ms) on top. Where it goes: `ws` the websocket open
  (Streamlit's JavaScript loaded and started), `run end` the script run's end as the browser saw
  it, `busy` the browser's main thread in long tasks (> 50 ms: parsing, React, plotly drawing),
  `lcp` the largest contentful paint (web vitals' loading metric, "good" at <= 2.5 s: the largest
  text block or image drawn; a chart's SVG or canvas is not a candidate, so it marks the page's text
  standing, not its charts drawn);
  the very first page after the server starts is shown apart (`cold server`), as it also imports
  torch and streamlit's own modules; `no charts` opens the page once more in a new context that
  refuses Streamlit's plotly module (the page then draws no chart): what the page costs without it;
- widget to settled: one widget changed `--changes` times at the defaults, each to a value not seen
  before (no cache hit), from the user's key press or click to the last change of the page's DOM;
  median and p95 (nearest rank), and the server's CPU seconds per change (median; /proc, so
  less sensitive to other load than the wall times). /training's widget is the committed results'
  balance metric (its Train here inputs only set up a run);
- payload: bytes of each plotly figure's spec as sent over the websocket (first render; pages that
  draw none at first, those of the changes), and all bytes the browser received per change;
- with --baseline DIR: a second checkout served at the same time, each page measured on both in
  turn, and the ratios baseline / this tree;
- with --profile: each page's first render once more in a new context under Chromium's sampling
  profiler, the main thread's time by script file (plotly's chart module, React, ...), by `(idle)`
  (waiting for the server) and by `(program)` (the browser's own work: parsing, style, layout);
  the profiler slows the page, so these are shares, not the first render's figure;
- from home / from lab: how a viewer reaches a page once the app is open. A fresh context opens
  Home (or a lab with charts: /routing, /cost for /routing itself), then the page's sidebar link is
  clicked: click to settled page. From Home plotly's module still loads then, from a lab it has;
- figure build: the routing page's main figure built with Plotly Express and with
  app_pages._ui.line_figure, alternating in one run (median ms and their ratio).
Targets (issue 18): median <= 1.0 s, p95 <= 2 s, first render <= 2.5 s. The machine's load
(`uptime`, before and after) is printed with the figures: other work on the machine slows every
number here, the browser's share most (it is single-threaded and renders in software).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests import browser_support as bs  # noqa: E402

# Page path -> (widget key, values it takes in turn). Each value is new to the session, so every
# change recomputes; the first page ('' = Home) has no widget.
CHANGES: dict[str, tuple[str, tuple] | None] = {
    "": None,
    "routing": ("s", (1.05, 1.1, 1.15, 1.2, 1.25, 1.3, 1.35, 1.4, 1.45, 1.5)),
    "expert-parallel": ("seed", tuple(range(1, 11))),
    "attention": ("src", ("Run here", "Committed GPU results") * 5),  # a CPU opens on the latter
    "scaling": ("seed", tuple(range(1, 11))),
    "cost": ("k", (1, 3, 4, 5, 6, 7, 8, 2, 1, 3)),
    "training": ("gpu_metric", ("MaxVio (max over layers)", "drop rate (capacity)",
                                "aux loss (sum over layers)", "DeepSeek bias spread (max - min)",
                                "training tokens/s", "CV of tokens per expert (mean over layers)") * 2),
}
# The lab a page is reached from in `from lab` (plotly's module loaded), and for that lab itself.
LAB, LAB_2 = "routing", "cost"
# Clicked before the first change: the tab that holds the widget.
TABS = {"training": "Committed GPU results"}

# Streamlit's lazily loaded plotly chart component (4.6 MB in 1.67), by file name.
PLOTLY_MODULE = "PlotlyChart.*.js"
# In-page (ms since navigation start): the user's last key press or click, the DOM's last change,
# the websocket's opening, the main thread's long tasks, and the largest contentful paint.
_INPUT_JS = """
(() => {
  const B = window.__bench = {input: 0, mutation: 0, ws: null, busy: 0, lcp: null};
  const mark = () => { B.input = performance.now(); };
  addEventListener('keydown', mark, true);
  addEventListener('mousedown', mark, true);
  new MutationObserver(() => { B.mutation = performance.now(); })
    .observe(document, {subtree: true, childList: true, attributes: true, characterData: true});
  const WS = window.WebSocket;
  window.WebSocket = function (...args) {
    const ws = new WS(...args);
    ws.addEventListener('open', () => { if (B.ws === null) B.ws = performance.now(); });
    return ws;
  };
  window.WebSocket.prototype = WS.prototype;
  Object.assign(window.WebSocket, WS);
  new PerformanceObserver(list => list.getEntries().forEach(e => { B.busy += e.duration; }))
    .observe({type: 'longtask', buffered: true});
  new PerformanceObserver(list => list.getEntries().forEach(e => { B.lcp = e.startTime; }))
    .observe({type: 'largest-contentful-paint', buffered: true});
})();
"""


@dataclass
class PageResult:
    """One page's figures (seconds, bytes)."""

    page: str
    first_render_s: float
    first_render_wall_s: float | None = None
    websocket_open_s: float | None = None
    first_run_end_s: float | None = None
    first_render_busy_s: float | None = None
    first_render_lcp_s: float | None = None  # largest contentful paint (web vitals)
    first_render_no_charts_s: float | None = None
    from_home_s: float | None = None
    from_lab_s: float | None = None  # from another lab with charts (LAB, or LAB_2 for LAB itself)
    redraw_median_s: float | None = None
    redraw_p95_s: float | None = None
    redraws_s: list[float] = field(default_factory=list)
    server_cpu_per_change_s: float | None = None
    widget: str | None = None
    figure_bytes: list[int] = field(default_factory=list)
    figure_bytes_changes: list[int] = field(default_factory=list)
    received_bytes_per_change: int | None = None


class Wire:
    """Counts what the server sends one page: all websocket bytes, and plotly specs by size."""

    def __init__(self, page) -> None:
        self.received = 0
        self.figures: list[int] = []
        self.finished = 0  # script runs the server finished, fragment runs included
        page.on("websocket", lambda ws: ws.on("framereceived", self._frame))

    def _frame(self, payload) -> None:
        from streamlit.proto.ForwardMsg_pb2 import ForwardMsg

        data = payload if isinstance(payload, bytes) else payload.encode()
        self.received += len(data)
        try:
            msg = ForwardMsg.FromString(data)
        except Exception:  # noqa: BLE001 - not every frame is a ForwardMsg we can read
            return
        self.finished += msg.WhichOneof("type") == "script_finished"
        if msg.WhichOneof("type") == "delta" and msg.delta.WhichOneof("type") == "new_element":
            el = msg.delta.new_element
            if el.WhichOneof("type") == "plotly_chart":
                self.figures.append(len(el.plotly_chart.spec.encode()))

    def reset(self) -> None:
        self.received, self.figures = 0, []


def _server_cpu_s(port: str) -> float:
    """CPU seconds used so far by the Streamlit server listening on `port` (Linux /proc)."""
    for cmd in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmd.read_bytes().split(b"\0")
            if b"streamlit" in b" ".join(args) and port.encode() in args:
                fields = (cmd.parent / "stat").read_text().rsplit(")", 1)[1].split()
                return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except OSError:
            continue
    raise RuntimeError(f"no streamlit server on port {port}")


def wait_server_idle(base: str, timeout_s: float = 60.0) -> float:
    """Wait until the server used under 5 % of a core for a second (it imports every page's
    modules in the background after its first page); returns the seconds waited."""
    port, t0 = base.rsplit(":", 1)[1], time.perf_counter()
    last = _server_cpu_s(port)
    while time.perf_counter() - t0 < timeout_s:
        time.sleep(1.0)
        now = _server_cpu_s(port)
        if now - last < 0.05:
            break
        last = now
    return time.perf_counter() - t0


@contextlib.contextmanager
def _server_at(root: Path):
    """bs.streamlit_server for the app checked out at `root`."""
    with contextlib.ExitStack() as stack:
        here, bs.ROOT = bs.ROOT, root.resolve()  # the server's working directory, read at its start
        try:
            base = stack.enter_context(bs.streamlit_server())
        finally:
            bs.ROOT = here
        yield base


def _cold(browser, base: str, path: str) -> float:
    """The server's first page (it imports torch and streamlit's own modules): seconds, wall."""
    page = bs.new_app_page(browser)
    try:
        return bs.open_page(page, base, path)
    finally:
        page.context.close()


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def _p95(xs: list[float]) -> float:
    return sorted(xs)[max(0, math.ceil(0.95 * len(xs)) - 1)]


def _input_to_settled_s(page) -> float:
    """Seconds from the user's last key press or click to the DOM's last change or run end."""
    t = page.evaluate("[window.__bench.input, window.__bench.mutation, window.__st.t]")
    return (max(t[1], t[2]) - t[0]) / 1000


def _settled_change(page, wire: Wire, key: str, value, timeout_s: float = 60.0) -> float:
    """Change widget `key` to `value`; seconds from the input event to the DOM's last change."""
    # Counted from the server's script_finished messages, which a fragment's rerun (a chart's own
    # control) also ends with.
    runs = wire.finished
    bs.set_widget(page, key, value)
    deadline = time.monotonic() + timeout_s
    while wire.finished <= runs:
        if time.monotonic() > deadline:
            raise AssertionError(f"no script run finished within {timeout_s:.0f} s on {page.url}")
        page.wait_for_timeout(20)
    bs.wait_for_render(page)
    return _input_to_settled_s(page)


def _first_render_no_charts(browser, base: str, path: str) -> float:
    """First render in a fresh context whose browser is refused plotly's chart module (seconds)."""
    page = bs.new_app_page(browser)
    page.add_init_script(_INPUT_JS)
    page.context.route(f"**/{PLOTLY_MODULE}", lambda route: route.abort())
    try:
        bs.open_page(page, base, path)
        return max(page.evaluate("[window.__bench.mutation, window.__st.t]")) / 1000
    finally:
        page.context.close()


def switch_page(browser, base: str, start: str, path: str, timeout_s: float = 60.0) -> float:
    """How a viewer reaches a page once the app is open: in a fresh context, open `start`, then
    click the page's sidebar link; seconds from the click to the DOM's last change once the run has
    finished and every chart is drawn. From Home (which draws no chart) plotly's module still loads
    then; from a lab with charts it is already loaded, as for every lab after a tab's first."""
    page = bs.new_app_page(browser)
    page.add_init_script(_INPUT_JS)
    try:
        bs.open_page(page, base, start)
        link = page.get_by_test_id("stSidebarNav").locator(f'a[href$="/{path}"]')
        before = page.evaluate("window.__st.done")
        link.click()
        bs.wait_for_run(page, before, timeout_s)
        bs.wait_for_render(page, timeout_s=timeout_s)
        return _input_to_settled_s(page)
    finally:
        page.context.close()


def profile_first_render(browser, base: str, path: str, top: int = 6) -> dict[str, float]:
    """Seconds of the main thread by script file (and idle, program, GC) over a first render in a
    fresh context, from Chromium's sampling profiler (CDP Profiler); the `top` largest, and `total`."""
    page = bs.new_app_page(browser)
    try:
        cdp = page.context.new_cdp_session(page)
        cdp.send("Profiler.enable")
        cdp.send("Profiler.setSamplingInterval", {"interval": 500})  # microseconds
        cdp.send("Profiler.start")
        bs.open_page(page, base, path)
        prof = cdp.send("Profiler.stop")["profile"]
    finally:
        page.context.close()
    frames = {n["id"]: n["callFrame"] for n in prof["nodes"]}
    spent: dict[str, float] = {}
    # timeDeltas[i] is the time before sample i: sample i lasted until sample i + 1.
    for node, dt in zip(prof["samples"], prof["timeDeltas"][1:] + [0]):
        f = frames[node]
        name = f["url"].rsplit("/", 1)[-1].split("?")[0] or f["functionName"] or "(native)"
        spent[name] = spent.get(name, 0.0) + dt / 1e6
    shown = dict(sorted(spent.items(), key=lambda kv: -kv[1])[:top])
    return {**shown, "total": sum(spent.values())}


def measure_page(browser, base: str, path: str, changes: int) -> PageResult:
    """First render in a fresh context (and without charts), then `changes` widget changes with
    their payloads."""
    no_charts = _first_render_no_charts(browser, base, path)
    from_home = switch_page(browser, base, "", path) if path else None
    from_lab = switch_page(browser, base, LAB if path != LAB else LAB_2, path) if path else None
    page = bs.new_app_page(browser)
    page.add_init_script(_INPUT_JS)
    wire = Wire(page)
    try:
        wall = bs.open_page(page, base, path)
        b = page.evaluate("[window.__bench.mutation, window.__st.t, window.__bench.ws, window.__bench.busy, "
                          "window.__bench.lcp]")
        res = PageResult(path or "home", max(b[0], b[1]) / 1000, wall, b[2] and b[2] / 1000,
                         b[1] / 1000, b[3] / 1000, b[4] and b[4] / 1000, no_charts, from_home, from_lab,
                         figure_bytes=list(wire.figures))
        spec = CHANGES.get(path)
        if spec is None:
            return res
        key, values = spec
        if path in TABS:
            page.get_by_role("tab", name=TABS[path]).click()
        wire.reset()
        res.widget = key
        port, cpu = base.rsplit(":", 1)[1], []
        for v in values[:changes]:
            before = _server_cpu_s(port)
            res.redraws_s.append(_settled_change(page, wire, key, v))
            cpu.append(_server_cpu_s(port) - before)
        res.server_cpu_per_change_s = statistics.median(cpu)
        res.redraw_median_s = statistics.median(res.redraws_s)
        res.redraw_p95_s = _p95(res.redraws_s)
        res.received_bytes_per_change = wire.received // len(res.redraws_s)
        res.figure_bytes_changes = list(wire.figures)
        assert not bs.exceptions(page), (path, bs.exceptions(page))
        return res
    finally:
        page.context.close()


def figure_build_ms(rounds: int = 15) -> dict[str, float]:
    """Median ms to build the routing page's tokens-per-expert figure (7 routers x 64 experts) with
    Plotly Express and with _ui.line_figure, alternating in one run; and their ratio."""
    import numpy as np
    import pandas as pd
    import plotly.express as px

    from app_pages._ui import line_figure

    rng = np.random.default_rng(0)
    df = pd.DataFrame({"router": np.repeat([f"router {i}" for i in range(7)], 64),
                       "load rank": np.tile(np.arange(64), 7), "expert": rng.permutation(448),
                       "tokens": rng.integers(0, 4000, 448), "load/mean": rng.random(448) * 3})

    def with_px() -> None:
        px.line(df, x="load rank", y="load/mean", color="router", line_shape="hv",
                hover_data=["expert", "tokens"]).update_layout(height=420)

    def with_ui() -> None:
        line_figure(df, "load rank", "load/mean", "router", line_shape="hv", hover=("expert", "tokens"),
                    height=420)

    times: dict[str, list[float]] = {"px": [], "ui": []}
    for i in range(rounds):
        for name, fn in (("px", with_px), ("ui", with_ui))[:: 1 if i % 2 else -1]:
            t = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t) * 1e3)
    px_ms, ui_ms = statistics.median(times["px"]), statistics.median(times["ui"])
    return {"px_ms": px_ms, "ui_ms": ui_ms, "px_over_ui": px_ms / ui_ms}


def main() -> None:
    """Run every page of app.py and print (or --json) the figures."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--changes", type=int, default=8, help="widget changes per page (>= 5)")
    ap.add_argument("--pages", default=",".join(p or "home" for p in CHANGES),
                    help="comma-separated url paths (home for the default page)")
    ap.add_argument("--json", action="store_true", help="print one JSON document")
    ap.add_argument("--baseline", help="another checkout of the app (e.g. main's) to measure beside this one")
    ap.add_argument("--profile", action="store_true",
                    help="also profile each page's first render: the main thread's seconds by script file")
    args = ap.parse_args()
    if not 5 <= args.changes <= 10:
        ap.error("--changes must be 5..10")
    paths = ["" if p == "home" else p for p in args.pages.split(",")]
    uptime_before = _uptime()
    with contextlib.ExitStack() as stack:
        base = stack.enter_context(bs.streamlit_server())
        other = stack.enter_context(_server_at(Path(args.baseline))) if args.baseline else None
        browser = stack.enter_context(bs.launch_browser())
        cold_s = _cold(browser, base, paths[0])
        if other:
            _cold(browser, other, paths[0])
        idle_s = wait_server_idle(base)
        results, baseline = [], []
        for i, p in enumerate(paths):
            # Alternating which tree goes first, so neither always meets the other's leftovers.
            for b in ((base, other) if i % 2 else (other, base)):
                if b is not None:
                    (results if b == base else baseline).append(measure_page(browser, b, p, args.changes))
        profiles = {p or "home": profile_first_render(browser, base, p) for p in paths} if args.profile else {}
    build = figure_build_ms()
    doc = {"pages": [asdict(r) for r in results], "cold_server_first_render_s": cold_s,
           "server_idle_after_s": idle_s,
           "figure_build": build, "first_render_profiles": profiles,
           "cold_server_page": paths[0] or "home",
           "uptime_before": uptime_before, "uptime": _uptime(), "cpus": os.cpu_count(),
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if args.baseline:
        doc["baseline"] = {"root": str(Path(args.baseline).resolve()), "pages": [asdict(r) for r in baseline]}
    if args.json:
        print(json.dumps(doc, indent=2))
        return
    print(f"{doc['date']} · {doc['cpus']} CPUs · before: {uptime_before}\n"
          f"{' ' * len(doc['date'])} · after:  {doc['uptime']}")
    print(f"cold server, first page ({doc['cold_server_page']}): {cold_s:.2f} s; the server then "
          f"went idle (background imports done) {idle_s:.1f} s later, before the pages below")
    print(f"figure build (routing counts, 448 points), median of alternating rounds: Plotly Express "
          f"{build['px_ms']:.0f} ms, _ui.line_figure {build['ui_ms']:.0f} ms, ratio {build['px_over_ui']:.1f}x")
    print(f"{'page':16} {'first render':>12} {'(wall':>6} {'ws':>5} {'run end':>7} {'busy':>5} {'lcp)':>5} "
          f"{'no charts':>9} {'from home':>9} {'from lab':>8} {'redraw median':>14} {'p95':>6}  {'widget':10} {'figure bytes':>28} {'bytes/change':>12}")
    for r in results:
        med = f"{r.redraw_median_s:.2f}" if r.redraw_median_s is not None else "-"
        p95 = f"{r.redraw_p95_s:.2f}" if r.redraw_p95_s is not None else "-"
        home = f"{r.from_home_s:.2f}" if r.from_home_s is not None else "-"
        lab = f"{r.from_lab_s:.2f}" if r.from_lab_s is not None else "-"
        # The figures of the first render; pages that draw none at first, those of the changes.
        figs = ",".join(f"{b / 1024:.0f}k" for b in r.figure_bytes or r.figure_bytes_changes[:4]) or "-"
        per = f"{r.received_bytes_per_change / 1024:.0f}k" if r.received_bytes_per_change else "-"
        print(f"{r.page:16} {r.first_render_s:12.2f} {r.first_render_wall_s:6.2f} "
              f"{r.websocket_open_s or 0:5.2f} {r.first_run_end_s:7.2f} {r.first_render_busy_s:5.2f} "
              f"{r.first_render_lcp_s or 0:5.2f} "
              f"{r.first_render_no_charts_s:9.2f} {home:>9} {lab:>8} {med:>14} {p95:>6}  {r.widget or '-':10} {figs:>28} {per:>12}")
    print(f"{'':16} server CPU s per change: " + ", ".join(
        f"{r.page} {r.server_cpu_per_change_s:.3f}" for r in results if r.server_cpu_per_change_s is not None))
    for name, prof in profiles.items():
        print(f"profile {name:15} {prof['total']:5.2f} s: " + ", ".join(
            f"{k} {v:.2f}" for k, v in prof.items() if k != "total"))
    if args.baseline:
        print(f"baseline {doc['baseline']['root']}, same run, pages in turn; ratios baseline / this tree:")
        print(f"{'page':16} {'first render':>12} {'ratio':>6} {'redraw median':>14} {'ratio':>6} "
              f"{'server CPU/change':>18} {'ratio':>6}")
        for r, o in zip(results, baseline):
            row = f"{o.page:16} {o.first_render_s:12.2f} {o.first_render_s / r.first_render_s:6.2f}"
            if r.redraw_median_s is not None:
                row += (f" {o.redraw_median_s:14.2f} {o.redraw_median_s / r.redraw_median_s:6.2f} "
                        f"{o.server_cpu_per_change_s:18.3f} "
                        f"{o.server_cpu_per_change_s / max(r.server_cpu_per_change_s, 1e-3):6.2f}")
            print(row)
    print("first render: navigation start to the last DOM change (in-page); wall: the same from "
          "Python, with the settle poll; ws: websocket open; run end: the first script run's end; "
          "busy: the browser's main thread in long tasks; lcp: the largest contentful paint (web "
          "vitals' loading metric: the largest text block or image drawn; plotly's SVG and canvas are "
          "not candidates, so it is when the page's text stands, before its charts); no charts: the first render with plotly's "
          "module refused; from home: Home opened first, then the page's sidebar link clicked, "
          f"click to settled page; from lab: the same from /{LAB} (/{LAB_2} for /{LAB}), whose charts "
          "have loaded plotly's module. Seconds.")


if __name__ == "__main__":
    main()
