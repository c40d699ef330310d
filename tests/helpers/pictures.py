"""Deterministic test pictures with edges, as PIL images."""

from __future__ import annotations

import numpy as np


def make_test_image(width: int, height: int, seed: int = 0):
    """A deterministic picture with edges (shapes on a gradient) as a PIL RGB image."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([(x * 255 // max(width - 1, 1)), (y * 255 // max(height - 1, 1)), np.full_like(x, 90)], axis=2)
    img = Image.fromarray(base.astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(6):
        x0, y0 = int(rng.integers(0, width - 4)), int(rng.integers(0, height - 4))
        x1, y1 = x0 + int(rng.integers(4, max(5, width // 2))), y0 + int(rng.integers(4, max(5, height // 2)))
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        draw.rectangle([x0, y0, x1, y1], fill=color)
        draw.ellipse([x0 // 2, y0 // 2, x1 // 2 + 2, y1 // 2 + 2], outline=(255, 255, 255), width=2)
    return img
