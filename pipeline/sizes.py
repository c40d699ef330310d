"""Output sizes: fal's ``image_size`` presets, custom sizes, and the resize policy.

Policy (documented in the README):
- The target size is the preset, the custom ``{"width", "height"}``, or, when ``image_size``
  is absent/``None``, the control image's own size.
- Width and height are floored to multiples of 8 (the SDXL VAE downsamples by 8). Each side is
  at least 64 (SDXL's UNet needs a latent of at least 8x8) and at most 4096; a control image
  smaller than 64 px on a side with ``image_size`` none is refused (pick a preset or a custom size).
- At most :data:`MAX_PIXELS` (2048x2048 = 4.2 MP) in all: a larger size (e.g. a 12 MP phone photo as the control
  image with ``image_size`` none) is refused with a message naming ``image_size`` and what to pick.
- Both the init image and the control image are brought to the target size by
  *cover and centre-crop*: scaled (Lanczos) so they cover the target while keeping
  their aspect ratio, then cropped to it around the centre. Nothing is stretched. An image scaled up more than
  :data:`MAX_UPSCALE` times (a 1x1 image with a custom size) is used, with a warning line naming it.
"""

from __future__ import annotations

import math

from .errors import RequestError

IMAGE_SIZE_PRESETS: dict[str, tuple[int, int]] = {
    # name: (width, height), as fal defines them
    "square_hd": (1024, 1024),
    "square": (512, 512),
    "portrait_4_3": (768, 1024),
    "portrait_16_9": (576, 1024),
    "landscape_4_3": (1024, 768),
    "landscape_16_9": (1024, 576),
}

MIN_SIDE = 64  # SDXL's UNet needs a latent of at least 8x8
MAX_SIDE = 4096
MAX_UPSCALE = 4  # an input scaled up more than this is mostly made-up pixels (blurry, blocky): said in a warning
MAX_PIXELS = 2048 * 2048  # 4.2 MP: four times SDXL's native 1024x1024; beyond it SDXL repeats itself and memory explodes


def floor_to_multiple_of_8(value: int) -> int:
    return (int(value) // 8) * 8


def check_side(field: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(field, f"must be a whole number of pixels, got {value!r}")
    if not MIN_SIDE <= value <= MAX_SIDE:
        raise RequestError(field, f"must be between {MIN_SIDE} and {MAX_SIDE} pixels, got {value}")
    return value


def parse_image_size(value):
    """Validate fal's ``image_size``: a preset name, ``{"width", "height"}``, or None."""
    if value is None or value == "none":
        return None
    if isinstance(value, str):
        if value not in IMAGE_SIZE_PRESETS:
            raise RequestError(
                "image_size",
                f"unknown preset {value!r}; use one of {', '.join(IMAGE_SIZE_PRESETS)}, "
                'a {"width": W, "height": H} object, or null to use the control image size',
            )
        return value
    if isinstance(value, dict):
        unknown = set(value) - {"width", "height"}
        if unknown or "width" not in value or "height" not in value:
            raise RequestError("image_size", f'a custom size needs exactly "width" and "height", got {value!r}')
        return {
            "width": check_side("image_size.width", value["width"]),
            "height": check_side("image_size.height", value["height"]),
        }
    raise RequestError("image_size", f"must be a preset name, a {{width, height}} object or null, got {value!r}")


def target_size(image_size, control_size: tuple[int, int]) -> tuple[int, int]:
    """The (width, height) that generation runs at, floored to multiples of 8."""
    if image_size is None:
        w, h = control_size
        if min(w, h) < MIN_SIDE:
            raise RequestError(
                "image_size",
                f"is none, so the control image's size is used, but it is {w}x{h} and each side must be at least "
                f"{MIN_SIDE} px; pick a preset (e.g. square) or a custom width/height, or use a larger control image")
    elif isinstance(image_size, str):
        w, h = IMAGE_SIZE_PRESETS[image_size]
    else:
        w, h = image_size["width"], image_size["height"]
    given = (w, h)
    w, h = floor_to_multiple_of_8(w), floor_to_multiple_of_8(h)
    if w * h > MAX_PIXELS:
        source = "the control image's size (image_size none)" if image_size is None else f"image_size {image_size!r}"
        # the size as the user knows it (the image's own), then the one it would run at
        rounded = f" ({w}x{h} in multiples of 8: " if given != (w, h) else " ("
        raise RequestError(
            "image_size",
            f"{source} is {given[0]}x{given[1]}{rounded}{w * h / 1e6:.1f} MP), over the {MAX_PIXELS / 1e6:.1f} MP "
            "this pack runs SDXL at "
            "(2048x2048; SDXL's own size is 1024x1024); pick a preset such as square_hd or landscape_4_3, or a "
            "custom width/height")
    return w, h


def cover_resize(image, size: tuple[int, int]):
    """Scale a PIL image to cover ``size`` keeping its aspect ratio, then centre-crop to it."""
    from PIL import Image

    tw, th = size
    w, h = image.size
    if (w, h) == (tw, th):
        return image
    scale = max(tw / w, th / h)
    nw, nh = max(tw, round(w * scale)), max(th, round(h * scale))
    resized = image.resize((nw, nh), Image.LANCZOS) if (nw, nh) != (w, h) else image
    left, top = (nw - tw) // 2, (nh - th) // 2
    return resized.crop((left, top, left + tw, top + th))


def upscale_warning(field: str, size: tuple[int, int], target: tuple[int, int]) -> str | None:
    """One line when the image ``field`` of ``size`` is scaled up more than :data:`MAX_UPSCALE` times to cover
    ``target`` (both (width, height)), naming the smallest size that would not be; else None."""
    (w, h), (tw, th) = size, target
    scale = max(tw / w, th / h)
    if scale <= MAX_UPSCALE:
        return None
    return (f"{field} is {w}x{h} and is scaled up {scale:.3g} times to cover {tw}x{th}, so the result will be "
            f"blurry or blocky; use an image of at least {math.ceil(tw / MAX_UPSCALE)}x{math.ceil(th / MAX_UPSCALE)} "
            f"(at most {MAX_UPSCALE} times smaller than the output) or a smaller image_size")
