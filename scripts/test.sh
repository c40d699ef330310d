#!/usr/bin/env bash
# Set up and run every test: Python (pytest) and the web extension's unit tests (Node's test runner).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_venv.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
status=0
.venv/bin/python -m pytest -q "$@" || status=$?
if ls tests/js/*.test.mjs >/dev/null 2>&1; then
  node --test tests/js/ || status=$?
fi
exit $status
