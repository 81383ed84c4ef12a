#!/usr/bin/env bash
# Create .venv and install vitlens with its pinned dependencies ("dev" adds the test tools).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
requirements=requirements.txt
[ "${1:-}" = dev ] && requirements=requirements-dev.txt
.venv/bin/python -m pip install -q --disable-pip-version-check -r "$requirements"
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
