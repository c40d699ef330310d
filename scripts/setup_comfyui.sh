#!/usr/bin/env bash
# Set up a real ComfyUI 0.8.0 for the real-ComfyUI tests, outside the tracked files (./.comfyui/, git-ignored):
# the tarball from ../shared/comfyui/ (or COMFYUI_TARBALL) extracted, in a venv of its own with torch 2.14.1 +
# torchvision 0.29.1 (from this machine's disk), ComfyUI's requirements without torch/torchvision/torchaudio, the
# pack's requirements and its redis extra (rq, redis). Idempotent (about 4 minutes the first time, seconds after).
# Prints two lines for the caller to eval: COMFYUI_DIR=... and COMFYUI_PYTHON=...
set -euo pipefail
cd "$(dirname "$0")/.."
TARBALL=${COMFYUI_TARBALL:-../shared/comfyui/ComfyUI-0.8.0.tar.gz}
DEST=${COMFYUI_CACHE:-.comfyui}
PY=${PYTHON:-python3}
if [ ! -f "$DEST/ComfyUI/main.py" ]; then
  [ -f "$TARBALL" ] || { echo "setup_comfyui: no ComfyUI tarball at $TARBALL (set COMFYUI_TARBALL)" >&2; exit 2; }
  echo "setup_comfyui: extracting $TARBALL into $DEST/" >&2
  rm -rf "$DEST/ComfyUI" && mkdir -p "$DEST"
  tar xzf "$TARBALL" -C "$DEST"
fi
if [ ! -f "$DEST/venv/.installed" ] || [ requirements.txt -nt "$DEST/venv/.installed" ]; then
  [ -x "$DEST/venv/bin/python" ] || "$PY" -m venv "$DEST/venv"
  echo "setup_comfyui: installing torch 2.14.1 + torchvision 0.29.1, ComfyUI's and the pack's requirements" >&2
  "$DEST/venv/bin/pip" install -q --progress-bar off torch==2.14.1 torchvision==0.29.1 >&2
  grep -v -E '^(torch|torchvision|torchaudio)\s*$' "$DEST/ComfyUI/requirements.txt" > "$DEST/requirements-no-torch.txt"
  "$DEST/venv/bin/pip" install -q --progress-bar off -r "$DEST/requirements-no-torch.txt" -r requirements.txt >&2
  touch "$DEST/venv/.installed"
fi
# the shared-queue packages (the pack's redis extra): the real-ComfyUI test of ComfyUI as a worker on Redis needs them
if ! "$DEST/venv/bin/python" -c "import rq, redis" 2>/dev/null; then
  echo "setup_comfyui: installing rq and redis (the pack's redis extra) for the shared-queue test" >&2
  "$DEST/venv/bin/pip" install -q --progress-bar off "rq>=2.12" "redis>=5" >&2
fi
echo "COMFYUI_DIR=$(cd "$DEST/ComfyUI" && pwd)"
echo "COMFYUI_PYTHON=$(cd "$DEST/venv/bin" && pwd)/python"
