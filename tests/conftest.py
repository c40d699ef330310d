"""Shared fixtures: tiny SDXL-shaped models built once per test session, offline."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import numpy as np
import pytest


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """{"checkpoint": diffusers folder, "controlnet": diffusers folder} of tiny random-weight models."""
    from sdxl_controlnet_img2img.pipeline.local.tiny_models import build_tiny_models

    return build_tiny_models(tmp_path_factory.mktemp("tiny-models"))


@pytest.fixture(scope="session")
def tiny_pipe(tiny_models):
    """The tiny pipeline loaded through the library's loader, on the CPU in float32."""
    import torch

    from sdxl_controlnet_img2img.pipeline.local.loading import load_pipeline

    return load_pipeline(tiny_models["checkpoint"], tiny_models["controlnet"], device="cpu", dtype=torch.float32)


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


@pytest.fixture
def image_files(tmp_path):
    """Write test images of given sizes to PNG files; returns a factory (w, h, seed) -> path."""

    def _make(w, h, seed=0, name=None):
        p = tmp_path / (name or f"img_{w}x{h}_{seed}.png")
        make_test_image(w, h, seed).save(p)
        return p

    return _make
