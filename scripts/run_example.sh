#!/usr/bin/env bash
# Set up and run the main job: the documented default request (workflows/requests/default.json),
# writing images and result.json to ./output.
#   bash scripts/run_example.sh                          # tiny offline random-weight models (built into .tiny-models/)
#   bash scripts/run_example.sh CHECKPOINT CONTROLNET    # real weights: SDXL + SDXL Canny ControlNet
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_venv.sh
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
if [ $# -ge 2 ]; then
  CHECKPOINT=$1; CONTROLNET=$2; shift 2
else
  echo "no weights given: using tiny random-weight models (the pictures will be noise-like; pass CHECKPOINT CONTROLNET for real ones)" >&2
  .venv/bin/python -m sdxl_controlnet_img2img make-tiny-models --out .tiny-models >/dev/null
  CHECKPOINT=.tiny-models/tiny-sdxl; CONTROLNET=.tiny-models/tiny-controlnet-canny
fi
exec .venv/bin/python -m sdxl_controlnet_img2img generate \
  --request workflows/requests/default.json --checkpoint "$CHECKPOINT" --controlnet "$CONTROLNET" --out output "$@"
