"""Small helpers every page uses: error handling that keeps the last result, downloads, badge.

Not a page: app.py lists the pages explicitly, so this module is never routed to.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Callable, TypeVar

import pandas as pd
import streamlit as st

log = logging.getLogger("scalelab")
T = TypeVar("T")


@st.cache_data(show_spinner=False)
def _environment() -> dict[str, str]:
    from engine.env_info import environment

    return environment()


def configure_torch() -> None:
    """One intra-op thread per computation: sessions share a few cores with the server itself.

    Measured on the 2-core reference machine: the routing page's recompute at defaults took
    0.7-0.8 s with torch's default 2 threads and 0.32-0.36 s with 1, and concurrent sessions stop
    oversubscribing the CPU. The CLI and benchmarks keep torch's default.
    """
    import torch

    torch.set_num_threads(1)


def environment_badge() -> None:
    """Sidebar caption with device, torch and FA3 provider."""
    env = _environment()
    st.sidebar.caption(
        f"**Device** {env['device']}  \n**torch** {env['torch']} (CUDA {env['cuda']})  \n"
        f"**FA3** {env['fa3']}"
    )


def guarded(key: str, compute: Callable[[], T]) -> T | None:
    """Run `compute`; on bad input show the message and return the last good result for `key`.

    ValueError is the engine's "your input is wrong" signal: shown as is. Anything else is a bug or
    a resource failure: logged with its traceback, shown to the user as one friendly line.
    """
    slot = _slot(key)
    st.session_state[_refused(key)] = True  # until compute() returns
    try:
        result = compute()
    except ValueError as exc:
        # Logged too: whoever runs the demo can see in the server log what was refused.
        log.warning("input refused by %s: %s", key, exc)
        st.error(_no_markdown_links(str(exc)), icon=":material/error:")
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


def download_buttons(name: str, table: pd.DataFrame, extra: dict[str, Any] | None = None) -> None:
    """CSV and JSON download buttons for one table (`extra` is merged into the JSON document)."""
    c1, c2 = st.columns(2)
    c1.download_button(f"{name}.csv", table.to_csv(index=False).encode(), f"{name}.csv", "text/csv",
                       key=f"dl_csv_{name}", icon=":material/download:", on_click="ignore")
    doc = {"rows": json.loads(table.to_json(orient="records")), **(extra or {})}
    c2.download_button(f"{name}.json", json.dumps(doc, indent=2, default=str).encode(), f"{name}.json",
                       "application/json", key=f"dl_json_{name}", icon=":material/download:",
                       on_click="ignore")
