#!/usr/bin/env bash
# Create ./.venv with torch and this pack (editable) installed. Idempotent.
# TORCH_SPEC picks the torch build: on this project's CPU machines torch==2.13.0 comes from the local disk;
# on a CUDA machine set e.g. TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu124".
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/pip install -q $TORCH_SPEC
fi
if ! .venv/bin/python -c "import sdxl_controlnet_img2img, pytest" 2>/dev/null || [ pyproject.toml -nt .venv/.installed ]; then
  .venv/bin/pip install -q -e ".[test]"
  touch .venv/.installed
fi
