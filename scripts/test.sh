#!/usr/bin/env bash
# Set up and run every test: Python (pytest) and the web extension's unit tests (Node's test runner).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_venv.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
status=0
# fal's own JS client (@fal-ai/client, pinned in tests/js/package-lock.json): the JS tests run it, and pytest reads
# its types (test_serve_fal_headers), so it is installed before either
npm ci --prefix tests/js --no-audit --no-fund --loglevel=error || status=$?
# --rootdir=tests: the repository root is the pack's package (it has __init__.py); pytest would import it under the
# clone's folder name, which fails when that name is not a Python identifier (e.g. comfyui-sdxl-controlnet-img2img)
# -rfEs: name every failure, error and skip at the end; --durations: the slowest tests (CI time budget)
.venv/bin/python -m pytest -q -rfEs --durations=25 --rootdir=tests "$@" || status=$?
if ls tests/js/*.test.mjs >/dev/null 2>&1; then
  node --test tests/js/ || status=$?
fi
exit $status
