"""A serving ComfyUI for tests written in another language (tests/js/serve_storage.test.mjs): the pack's fal API at
``/sdxlcn/fal`` on the tiny models, started through :mod:`comfyui_harness` as the Python tests start theirs.

``python tests/helpers/comfyui_serving.py BASE_DIR CHECKPOINT_DIR CONTROLNET_DIR`` (``SDXLCN_SERVE_KEY`` and the rest of
the server's settings from the environment) prints ``READY <the API's base URL>`` once ComfyUI answers, and stops
ComfyUI when its standard input closes (the test ended, or its process went).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from comfyui_harness import running_comfyui  # noqa: E402

MODELS = {"checkpoint": "tiny-sdxl", "controlnet": "tiny-controlnet-canny"}


def main(base: str, checkpoint: str, controlnet: str) -> None:
    models = {"diffusers": {MODELS["checkpoint"]: Path(checkpoint)},
              "controlnet": {MODELS["controlnet"]: Path(controlnet)}}
    env = {"SDXLCN_SERVE_CHECKPOINT": MODELS["checkpoint"], "SDXLCN_SERVE_CONTROLNET": MODELS["controlnet"],
           "SDXLCN_FAL_URL": None, "FAL_KEY": None}
    with running_comfyui(Path(base), models, env=env) as comfy:
        print(f"READY {comfy.url}/sdxlcn/fal", flush=True)
        sys.stdin.read()  # its log stays in BASE_DIR/comfyui.log


if __name__ == "__main__":
    main(*sys.argv[1:4])
