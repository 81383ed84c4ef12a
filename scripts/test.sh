#!/usr/bin/env bash
# Install everything (virtualenv, Python packages, Debian chromium for the browser test) and run the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh dev
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
      || echo "warning: could not install chromium; the browser test will be skipped"
  else
    echo "warning: chromium is missing and this is not root; the browser test will be skipped"
  fi
fi
exec .venv/bin/python -m pytest "$@"
