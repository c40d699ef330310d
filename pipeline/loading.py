"""Loading a StableDiffusionXLControlNetImg2ImgPipeline from files on disk."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import ModelLoadError


def default_device() -> str:
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def default_dtype(device: str):
    import torch

    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.startswith("mps"):
        return torch.float16
    return torch.float32


def load_pipeline(checkpoint: str | os.PathLike, controlnet: str | os.PathLike, *, device: str | None = None, dtype=None):
    """Load SDXL (diffusers folder) + ControlNet (diffusers folder) into an img2img ControlNet pipeline."""
    from diffusers import ControlNetModel, StableDiffusionXLControlNetImg2ImgPipeline

    checkpoint, controlnet = Path(checkpoint), Path(controlnet)
    for label, p in (("checkpoint", checkpoint), ("controlnet", controlnet)):
        if not p.exists():
            raise ModelLoadError(f"{label}: {p} does not exist; check the path")
    device = device or default_device()
    dtype = dtype or default_dtype(device)
    cn = ControlNetModel.from_pretrained(controlnet, torch_dtype=dtype, local_files_only=True)
    pipe = StableDiffusionXLControlNetImg2ImgPipeline.from_pretrained(
        checkpoint, controlnet=cn, torch_dtype=dtype, local_files_only=True
    )
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe
