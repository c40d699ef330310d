"""Canny edge maps with OpenCV, as fal's endpoint (and the SDXL Canny ControlNets' training) use them."""

from __future__ import annotations

import logging

import numpy as np

log = logging.getLogger("sdxl_controlnet_img2img")

DEFAULT_LOW_THRESHOLD = 100
DEFAULT_HIGH_THRESHOLD = 200


def ordered_thresholds(low: int, high: int) -> tuple[int, int, str | None]:
    """``(low, high, warning)``: the thresholds checked against 0..255, the smaller first, and one warning line when
    they came the other way round. OpenCV's Canny takes them either way round (the smaller one links edges, the
    larger one starts them: cv2.Canny's documentation), so low above high is used as OpenCV uses it, with a word."""
    for name, v in (("low_threshold", low), ("high_threshold", high)):
        if not 0 <= v <= 255:
            raise ValueError(f"{name}: must be between 0 and 255, got {v}")
    if low <= high:
        return low, high, None
    return high, low, (f"low_threshold {low} is above high_threshold {high}: using {high}/{low}, as OpenCV does "
                       "(the smaller threshold links edges, the larger one starts them)")


def canny_edges(
    rgb: np.ndarray,
    low_threshold: int = DEFAULT_LOW_THRESHOLD,
    high_threshold: int = DEFAULT_HIGH_THRESHOLD,
    l2_gradient: bool = False,
) -> np.ndarray:
    """``cv2.Canny`` on an 8-bit RGB image ``[H, W, 3]``; returns the edge map as ``[H, W, 3]`` uint8 (0 or 255).
    Thresholds the wrong way round are used as OpenCV uses them, with a warning line (:func:`ordered_thresholds`)."""
    import cv2

    low_threshold, high_threshold, warning = ordered_thresholds(low_threshold, high_threshold)
    if warning:
        log.warning("canny: %s", warning)
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"canny_edges wants an 8-bit RGB array [H, W, 3], got {rgb.dtype} {rgb.shape}")
    edges = cv2.Canny(np.ascontiguousarray(rgb), low_threshold, high_threshold, L2gradient=l2_gradient)
    return np.repeat(edges[:, :, None], 3, axis=2)


def canny_image(image, low_threshold=DEFAULT_LOW_THRESHOLD, high_threshold=DEFAULT_HIGH_THRESHOLD, l2_gradient=False):
    """PIL RGB image in, PIL RGB edge map out."""
    from PIL import Image

    return Image.fromarray(canny_edges(np.asarray(image.convert("RGB")), low_threshold, high_threshold, l2_gradient))


def looks_like_edge_map(rgb: np.ndarray) -> bool:
    """Whether an 8-bit RGB image is a Canny edge map (grey levels 0 and 255 only, mostly black), not a picture:
    sent to fal, which runs Canny itself, it would give edges of edges."""
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.size == 0:
        return False
    if not (np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])):
        return False
    grey = rgb[..., 0]
    if not np.isin(grey, (0, 255)).all():
        return False
    return float((grey == 255).mean()) < 0.5
