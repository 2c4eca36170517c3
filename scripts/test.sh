#!/usr/bin/env bash
# The whole test suite from a fresh machine: Chromium for the browser tests (Debian, as root),
# .venv with the test extras, then pytest. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x /usr/bin/chromium ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver >/dev/null
  else
    echo "note: /usr/bin/chromium missing and not root: browser tests will be skipped" >&2
  fi
fi
bash scripts/setup_env.sh requirements-dev.txt
exec .venv/bin/python -m pytest "$@"
