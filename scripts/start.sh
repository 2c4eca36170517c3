#!/usr/bin/env bash
# Sets up .venv if needed and starts the dashboard on http://127.0.0.1:8501 (CPU, generated data).
# Extra arguments go to `streamlit run`, e.g. --server.port 8600.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh requirements.txt
exec .venv/bin/streamlit run app.py "$@"
