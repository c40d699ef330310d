"""``SDXLCNCanny``: Canny edge maps with OpenCV, as the SDXL Canny ControlNets were trained."""

from __future__ import annotations

from ..pipeline.canny import DEFAULT_HIGH_THRESHOLD, DEFAULT_LOW_THRESHOLD, canny_edges, ordered_thresholds
from .comfy_hooks import CATEGORY, log
from .convert import image_to_uint8, uint8_to_image


class SDXLCNCanny:
    DESCRIPTION = "cv2.Canny on the 8-bit RGB image; outputs 3-channel 0/1 edge maps."
    CATEGORY = f"{CATEGORY}/preprocessors"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("edges",)
    OUTPUT_TOOLTIPS = ("Edge maps (white edges on black), one per input image.",)
    FUNCTION = "detect"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "image": ("IMAGE", {"tooltip": "Images to find edges in."}),
                "low_threshold": ("INT", {"default": DEFAULT_LOW_THRESHOLD, "min": 0, "max": 255,
                                          "tooltip": "Gradients below this are never edges (fal: 100)."}),
                "high_threshold": ("INT", {"default": DEFAULT_HIGH_THRESHOLD, "min": 0, "max": 255,
                                           "tooltip": "Gradients above this are always edges (fal: 200)."}),
            },
            "optional": {
                "l2_gradient": ("BOOLEAN", {"default": False,
                                            "tooltip": "Use the exact L2 gradient magnitude instead of L1."}),
                "resolution": ("INT", {"default": 0, "min": 0, "max": 4096, "step": 8,
                                       "tooltip": "Resize so the short side is this many pixels before detecting "
                                                  "(multiples of 8); 0 keeps the input size."}),
            },
        }

    # No VALIDATE_INPUTS: ComfyUI pins its answer to every argument it takes, and comparing the thresholds takes
    # two, so one mistake would be reported twice. Each threshold's range (and resolution's) is ComfyUI's own min/max
    # check at /prompt, once, on that input; low above high is used as OpenCV uses it (the smaller threshold first),
    # said in one warning line per run, not once per image of the batch.
    def detect(self, image, low_threshold=DEFAULT_LOW_THRESHOLD, high_threshold=DEFAULT_HIGH_THRESHOLD,
               l2_gradient=False, resolution=0):
        low_threshold, high_threshold, warning = ordered_thresholds(int(low_threshold), int(high_threshold))
        if warning:
            log.warning("SDXLCNCanny: %s", warning)
        edges = []
        for i in range(int(image.shape[0])):
            rgb = image_to_uint8(image, i)
            if resolution:
                rgb = _resize_short_side(rgb, int(resolution))
            edges.append(canny_edges(rgb, int(low_threshold), int(high_threshold), bool(l2_gradient)))
        return {"ui": _preview_ui(edges), "result": (uint8_to_image(edges),)}


def _resize_short_side(rgb, short: int):
    import cv2

    h, w = rgb.shape[:2]
    scale = short / min(h, w)
    nw, nh = max(8, int(round(w * scale / 8)) * 8), max(8, int(round(h * scale / 8)) * 8)
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
    return cv2.resize(rgb, (nw, nh), interpolation=interp)


def _preview_ui(edges):
    """Show the edge maps on the node (saved to ComfyUI's temp folder), like a Preview Image node."""
    from .comfy_hooks import folder_paths

    fp = folder_paths()
    if fp is None:
        return {}
    import os
    import random

    from PIL import Image

    out_dir = fp.get_temp_directory()
    os.makedirs(out_dir, exist_ok=True)
    prefix = "sdxlcn_canny_" + "".join(random.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(6))
    images = []
    for i, e in enumerate(edges[:16]):
        name = f"{prefix}_{i:05}.png"
        Image.fromarray(e).save(os.path.join(out_dir, name), compress_level=1)
        images.append({"filename": name, "subfolder": "", "type": "temp"})
    return {"images": images}
