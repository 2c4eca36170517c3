"""Small helpers every page uses: error handling that keeps the last result, downloads, badge,
and the notice for settings of a link that a page could not use.

Not a page: app.py lists the pages explicitly, so this module is never routed to.
"""

from __future__ import annotations

import ast
import contextlib
import gc
import importlib
import json
import logging
import math
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, TypeVar

import pandas as pd
import streamlit as st

from engine.cli import MISSING  # what a table shows for a missing value, here and in the CLI
from engine.validation import relabel

if TYPE_CHECKING:
    import plotly.graph_objects as go

log = logging.getLogger("scalelab")
T = TypeVar("T")


@st.cache_data(show_spinner=False)
def _environment() -> dict[str, str]:
    from engine.env_info import environment

    return environment()


def configure_torch() -> None:
    """One intra-op thread per computation: sessions share a few cores with the server itself.

    Measured on the 2-core reference machine (2026-12-03): the routing page's recompute at defaults
    took 0.7-0.8 s with torch's default 2 threads and 0.32-0.36 s with 1, and concurrent sessions stop
    oversubscribing the CPU. The CLI and benchmarks keep torch's default.
    """
    import torch

    torch.set_num_threads(1)


@st.cache_resource(show_spinner=False)
def warm_up() -> threading.Thread:
    """Once per server: import in the background what every page imports, then freeze the
    imported objects out of the garbage collector's sight (gc.freeze).

    Measured on the 2-core reference machine (busy, 2026-12-03): the scaling lab's first run took
    1.16 s of CPU, mostly importing scipy, and 0.26 s once warmed up; Streamlit's full collection
    after every script run (runner.postScriptGC), which holds the GIL while the run's last messages
    wait to be sent, walked the ~290,000 objects of torch, pandas, scipy and plotly in 0.23-0.37 s
    each time, and in 0.3 ms once they are frozen. The price: cycles among objects alive at the
    freeze (the first session's too) are never collected, a one-time amount.
    """
    thread = threading.Thread(target=_import_pages, name="scalelab-warm-up", daemon=True)
    thread.start()
    return thread


def _import_pages() -> None:
    start = time.perf_counter()
    pages = Path(__file__).parent
    imports = {node.module if isinstance(node, ast.ImportFrom) else alias.name
               for path in sorted(pages.glob("*.py"))
               for node in ast.parse(path.read_text()).body if isinstance(node, (ast.Import, ast.ImportFrom))
               for alias in node.names}
    names = sorted(n for n in imports if n and n.split(".")[0] in ("engine", "plotly", "pandas", "numpy"))
    for name in names:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - the page that needs it will show the error
            log.exception("warm-up import of %s failed", name)
    gc.collect()
    gc.freeze()
    log.info("warm-up: %d modules imported in %.1f s, %d objects frozen", len(names),
             time.perf_counter() - start, gc.get_freeze_count())


def environment_badge() -> None:
    """Sidebar caption with device, the machine's cores and the app's threads, torch and FA3."""
    env = _environment()
    st.sidebar.caption(
        f"**Device** {env['device']}  \n**CPU** {env['cores']} cores; the app computes with "
        f"{env['threads']} thread{'s' if env['threads'] != '1' else ''} per session  \n"
        f"**torch** {env['torch']} (CUDA {env['cuda']})  \n**FA3** {env['fa3']}"
    )


# Streamlit's own query parameters, never a page setting.
_STREAMLIT_PARAMS = ("embed", "embed_options")
_SHOWN_CHARS = 40


def unused_link_settings(requested: Mapping[str, list[str]],
                         values: Mapping[str, Any]) -> list[tuple[str, str, str | None]]:
    """Settings of a link the page did not use: (key, value in the link, value used or None).

    `requested` holds the link's query parameters (all values per key), `values` the widgets'
    values after the page ran (session state, keyed like the parameters). A parameter is used when
    the widget holds the value it names; None as the value used means no widget of this page (with
    these settings) has that key.
    """
    out = []
    for key, raw in requested.items():
        if key.lower() in _STREAMLIT_PARAMS:
            continue
        if key not in values:
            out.append((key, ", ".join(raw), None))
        elif not _link_value_matches(raw, values[key]):
            out.append((key, ", ".join(raw), _shown(values[key])))
    return out


