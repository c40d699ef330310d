"""``SDXLCNImg2Img``: the local sampler, with fal's parameters and defaults."""

from __future__ import annotations

import json

from ..pipeline.endpoint import ENDPOINT
from ..pipeline.local.generate import generate, prepare_inputs
from ..pipeline.local.schedulers import SCHEDULER_TOOLTIP, TIMESTEPS_TOOLTIP, few_step_warning
from ..pipeline.request import DEFAULT_SCHEDULER, SCHEDULERS, GenerationRequest
from .comfy_hooks import CATEGORY, Progress, log, send_status
from .convert import pil_to_image
from .sampler_inputs import (
    SAMPLER_OUTPUT_TOOLTIPS,
    SAMPLER_RETURN_NAMES,
    SAMPLER_RETURN_TYPES,
    build_requests,
    check_prompt,
    field_widget,
    image_inputs,
    request_widgets,
)

FALLBACK_CHOICES = ["off", "fal"]


class SDXLCNImg2Img:
    DESCRIPTION = ("SDXL ControlNet (Canny) image-to-image, run locally with diffusers. "
                   f"Same parameters and defaults as fal's {ENDPOINT}.")
    CATEGORY = f"{CATEGORY}/sampling"
    RETURN_TYPES = SAMPLER_RETURN_TYPES
    RETURN_NAMES = SAMPLER_RETURN_NAMES
    OUTPUT_TOOLTIPS = SAMPLER_OUTPUT_TOOLTIPS
    FUNCTION = "sample"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "pipeline": ("SDXLCN_PIPELINE", {"tooltip": "From 'Load SDXL ControlNet Pipeline' (and LoRA nodes), or from 'SDXL ControlNet Pipeline from ComfyUI Models'."}),
                **image_inputs(),
                **request_widgets(),
                "apply_canny": field_widget("apply_canny"),
            },
            "optional": {
                "fallback": (FALLBACK_CHOICES, {
                    "default": "off",
                    "tooltip": "fal: when local generation cannot run (no usable GPU, out of memory), run the same "
                               "request on fal instead (billed by fal; needs FAL_KEY). off: fail with the local error."}),
                # added later: after the older inputs, so saved workflows' widget values keep their places
                "scheduler": (list(SCHEDULERS), {"default": DEFAULT_SCHEDULER, "tooltip": SCHEDULER_TOOLTIP}),
                "control_start": field_widget("local_control_start"),
                "control_end": field_widget("local_control_end"),
                "timesteps": ("STRING", {"default": "", "tooltip": TIMESTEPS_TOOLTIP}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    @classmethod
    def VALIDATE_INPUTS(cls, prompt=None):
        """An empty prompt is refused when the workflow is queued (see :func:`.sampler_inputs.check_prompt`)."""
        return check_prompt(prompt)

    def sample(self, pipeline, image, control_image, apply_canny=True, fallback="off", scheduler=DEFAULT_SCHEDULER,
               control_start=0.0, control_end=1.0, timesteps="", unique_id=None, **widgets):
        seed = int(widgets["seed"])
        requests = build_requests(widgets, image, control_image, apply_canny=bool(apply_canny),
                                  loras=list(getattr(pipeline, "loras", ())), local_scheduler=scheduler,
                                  local_control_start=float(control_start), local_control_end=float(control_end),
                                  local_timesteps=timesteps)
        warning = few_step_warning(requests[0])  # every request of the batch has the same settings: one line
        if warning:
            log.warning("SDXLCNImg2Img: %s", warning)

        if fallback == "fal":
            refuse_fallback_on_host_models(pipeline)
        images, flags, prompt = [], [], requests[0].prompt
        results = []  # filled as each request finishes locally: a fallback sends only the rest
        try:
            self._run_local(pipeline, requests, unique_id, results)
        except Exception as exc:  # noqa: BLE001 - decided by local_failure_reason below
            results.extend(_fall_back_or_raise(exc, fallback, requests[len(results):], unique_id, len(results)))
        for result in results:
            images.extend(result.images)
            flags.extend(result.has_nsfw_concepts)
            prompt = result.prompt
        if any(flags):
            log.warning("SDXLCNImg2Img: %d of %d images flagged by the safety checker", sum(flags), len(flags))
        return (pil_to_image(images), seed, json.dumps(flags), prompt)

    @staticmethod
    def _run_local(pipeline, requests, unique_id, results: list) -> None:
        """Run ``requests`` locally, appending each result to ``results`` as it finishes."""
        from . import comfy_memory

        pipe = pipeline.get_pipe()
        comfy_memory.before_sampling(pipe, *_output_size(requests[0]))
        hooks = _hooks_for(requests[0], pipe)
        per_request = requests[0].steps_to_run * requests[0].num_images
        progress = Progress(per_request * len(requests), unique_id)
        said = set()
        for k, req in enumerate(requests):
            offset = k * per_request
            prepared = prepare_inputs(req, names=("image", "control_image"))  # the node's inputs
            for warning in prepared.warnings:  # once per run, not once per image of a batch; in input order
                if warning not in said:
                    log.warning("SDXLCNImg2Img: %s", warning)
                    said.add(warning)
            results.append(generate(
                pipe, req,
                on_step=lambda step, _total, latents, o=offset: progress.update(o + step, latents),
                prepared=prepared, **hooks,
            ))


def refuse_fallback_on_host_models(pipeline) -> None:
    """A fallback to fal would drop the user's checkpoint and LoRA stack of a pipeline on ComfyUI's own models
    (fal runs its own SDXL base): refused before anything runs."""
    from .from_comfy_node import SOURCE

    if getattr(pipeline, "source", {}).get("from") == SOURCE:
        raise ValueError("fallback: 'fal' cannot stand in for a pipeline on ComfyUI's own models: fal would run its "
                         "own SDXL base, without this workflow's checkpoint and LoRAs. Set fallback to off (or use "
                         "the fal node explicitly)")


def _fall_back_or_raise(exc: BaseException, fallback: str, requests, unique_id, finished: int = 0):
    """Run ``requests`` (those that did not finish locally) on fal when ``fallback`` is on and the local failure is
    one fal can help with; ``finished`` requests before them are kept."""
    if fallback != "fal":
        raise exc
    from ..pipeline.local.fallback import local_failure_reason

    reason = local_failure_reason(exc)
    if reason is None:
        raise exc
    if not all(r.apply_canny for r in requests):
        raise RuntimeError(f"{reason}, and fallback to fal needs the source control image: fal runs Canny itself, "
                           "and this sampler's control image is already an edge map (apply_canny off). Connect the "
                           "source picture to control_image with apply_canny on to allow the fallback") from exc
    local = sorted({name for r in requests for name in r.local_only_changes()})
    if local:
        raise RuntimeError(f"{reason}, and fallback to fal cannot honour the local-only {', '.join(local)} (fal "
                           "uses its own sampler, the ControlNet in every step): set them to their defaults to allow "
                           "the fallback") from exc
    local_loras = [l.path for r in requests for l in r.loras if not l.path.startswith(("http://", "https://"))]
    if local_loras:
        raise RuntimeError(f"{reason}, and fallback to fal cannot use local LoRA files ({', '.join(local_loras)}): "
                           "give fal LoRAs as URLs on the fal node, or free GPU memory and run locally") from exc
    kept = f" ({finished} finished locally are kept)" if finished else ""
    message = f"{reason}: falling back to fal for {len(requests)} request(s){kept}"
    log.warning("SDXLCNImg2Img: %s", message)
    from .fal_node import STATUS_EVENT, run_requests_on_fal

    send_status(STATUS_EVENT, {"node": unique_id, "state": "FALLBACK", "log": message})

    return run_requests_on_fal(requests, unique_id)


def _output_size(request: GenerationRequest) -> tuple[int, int]:
    """(width, height) the request runs at (its control image is a PIL image made by this node)."""
    from ..pipeline.sizes import parse_image_size, target_size

    return target_size(parse_image_size(request.image_size), request.control_image_url.size)


def _hooks_for(request: GenerationRequest, pipe) -> dict:
    """The safety checker / prompt expander the request asks for (loaded from ComfyUI's model folders), on the
    pipeline's device and in its dtype."""
    if not (request.enable_safety_checker or request.expand_prompt):
        return {}
    from .model_folders import resolve_request_hooks

    return resolve_request_hooks(request, device=str(pipe._execution_device), dtype=pipe.unet.dtype)
