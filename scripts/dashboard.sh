#!/usr/bin/env bash
# Install everything and start the dashboard (embedded worker; random weights work offline).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/streamlit run app/main.py "$@"