def _link_value_matches(raw: list[str], value: Any) -> bool:
    if isinstance(value, (list, tuple)):  # an empty choice is in the URL as one empty value
        return (raw == [""] and not value) or (len(raw) == len(value)
                                               and all(map(_text_matches, raw, value)))
    return bool(raw) and _text_matches(raw[-1], value)  # a single-value widget takes the last


def _text_matches(text: str, value: Any) -> bool:
    if isinstance(value, bool):
        return text.lower() == str(value).lower()
    if isinstance(value, (int, float)):
        try:
            return math.isclose(float(text), value, rel_tol=1e-12)
        except ValueError:
            return False
    if value is None:
        return text == ""
    return text == str(value)


def _shown(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ", ".join(map(_shown, value))
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def _code(text: str) -> str:
    """Text from a URL as an inline code span: Markdown inside it (links, images) stays text."""
    text = text.replace("`", "'")
    return f"`{text[:_SHOWN_CHARS]}{'...' if len(text) > _SHOWN_CHARS else ''}`"


@contextlib.contextmanager
def link_notice(page_path: str) -> Iterator[None]:
    """Around a page's run (app.py): the first time a session runs a page, say at its top which
    settings of the link it could not use, instead of Streamlit silently dropping them from the URL.

    Widgets bound to the URL (bind="query-params") fall back to their default on a value they
    cannot hold (`E=-5`, `T=abc`, `preset=Nope`) or clamp it; later runs carry the widgets' own
    values, so only a page's first run in a session is checked.
    """
    # The slot exists on every run: elements keep their places in the page, so the browser does
    # not rebuild every widget below it when the notice goes away.
    slot = st.empty()
    if st.session_state.get("_link_checked") == page_path:
        yield
        return
    st.session_state["_link_checked"] = page_path
    requested = {k: st.query_params.get_all(k) for k in st.query_params}
    try:
        yield
    finally:
        unused = unused_link_settings(requested, st.session_state)
        if unused:
            parts = [f"{_code(f'{k}={raw}')} (" + ("not a setting of this page" if used is None
                                                   else f"using {_code(used)}") + ")"
                     for k, raw, used in unused]
            slot.warning("Some settings in the link could not be used: " + "; ".join(parts) + ".",
                         icon=":material/link_off:")


def guarded(key: str, compute: Callable[[], T], names: Mapping[str, str] | None = None) -> T | None:
    """Run `compute`; on bad input show the message and return the last good result for `key`.

    ValueError is the engine's "your input is wrong" signal: shown as is, with the engine's names
    of settings replaced by the page's labels (`names`, e.g. min_segment -> "Min points per
    segment"). Anything else is a bug or a resource failure: logged with its traceback, shown to
    the user as one friendly line.
    """
    slot = _slot(key)
    st.session_state[_refused(key)] = True  # until compute() returns
    try:
        result = compute()
    except ValueError as exc:
        message = relabel(str(exc), names or {})
        # Logged too: whoever runs the demo can see in the server log what was refused.
        log.warning("input refused by %s: %s", key, message)
        st.error(_no_markdown_links(message), icon=":material/error:")
        result = st.session_state.get(slot)
        if result is not None:
            st.caption("Showing the last valid result.")
        return result
    except Exception:  # noqa: BLE001 - the page must stay up in front of a room
        log.exception("page computation %s failed", key)
        st.error("Something went wrong computing this result; it was logged. Try other settings.",
                 icon=":material/error:")
        return st.session_state.get(slot)
    st.session_state[slot] = result
    st.session_state[_refused(key)] = False
    return result


def last_good(key: str) -> Any:
    """The last result `guarded(key, ...)` computed successfully in this session, or None."""
    return st.session_state.get(_slot(key))


def refused(key: str) -> bool:
    """Whether the latest `guarded(key, ...)` of this session failed (and showed the last good)."""
    return st.session_state.get(_refused(key), False)


def _refused(key: str) -> str:
    return f"_refused_{key}"


def _no_markdown_links(text: str) -> str:
    """Escape brackets: messages quote uploaded cells, and st.error renders Markdown, where
    `![](url)` would make every viewer's browser fetch a remote image."""
    return text.replace("[", "\\[").replace("]", "\\]")


def _slot(key: str) -> str:
    return f"_last_good_{key}"


def table(df: pd.DataFrame, formats: dict[str, str] | None = None,
          helps: dict[str, str] | None = None, **kwargs: Any) -> None:
    """st.dataframe in which a missing value reads "–", never "None".

    `formats` maps columns to printf formats ("%.4f"), `helps` to hover texts. A column with gaps,
    or with a %g format and a value of 1e6 or more (the grid's printf writes %g without an
    exponent below 1e21: all 21 digits of Chinchilla's 1e20 FLOPs), is shown as right-aligned text
    in its format (default "%g"); other columns stay numbers with `formats` as their format.
    Downloads keep the numbers (download_buttons takes the frame itself).
    """
    formats, helps = formats or {}, helps or {}
    config = dict(kwargs.pop("column_config", None) or {})
    shown = df.copy()
    for col in df.columns:
        gaps = df[col].isna()
        fmt, hint = formats.get(col), helps.get(col)
        numeric = pd.api.types.is_numeric_dtype(df[col])
        long_g = numeric and (fmt or "").endswith("g") and bool((df[col].abs() >= 1e6).any())
        if numeric and (gaps.any() or long_g):
            shown[col] = [MISSING if m else (fmt or "%g") % v for v, m in zip(df[col], gaps)]
            config.setdefault(col, st.column_config.TextColumn(help=hint, alignment="right"))
            continue
        if gaps.any():
            shown[col] = df[col].astype(object).where(~gaps, MISSING)
        if fmt and not gaps.any():
            config.setdefault(col, st.column_config.NumberColumn(help=hint, format=fmt))
        elif hint:
            config.setdefault(col, st.column_config.Column(help=hint))
    st.dataframe(shown, column_config=config, **kwargs)


def download_buttons(name: str, table: pd.DataFrame, extra: dict[str, Any] | None = None) -> None:
    """CSV and JSON download buttons for one table (`extra` is merged into the JSON document)."""
    c1, c2 = st.columns(2)
    c1.download_button(f"{name}.csv", table.to_csv(index=False).encode(), f"{name}.csv", "text/csv",
                       key=f"dl_csv_{name}", icon=":material/download:", on_click="ignore")
    doc = {"rows": json.loads(table.to_json(orient="records")), **(extra or {})}
    c2.download_button(f"{name}.json", json.dumps(doc, indent=2, default=str).encode(), f"{name}.json",
                       "application/json", key=f"dl_json_{name}", icon=":material/download:",
                       on_click="ignore")


# ---------------------------------------------------------------- figures
# Plotly Express builds a figure through thousands of validated property updates: 0.1-0.5 s per
# chart on the 2-core reference machine, more than a page's own computation. These build the same
# traces as plain dicts and validate them once (go.Figure(dict)): about 10x faster. Above
# WEBGL_POINTS points a chart draws with WebGL (scattergl), which stays smooth with many points.
WEBGL_POINTS = 2000


def _groups(df: pd.DataFrame, color: str | None, order: list | None) -> list[tuple[Any, pd.DataFrame]]:
    if color is None:
        return [(None, df)]
    names = list(order) if order is not None else list(dict.fromkeys(df[color]))
    names += [n for n in dict.fromkeys(df[color]) if n not in names]
    return [(n, df[df[color] == n]) for n in names if (df[color] == n).any()]


def _hover(x: str, y: str, hover: tuple[str, ...], labels: dict[str, str]) -> str:
    rows = [f"{labels.get(x, x)}=%{{x}}", f"{labels.get(y, y)}=%{{y}}"]
    rows += [f"{labels.get(h, h)}=%{{customdata[{i}]}}" for i, h in enumerate(hover)]
    return "<br>".join(rows)


def _figure(traces: list[dict], x: str, y: str, labels: dict[str, str], legend: str | None,
            **layout: Any) -> go.Figure:
    """One go.Figure from plain trace dicts (None values dropped), validated once, with
    Plotly Express's axis titles, legend title and top margin (60 px) unless `layout` says other."""
    import plotly.graph_objects as go

    base = {"xaxis": {"title": {"text": labels.get(x, x)}}, "yaxis": {"title": {"text": labels.get(y, y)}},
            "legend": {"title": {"text": legend or ""}, "tracegroupgap": 0}, "margin": {"t": 60}}
    return go.Figure({"data": [{k: v for k, v in t.items() if v is not None} for t in traces],
                      "layout": {**base, **layout}})


def line_figure(df: pd.DataFrame, x: str, y: str | list[str], color: str | None = None, *,
                markers: bool = False, line_shape: str | None = None, hover: tuple[str, ...] = (),
                labels: dict[str, str] | None = None, order: list | None = None,
                error_y: str | None = None, extra: tuple[dict, ...] = (), **layout: Any) -> go.Figure:
    """Lines of `y` against `x`, one per `color` group (or per column when `y` is a list), like
    px.line; `error_y` names a column of symmetric error bars; `extra` adds plain trace dicts after
    the lines (validated with them, once); `layout` goes to the figure's layout (height, title, ...)."""
    labels = labels or {}
    if isinstance(y, list):  # wide form: one line per column
        df = df.melt(id_vars=[x, *hover], value_vars=y, var_name="variable", value_name="value")
        y, color = "value", "variable"
    groups = _groups(df, color, order)
    gl = sum(len(g) for _, g in groups) > WEBGL_POINTS
    mode = "lines+markers" if markers else "lines"
    traces = [{"type": "scattergl" if gl else "scatter", "mode": mode, "name": str(name) if name is not None else "",
               "legendgroup": str(name), "showlegend": name is not None, "x": g[x].to_numpy(),
               "y": g[y].to_numpy(), "line": {"shape": line_shape} if line_shape else {},
               "error_y": {"type": "data", "array": g[error_y].to_numpy()} if error_y else None,
               "customdata": g[list(hover)].to_numpy() if hover else None,
               "hovertemplate": _hover(x, y, hover, labels) + "<extra>%{fullData.name}</extra>"}
              for name, g in groups]
    return _figure(traces + list(extra), x, y, labels, labels.get(color, color), **layout)


def bar_figure(df: pd.DataFrame, x: str, y: str, color: str | None = None, *, barmode: str = "relative",
               hover: tuple[str, ...] = (), labels: dict[str, str] | None = None, order: list | None = None,
               text_format: str | None = None, **layout: Any) -> go.Figure:
    """Bars of `y` at each `x`, one trace per `color` group, like px.bar (`text_format`, e.g. '.1f',
    writes each value on its bar); `layout` goes to the figure's layout."""
    labels = labels or {}
    traces = [{"type": "bar", "name": str(name) if name is not None else "", "showlegend": name is not None,
               "x": g[x].to_numpy(), "y": g[y].to_numpy(),
               "customdata": g[list(hover)].to_numpy() if hover else None,
               "texttemplate": f"%{{y:{text_format}}}" if text_format else None,
               "hovertemplate": _hover(x, y, hover, labels) + "<extra>%{fullData.name}</extra>"}
              for name, g in _groups(df, color, order)]
    return _figure(traces, x, y, labels, labels.get(color, color), barmode=barmode, **layout)
