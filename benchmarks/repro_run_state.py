"""Minimal reproduction: a fast Streamlit rerun can leave `data-test-script-state` at 'notRunning'
from start to end, although the server finished the run and the page shows its output.

Writes a three-line app to a temporary folder, serves it on a free port, changes its number input
N times in headless Chromium and counts, per change, the script_finished messages the browser
received (websocket) against the transitions of the attribute seen by a MutationObserver. Prints
how many finished runs never showed 'running'. Needs streamlit and playwright, and Chromium at
--chromium (default /usr/bin/chromium). Context: docs/run_state_batching.md.

    python benchmarks/repro_run_state.py --changes 40
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

APP = '''import streamlit as st

n = st.number_input("n", 0, 10, 0, key="n")
st.write(f"n = {n}")
'''
# Every transition of the attribute to 'notRunning' from another state, in the page itself.
COUNTER = """(() => { window.__runs = 0; const find = new MutationObserver(() => {
  const app = document.querySelector('[data-testid=stApp]'); if (!app) return; find.disconnect();
  new MutationObserver(rs => rs.forEach((r, i) => {
    const next = i + 1 < rs.length ? rs[i + 1].oldValue : app.getAttribute('data-test-script-state');
    if (next === 'notRunning' && r.oldValue !== 'notRunning') window.__runs++;
  })).observe(app, {attributes: true, attributeOldValue: true, attributeFilter: ['data-test-script-state']});
}); find.observe(document, {childList: true, subtree: true}); })();"""


def _finished(payload: bytes) -> bool:
    from streamlit.proto.ForwardMsg_pb2 import ForwardMsg

    try:
        return ForwardMsg.FromString(payload).WhichOneof("type") == "script_finished"
    except Exception:  # noqa: BLE001 - another message kind
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--changes", type=int, default=40, help="number input changes (runs)")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    folder = Path(tempfile.mkdtemp())
    (folder / "app.py").write_text(APP)
    server = subprocess.Popen([sys.executable, "-m", "streamlit", "run", str(folder / "app.py"),
                               "--server.port", str(port), "--server.headless", "true",
                               "--browser.gatherUsageStats", "false"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2)
                break
            except OSError:
                time.sleep(0.3)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=args.chromium, args=["--no-sandbox"])
            page = browser.new_page()
            page.add_init_script(COUNTER)
            finished = [0]
            page.on("websocket", lambda ws: ws.on(
                "framereceived", lambda p: isinstance(p, bytes) and len(p) < 64 and _finished(p)
                and finished.__setitem__(0, finished[0] + 1)))
            page.goto(f"http://127.0.0.1:{port}/")
            page.get_by_text("n = 0").wait_for()
            page.wait_for_timeout(1000)
            box, missed = page.locator("input[type=number]"), 0
            for i in range(args.changes):
                runs, served, value = page.evaluate("window.__runs"), finished[0], (i + 1) % 2
                box.fill(str(value))
                box.press("Enter")
                page.get_by_text(f"n = {value}").wait_for()  # the page shows the run's output
                while finished[0] == served:
                    page.wait_for_timeout(20)
                page.wait_for_timeout(500)
                missed += page.evaluate("window.__runs") == runs
            browser.close()
        print(f"{missed} of {args.changes} runs the server finished (and the page showed) never set "
              "data-test-script-state to 'running'")
    finally:
        server.terminate()


if __name__ == "__main__":
    main()
