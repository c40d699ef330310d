"""``SDXLCNImg2Img``: the local sampler, with fal's parameters and defaults."""

from __future__ import annotations

import json

from ..pipeline.generate import generate
from ..pipeline.request import MAX_SEED, GenerationRequest
from .comfy_hooks import CATEGORY, Progress, log
from .convert import image_to_pil, pil_to_image
from .sampler_inputs import (
    SAMPLER_OUTPUT_TOOLTIPS,
    SAMPLER_RETURN_NAMES,
    SAMPLER_RETURN_TYPES,
    image_inputs,
    pair_batches,
    request_dict,
    request_widgets,
)


class SDXLCNImg2Img:
    DESCRIPTION = ("SDXL ControlNet (Canny) image-to-image, run locally with diffusers. "
                   "Same parameters and defaults as fal's fast-sdxl-controlnet-canny/image-to-image.")
    CATEGORY = f"{CATEGORY}/sampling"
    RETURN_TYPES = SAMPLER_RETURN_TYPES
    RETURN_NAMES = SAMPLER_RETURN_NAMES
    OUTPUT_TOOLTIPS = SAMPLER_OUTPUT_TOOLTIPS
    FUNCTION = "sample"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "pipeline": ("SDXLCN_PIPELINE", {"tooltip": "From 'Load SDXL ControlNet Pipeline' (and LoRA nodes)."}),
                **image_inputs(),
                **request_widgets(),
                "apply_canny": ("BOOLEAN", {
                    "default": True,
                    "tooltip": "Run Canny (100/200) on the control image first, as fal does. Turn off when the "
                               "control image is already an edge map (e.g. from the Canny node)."}),
            },
        }

    def sample(self, pipeline, image, control_image, apply_canny=True, **widgets):
        pairs = pair_batches(image, control_image)
        seed = int(widgets["seed"])
        num_images = int(widgets["num_images"])
        requests = []
        for k, (bi, ci) in enumerate(pairs):
            data = request_dict(widgets, image_to_pil(image, bi), image_to_pil(control_image, ci),
                                (seed + k * num_images) % (MAX_SEED + 1))
            data["apply_canny"] = bool(apply_canny)
            data["loras"] = list(getattr(pipeline, "loras", ()))
            requests.append(GenerationRequest.from_dict(data))  # validate all before any model work

        hooks = _hooks_for(requests[0])
        per_request = requests[0].steps_to_run * num_images
        progress = Progress(per_request * len(requests))
        images, flags, prompt = [], [], requests[0].prompt
        for k, req in enumerate(requests):
            offset = k * per_request
            result = generate(
                pipeline.pipe, req,
                on_step=lambda step, _total, latents, o=offset: progress.update(o + step, latents),
                **hooks,
            )
            images.extend(result.images)
            flags.extend(result.has_nsfw_concepts)
            prompt = result.prompt
        if any(flags):
            log.warning("SDXLCNImg2Img: %d of %d images flagged by the safety checker", sum(flags), len(flags))
        return (pil_to_image(images), seed, json.dumps(flags), prompt)


def _hooks_for(request: GenerationRequest) -> dict:
    """The safety checker / prompt expander the request asks for (loaded from ComfyUI's model folders)."""
    if not (request.enable_safety_checker or request.expand_prompt):
        return {}
    from .model_folders import resolve_request_hooks

    return resolve_request_hooks(request)
