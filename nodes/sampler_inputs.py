"""Widget definitions shared by the local sampler and the fal node (fal's field names and defaults).

The order here is the order of ``widgets_values`` in UI-format workflows: never reorder or
rename; add new inputs as optional at the end.
"""

from __future__ import annotations

from ..pipeline.request import MAX_NUM_IMAGES, MAX_SEED, GenerationRequest
from ..pipeline.sizes import IMAGE_SIZE_PRESETS, MAX_SIDE, MIN_SIDE

IMAGE_SIZE_CHOICES = ["none", *IMAGE_SIZE_PRESETS.keys(), "custom"]


def request_widgets() -> dict:
    """The request widgets, in order, after the node's own leading inputs."""
    return {
        "prompt": ("STRING", {"multiline": True, "default": "", "tooltip": "What to generate (fal: prompt, required)."}),
        "negative_prompt": ("STRING", {"multiline": True, "default": "", "tooltip": "What to avoid (fal: negative_prompt)."}),
        "controlnet_conditioning_scale": ("FLOAT", {
            "default": 0.5, "min": 0.0, "max": 1.0, "step": 0.01,
            "tooltip": "How strongly the Canny edges steer the image (fal default 0.5)."}),
        "image_size": (IMAGE_SIZE_CHOICES, {
            "default": "none",
            "tooltip": "Output size: a fal preset, 'custom' (width/height below), or 'none' = the control image's size. "
                       "Sizes are floored to multiples of 8; inputs are scaled to cover and centre-cropped."}),
        "width": ("INT", {"default": 1024, "min": MIN_SIDE, "max": MAX_SIDE, "step": 8,
                          "tooltip": "Output width when image_size is 'custom'."}),
        "height": ("INT", {"default": 1024, "min": MIN_SIDE, "max": MAX_SIDE, "step": 8,
                           "tooltip": "Output height when image_size is 'custom'."}),
        "num_inference_steps": ("INT", {"default": 25, "min": 1, "max": 50,
                                        "tooltip": "Denoising schedule length; int(steps x strength) steps actually run."}),
        "guidance_scale": ("FLOAT", {"default": 7.5, "min": 0.0, "max": 20.0, "step": 0.1,
                                     "tooltip": "Classifier-free guidance (CFG) scale (fal default 7.5). At 1 or below no "
                                                "unconditional pass runs (locally: half the UNet and ControlNet "
                                                "work); few-step LoRAs use 1-2."}),
        "strength": ("FLOAT", {"default": 0.95, "min": 0.01, "max": 1.0, "step": 0.01,
                               "tooltip": "How much of the init image is replaced: 1.0 ignores it (fal default 0.95)."}),
        "seed": ("INT", {"default": 0, "min": 0, "max": MAX_SEED,
                         "tooltip": "Image i of a run uses seed + i, so every image can be redone alone."}),
        "num_images": ("INT", {"default": 1, "min": 1, "max": MAX_NUM_IMAGES,
                               "tooltip": "Images per init image (fal: num_images)."}),
        "enable_safety_checker": ("BOOLEAN", {
            "default": False,
            "tooltip": "Opt-in, as on fal: flag (and black out) NSFW results. Locally this needs the safety checker "
                       "model in models/safety_checker (see README)."}),
        "expand_prompt": ("BOOLEAN", {
            "default": False,
            "tooltip": "Enrich the prompt with a prompt-expansion model (locally: models/prompt_expansion)."}),
    }


def check_prompt(prompt=None):
    """The samplers' VALIDATE_INPUTS: an empty prompt (a fresh node's) is refused when the workflow is queued, on
    the prompt input, before anything loads or is paid for. It takes only ``prompt``: ComfyUI 0.8.0 pins the answer to
    every argument it takes. A prompt linked from another node is not known yet (None) and is checked when it runs."""
    if isinstance(prompt, str) and not prompt.strip():
        return "is empty: write what to generate (fal's prompt is required)"
    return True


def image_inputs() -> dict:
    return {
        "image": ("IMAGE", {"tooltip": "Init image(s). A batch of B gives B x num_images results."}),
        "control_image": ("IMAGE", {"tooltip": "Control image: one shared by the batch, or one per init image."}),
    }


SAMPLER_RETURN_TYPES = ("IMAGE", "INT", "STRING", "STRING")
SAMPLER_RETURN_NAMES = ("images", "seed", "has_nsfw_concepts", "prompt")
SAMPLER_OUTPUT_TOOLTIPS = (
    "The generated images.",
    "The seed used (image i used seed + i).",
    "One true/false per image, as a JSON list (true = flagged by the safety checker).",
    "The prompt actually used (the expanded one when expand_prompt is on).",
)


def image_size_value(image_size: str, width: int, height: int):
    """The widget choice as fal's ``image_size`` value."""
    if image_size == "none":
        return None
    if image_size == "custom":
        return {"width": int(width), "height": int(height)}
    return image_size


def request_dict(widgets: dict, image, control_image, seed: int) -> dict:
    """A fal-shaped request dict from widget values (images as PIL)."""
    return {
        "prompt": widgets["prompt"],
        "negative_prompt": widgets["negative_prompt"],
        "image_url": image,
        "control_image_url": control_image,
        "controlnet_conditioning_scale": float(widgets["controlnet_conditioning_scale"]),
        "image_size": image_size_value(widgets["image_size"], widgets["width"], widgets["height"]),
        "num_inference_steps": int(widgets["num_inference_steps"]),
        "guidance_scale": float(widgets["guidance_scale"]),
        "strength": float(widgets["strength"]),
        "seed": int(seed),
        "num_images": int(widgets["num_images"]),
        "enable_safety_checker": bool(widgets["enable_safety_checker"]),
        "expand_prompt": bool(widgets["expand_prompt"]),
    }


def pair_batches(image, control_image):
    """Index pairs (init b, control c): a single control image is shared; otherwise the batch sizes must match."""
    b, c = int(image.shape[0]), int(control_image.shape[0])
    if c not in (1, b):
        raise ValueError(
            f"control_image: a batch of {c} does not match the {b} init images; give one control image "
            f"(shared by all) or exactly {b}"
        )
    return [(i, 0 if c == 1 else i) for i in range(b)]


def build_requests(widgets: dict, image, control_image, **extra) -> list:
    """One validated request per init image of the batch (all validated before any work or payment).

    Init image ``k`` uses seed ``seed + k * num_images`` and image ``i`` of it ``+ i``, so every output
    has its own seed and can be redone alone. ``extra`` adds request fields (loras, apply_canny, ...).
    """
    from .convert import image_to_pil

    seed, num_images = int(widgets["seed"]), int(widgets["num_images"])
    requests = []
    for k, (bi, ci) in enumerate(pair_batches(image, control_image)):
        data = request_dict(widgets, image_to_pil(image, bi), image_to_pil(control_image, ci),
                            (seed + k * num_images) % (MAX_SEED + 1))
        data.update(extra)
        requests.append(GenerationRequest.from_dict(data))
    return requests
