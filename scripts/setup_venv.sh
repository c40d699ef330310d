#!/usr/bin/env bash
# Create ./.venv with torch and this pack (editable) installed. Idempotent; says what it does (pip's own progress shows).
# TORCH_SPEC picks the torch build: on this project's CPU machines torch==2.13.0 comes from the local disk;
# on a CUDA machine set e.g. TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu124".
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $PY" >&2
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  echo "setup: installing $TORCH_SPEC (a CUDA build is several GB and takes minutes)" >&2
  .venv/bin/pip install --progress-bar on $TORCH_SPEC >&2
fi
if ! .venv/bin/python -c "import sdxl_controlnet_img2img, pytest" 2>/dev/null || [ pyproject.toml -nt .venv/.installed ]; then
  echo "setup: installing this pack and its dependencies (diffusers, transformers, peft, opencv, fal-client, pytest)" >&2
  .venv/bin/pip install --progress-bar on -e ".[test,browser]" >&2
  touch .venv/.installed
fi
echo "setup: .venv ready" >&2
