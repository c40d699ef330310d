"""The workflow a request served by ComfyUI (``/sdxlcn/fal``) runs as, and what its history entry gives back.

A stored request becomes the shipped API workflow (``workflows/api/sdxl_controlnet_img2img.json``): its own LoadImage
for each input image, fal's Canny on the control image (unless ``apply_canny`` is false), the loader set to the
operator's models, one LoRA node per ``loras`` entry, and the sampler's widgets from the request's fields.
"""

from __future__ import annotations

import json
from pathlib import Path

from . import workflow_ids as ID
from .sampler_inputs import FIELD_WIDGETS

WORKFLOW = Path(__file__).resolve().parent.parent / "workflows" / "api" / "sdxl_controlnet_img2img.json"
# the shipped workflow's nodes the served request reads back: the sampler, the SaveImage after it, and two of ComfyUI's
# own Preview as Text nodes added for the request, showing the sampler's seed and has_nsfw_concepts outputs in history
IMAGE_NODE, CANNY_NODE, LOADER_NODE, SAMPLER_NODE, SAVE_NODE = (str(i) for i in (ID.IMAGE, ID.CANNY, ID.LOADER,
                                                                                ID.SAMPLER, ID.SAVE))
CONTROL_NODE, SEED_NODE, FLAGS_NODE = "6", "7", "8"  # added to the shipped workflow for a served request
LORA_NODES = 20  # the first LoRA node's id; one per loras[] entry, chained between the loader and the sampler


def shipped_loader() -> dict:
    """The shipped workflow's loader inputs: its checkpoint, ControlNet and VAE are the endpoint's defaults."""
    return dict(json.loads(WORKFLOW.read_text(encoding="utf-8"))[LOADER_NODE]["inputs"])


def workflow_for(args: dict, image_name: str, control_name: str, checkpoint: str | None = None,
                 controlnet: str | None = None, vae: str | None = None) -> dict:
    """The shipped API workflow for a stored request (``image_name``/``control_name``: its files in ComfyUI's input
    folder; ``checkpoint``, ``controlnet``, ``vae``: names in ComfyUI's model folders, None: the shipped ones)."""
    wf = json.loads(WORKFLOW.read_text(encoding="utf-8"))
    wf[IMAGE_NODE]["inputs"]["image"] = image_name
    wf[CONTROL_NODE] = {"class_type": "LoadImage", "inputs": {"image": control_name}}
    wf[CANNY_NODE]["inputs"]["image"] = [CONTROL_NODE, 0]
    for name, value in (("checkpoint", checkpoint), ("controlnet", controlnet), ("vae", vae)):
        if value:
            wf[LOADER_NODE]["inputs"][name] = value
    s = wf[SAMPLER_NODE]["inputs"]
    for name in FIELD_WIDGETS:  # the sampler's widgets that are request fields as they are
        if name in args:
            s[name] = args[name]
    size = args.get("image_size")
    if isinstance(size, dict):
        s["image_size"], s["width"], s["height"] = "custom", int(size["width"]), int(size["height"])
    else:
        s["image_size"] = size or "none"
    s["scheduler"] = args.get("local_scheduler", s["scheduler"])
    s["control_start"] = args.get("local_control_start", s["control_start"])
    s["control_end"] = args.get("local_control_end", s["control_end"])
    s["timesteps"] = ", ".join(str(t) for t in args.get("local_timesteps") or ())
    if args.get("apply_canny", True) is False:
        s["control_image"] = [CONTROL_NODE, 0]
    s["image"] = [IMAGE_NODE, 0]
    pipeline = [LOADER_NODE, 0]
    for i, lora in enumerate(args.get("loras") or ()):
        node = str(LORA_NODES + i)
        wf[node] = {"class_type": "SDXLCNLoraLoader",
                    "inputs": {"pipeline": pipeline, "lora_name": lora["path"], "strength": float(lora["scale"])}}
        pipeline = [node, 0]
    s["pipeline"] = pipeline
    wf[SAVE_NODE]["inputs"]["filename_prefix"] = "sdxlcn_serve"
    wf[SEED_NODE] = {"class_type": "PreviewAny", "inputs": {"source": [SAMPLER_NODE, 1]}}
    wf[FLAGS_NODE] = {"class_type": "PreviewAny", "inputs": {"source": [SAMPLER_NODE, 2]}}
    return wf


def served_outputs(outputs: dict) -> tuple[list[dict], int | None, list | None]:
    """What a finished served prompt gave fal's caller, from its history ``outputs``: the generated images only (the
    SaveImage node's files, in order; never the Canny node's edge-map preview), the seed the sampler used and its
    ``has_nsfw_concepts``, as shown by the two Preview as Text nodes (None where absent)."""
    images = [item for item in outputs.get(SAVE_NODE, {}).get("images", []) if item.get("type") == "output"]

    def shown(node):
        text = outputs.get(node, {}).get("text") or [None]
        try:
            return json.loads(text[0]) if text[0] is not None else None
        except ValueError:
            return None

    seed, flags = shown(SEED_NODE), shown(FLAGS_NODE)
    return images, seed if isinstance(seed, int) else None, flags if isinstance(flags, list) else None
