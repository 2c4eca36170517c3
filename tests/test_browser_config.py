"""Safe defaults, as Streamlit reads .streamlit/config.toml, and as the server acts."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

from engine.scaling_data import MAX_UPLOAD_BYTES
from tests import browser_support as bs

OPTIONS = ("server.address", "server.enableXsrfProtection", "server.maxUploadSize",
           "browser.gatherUsageStats", "client.showErrorDetails", "client.toolbarMode")


@pytest.fixture(scope="module")
def options() -> dict:
    """The effective options, parsed by Streamlit in a fresh process (a misspelt key would leave
    its default, which is exactly what this should catch)."""
    code = ("import json; from streamlit import config; config.get_config_options(); "
            f"print(json.dumps({{k: config.get_option(k) for k in {OPTIONS!r}}}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=bs.ROOT, capture_output=True, text=True,
                         check=True, timeout=60)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_local_only_xsrf_on_no_usage_stats(options):
    assert options["server.address"] == "127.0.0.1"
    assert options["server.enableXsrfProtection"] is True
    assert options["browser.gatherUsageStats"] is False


def test_errors_redacted_and_viewer_toolbar(options):
    """No traceback or source reaches the browser; no developer menu for the room."""
    assert options["client.showErrorDetails"] == "none"
    assert options["client.toolbarMode"] == "viewer"


def test_upload_cap_matches_the_engine(options):
    """The browser refuses what parse_csv would refuse: Streamlit's MB are MiB."""
    assert options["server.maxUploadSize"] * 2**20 == MAX_UPLOAD_BYTES


def test_no_page_renders_raw_html():
    """Nothing a user supplies can become markup: no page turns on unsafe_allow_html."""
    pages = sorted((bs.ROOT / "app_pages").glob("*.py")) + [bs.ROOT / "app.py"]
    assert [p.name for p in pages if "unsafe_allow_html" in p.read_text()] == []


@pytest.mark.browser
def test_upload_without_xsrf_token_is_refused(server):
    """A cross-site form posting a file gets 403: the server checks the XSRF token."""
    req = urllib.request.Request(f"{server}/_stcore/upload_file/session/file", data=b"x",
                                 method="PUT",
                                 headers={"Content-Type": "multipart/form-data; boundary=b"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=10)
    assert err.value.code == 403
