"""The local run of a request, for tests that read a server's images another way (tests/js): runs the request with
``pipeline.local.generate`` on the given models and says, per served image, whether its pixels are the local run's.

``python tests/helpers/local_pixels.py --checkpoint C --controlnet N --request REQ.json [--lora FILE] [--safety-checker P]
[--prompt-expansion P] served0.png served1.png ...`` prints one JSON line: ``{"same": [...], "prompt": ...,
"has_nsfw_concepts": [...]}``. ``--lora FILE`` replaces each LoRA's path in the request by FILE (the server's
LoRA by name is that file).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--controlnet", required=True)
    p.add_argument("--request", required=True)
    p.add_argument("--lora", default=None)
    p.add_argument("--safety-checker", default=None)
    p.add_argument("--prompt-expansion", default=None)
    p.add_argument("served", nargs="+")
    args = p.parse_args()

    import numpy as np
    import torch
    from PIL import Image

    from sdxl_controlnet_img2img.pipeline.local.generate import generate
    from sdxl_controlnet_img2img.pipeline.local.models.loading import load_pipeline
    from sdxl_controlnet_img2img.pipeline.request import GenerationRequest

    data = json.loads(Path(args.request).read_text(encoding="utf-8"))
    if args.lora:
        data["loras"] = [{**entry, "path": args.lora} for entry in data.get("loras", [])]
    request = GenerationRequest.from_dict(data)
    pipe = load_pipeline(args.checkpoint, args.controlnet, device="cpu", dtype=torch.float32)
    hooks = {}
    if request.enable_safety_checker:
        from sdxl_controlnet_img2img.pipeline.local.request_models.safety import load_safety_checker

        hooks["safety_checker"] = load_safety_checker(args.safety_checker, device="cpu", dtype=torch.float32)
    if request.expand_prompt:
        from sdxl_controlnet_img2img.pipeline.local.request_models.prompt_expansion import load_prompt_expander

        hooks["prompt_expander"] = load_prompt_expander(args.prompt_expansion, device="cpu", dtype=torch.float32)
    result = generate(pipe, request, **hooks)
    same = [len(args.served) == len(result.images) and
            np.array_equal(np.asarray(Image.open(path).convert("RGB")), np.asarray(mine))
            for path, mine in zip(args.served, result.images)]
    print(json.dumps({"same": same, "prompt": result.prompt, "has_nsfw_concepts": result.has_nsfw_concepts}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
