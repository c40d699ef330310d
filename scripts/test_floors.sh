#!/usr/bin/env bash
# Run the tests with exactly the lowest versions requirements.txt allows (its ">=" read as "=="), in .venv-floors:
# shows that the declared floors work. Takes a few minutes (a fresh venv).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
[ -x .venv-floors/bin/python ] || "$PY" -m venv .venv-floors
.venv-floors/bin/pip install $TORCH_SPEC pytest >&2
.venv-floors/bin/pip install $(sed -n 's/>=/==/p' requirements.txt) >&2
.venv-floors/bin/pip install --no-deps -e . >&2
.venv-floors/bin/pip list 2>/dev/null | grep -iE "^($(sed 's/>=.*//' requirements.txt | tr '\n' '|' | sed 's/|$//' | sed 's/-/[-_]/g')) "
HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 .venv-floors/bin/python -m pytest -q --rootdir=tests "$@"
