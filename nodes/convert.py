"""Conversions between ComfyUI's IMAGE tensors ([B, H, W, C] float 0..1) and PIL / uint8 arrays."""

from __future__ import annotations

import numpy as np


def image_to_uint8(image, index: int) -> np.ndarray:
    """Frame ``index`` of an IMAGE batch as an 8-bit RGB array (rounded, so 8-bit inputs round-trip exactly)."""
    frame = image[index].detach().cpu().float().numpy()
    if frame.ndim != 3:
        raise ValueError(f"expected an IMAGE batch [B, H, W, C], got shape {tuple(image.shape)}")
    if frame.shape[2] == 1:
        frame = np.repeat(frame, 3, axis=2)
    elif frame.shape[2] == 4:
        frame = frame[:, :, :3]
    return np.clip(np.round(frame * 255.0), 0, 255).astype(np.uint8)


def image_to_pil(image, index: int):
    from PIL import Image

    return Image.fromarray(image_to_uint8(image, index))


def pil_to_image(images):
    """A list of same-size PIL images -> IMAGE batch."""
    import torch

    arrays = [np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0 for img in images]
    return torch.from_numpy(np.stack(arrays, axis=0))


def uint8_to_image(arrays):
    import torch

    return torch.from_numpy(np.stack(arrays, axis=0).astype(np.float32) / 255.0)
