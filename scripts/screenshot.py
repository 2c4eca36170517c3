"""Start the dashboard and screenshot pages in headless Chromium, for a human to look at.

    python scripts/screenshot.py home "routing?experts=64" --out artifacts/
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.browser_support import launch_browser, new_app_page, open_page, streamlit_server  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pages", nargs="+", help="URL paths with optional query, e.g. routing?k=2")
    parser.add_argument("--out", type=Path, default=Path("artifacts"))
    parser.add_argument("--wait", type=float, default=60.0, help="seconds to wait for a script run")
    parser.add_argument("--figures", type=int, default=0, help="plotly charts to wait for")
    parser.add_argument("--height", type=int, default=1600,
                        help="viewport height in px (Streamlit scrolls inside the page, so a "
                             "full-page screenshot shows only what a taller viewport holds)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with streamlit_server() as base, launch_browser() as browser:
        for path in args.pages:
            page = new_app_page(browser)  # its own session
            page.set_viewport_size({"width": 1280, "height": args.height})
            open_page(page, base, path, figures=args.figures, timeout_s=args.wait)
            out = args.out / (re.sub(r"[^A-Za-z0-9_-]+", "_", path).strip("_") + ".png")
            page.screenshot(path=str(out), full_page=True)
            print(out)
            page.context.close()


if __name__ == "__main__":
    main()
