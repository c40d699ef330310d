"""Widget definitions shared by the local sampler and the fal node (fal's field names and defaults).

The order here is the order of ``widgets_values`` in UI-format workflows: never reorder or
rename; add new inputs as optional at the end.
"""

from __future__ import annotations

from ..pipeline.request import FIELD, MAX_SEED, GenerationRequest
from ..pipeline.sizes import IMAGE_SIZE_PRESETS, MAX_SIDE, MIN_SIDE

IMAGE_SIZE_CHOICES = ["none", *IMAGE_SIZE_PRESETS.keys(), "custom"]


WIDGET_TYPES = {"text": "STRING", "number": "FLOAT", "whole": "INT", "switch": "BOOLEAN"}


def field_widget(name: str, **changes) -> tuple:
    """The ComfyUI widget of a request field, from its row in the request's field table (type, default, range,
    tooltip); ``changes`` override options (a widget's own default where the field's is "absent")."""
    f = FIELD[name]
    opts = {"multiline": True} if f.kind == "text" else {}
    opts["default"] = f.default
    if f.low is not None:
        opts["min"] = f.step if f.low_open else f.low
        opts["max"] = f.high
    if f.step is not None:
        opts["step"] = f.step
    opts["tooltip"] = f.tooltip
    opts.update(changes)
    return WIDGET_TYPES[f.kind], opts


def request_widgets() -> dict:
    """The request widgets, in order, after the node's own leading inputs."""
    return {
        "prompt": field_widget("prompt"),
        "negative_prompt": field_widget("negative_prompt"),
        "controlnet_conditioning_scale": field_widget("controlnet_conditioning_scale"),
        "image_size": (IMAGE_SIZE_CHOICES, {
            "default": "none",
            "tooltip": "Output size: a fal preset, 'custom' (width/height below), or 'none' = the control image's size. "
                       "Sizes are floored to multiples of 8; inputs are scaled to cover and centre-cropped."}),
        "width": ("INT", {"default": 1024, "min": MIN_SIDE, "max": MAX_SIDE, "step": 8,
                          "tooltip": "Output width when image_size is 'custom'."}),
        "height": ("INT", {"default": 1024, "min": MIN_SIDE, "max": MAX_SIDE, "step": 8,
                           "tooltip": "Output height when image_size is 'custom'."}),
        "num_inference_steps": field_widget("num_inference_steps"),
        "guidance_scale": field_widget("guidance_scale"),
        "strength": field_widget("strength"),
        "seed": field_widget("seed", default=0),  # a widget always holds a number
        "num_images": field_widget("num_images"),
        "enable_safety_checker": field_widget("enable_safety_checker"),
        "expand_prompt": field_widget("expand_prompt"),
    }


CASTS = {"text": lambda text: text, "number": float, "whole": int, "switch": bool}
# the widgets that are request fields as they are (image_size, width and height make one field)
FIELD_WIDGETS = tuple(name for name in request_widgets() if name in FIELD and FIELD[name].kind != "size")


def check_prompt(prompt=None):
    """The local sampler's VALIDATE_INPUTS: an empty prompt (a fresh node's) is refused when the workflow is queued,
    on the prompt input, before anything loads or is paid for. It takes only ``prompt``: ComfyUI 0.8.0 pins the answer
    to every argument it takes. A prompt linked from another node is not known yet (None), and the fal node's may be
    empty when ``request_id`` fetches by id: :func:`build_requests` refuses those when the node runs, in these words."""
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
    data = {"image_url": image, "control_image_url": control_image, "seed": int(seed),
            "image_size": image_size_value(widgets["image_size"], widgets["width"], widgets["height"])}
    for name in FIELD_WIDGETS:
        if name not in data:
            data[name] = CASTS[FIELD[name].kind](widgets[name])
    return data


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
    from ..pipeline.errors import RequestError
    from .convert import image_to_pil

    empty = check_prompt(widgets.get("prompt"))  # one from another node, or the fal node's: the queue-time words
    if empty is not True:
        raise RequestError("prompt", empty)
    seed, num_images = int(widgets["seed"]), int(widgets["num_images"])
    requests = []
    for k, (bi, ci) in enumerate(pair_batches(image, control_image)):
        data = request_dict(widgets, image_to_pil(image, bi), image_to_pil(control_image, ci),
                            (seed + k * num_images) % (MAX_SEED + 1))
        data.update(extra)
        requests.append(GenerationRequest.from_dict(data))
    return requests
