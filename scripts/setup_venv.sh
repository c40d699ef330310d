#!/usr/bin/env bash
# Create ./.venv with torch and this pack (editable) installed. Idempotent; says what it does (pip's own progress shows).
#
#   bash scripts/setup_venv.sh        # for the tests (scripts/test.sh, CI): the pack with its test, browser and redis extras
#   bash scripts/setup_venv.sh run    # for running only (scripts/run_example.sh): the pack, without pytest/playwright
#
# TORCH_SPEC picks the torch build: on this project's CPU machines torch==2.13.0 comes from the local disk;
# on a CUDA machine set e.g. TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu124".
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
case "${1:-test}" in
  test) target=".[test,browser,redis]"; check="import sdxl_controlnet_img2img, pytest, rq"; stamp=.venv/.installed
        what="this pack, its dependencies (diffusers, transformers, peft, opencv, fal-client), the test tools (pytest, playwright) and the shared queue's (rq, redis)" ;;
  run)  target="."; check="import sdxl_controlnet_img2img"; stamp=.venv/.installed-run
        what="this pack and its dependencies (diffusers, transformers, peft, opencv, fal-client)" ;;
  *) echo "usage: bash scripts/setup_venv.sh [test|run]" >&2; exit 2 ;;
esac
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $PY" >&2
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  echo "setup: installing $TORCH_SPEC (a CUDA build is several GB and takes minutes)" >&2
  .venv/bin/pip install --progress-bar on $TORCH_SPEC >&2
fi
# a test setup is also a run setup: either stamp, newer than pyproject.toml, means the pack is installed
newest_stamp=$stamp
[ "$stamp" = .venv/.installed-run ] && [ .venv/.installed -nt .venv/.installed-run ] && newest_stamp=.venv/.installed
if ! .venv/bin/python -c "$check" 2>/dev/null || [ pyproject.toml -nt "$newest_stamp" ]; then
  echo "setup: installing $what" >&2
  .venv/bin/pip install --progress-bar on -e "$target" >&2
  touch "$stamp"
fi
echo "setup: .venv ready" >&2
