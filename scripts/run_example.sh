#!/usr/bin/env bash
# Set up and run the main job: the documented default request (workflows/requests/default.json),
# writing images and result.json to ./output (an earlier result there is kept; the new one goes to output/run_NNN).
#
#   bash scripts/run_example.sh                             # tiny offline random-weight models (built into .tiny-models/)
#   bash scripts/run_example.sh CHECKPOINT CONTROLNET       # real weights: SDXL base + SDXL Canny ControlNet
#   bash scripts/run_example.sh [CHECKPOINT CONTROLNET] --format jpeg --dtype fp16 ...   # any `generate` option after them
#   bash scripts/run_example.sh --help                      # this text and every `generate` option
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--help" ] || [ "${1:-}" = "-h" ]; then
  sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'
  bash scripts/setup_venv.sh run >/dev/null 2>&1
  exec .venv/bin/python -m sdxl_controlnet_img2img generate --help
fi
# model paths: the leading arguments that are not options (none, or both)
models=()
while [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; do models+=("$1"); shift; done
if [ ${#models[@]} -eq 1 ] || [ ${#models[@]} -gt 2 ]; then
  echo "error: give both CHECKPOINT and CONTROLNET (or neither, for the tiny offline models); got: ${models[*]}" >&2
  echo "       bash scripts/run_example.sh --help   shows how" >&2
  exit 2
fi
bash scripts/setup_venv.sh run   # only what running needs (no pytest/playwright)
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
if [ ${#models[@]} -eq 2 ]; then
  CHECKPOINT=${models[0]}; CONTROLNET=${models[1]}
else
  echo "no weights given: using tiny random-weight models (the pictures will be noise-like; pass CHECKPOINT CONTROLNET for real ones)" >&2
  .venv/bin/python -m sdxl_controlnet_img2img make-tiny-models --out .tiny-models >/dev/null
  CHECKPOINT=.tiny-models/tiny-sdxl; CONTROLNET=.tiny-models/tiny-controlnet-canny
fi
exec .venv/bin/python -m sdxl_controlnet_img2img generate \
  --request workflows/requests/default.json --checkpoint "$CHECKPOINT" --controlnet "$CONTROLNET" --out output "$@"
