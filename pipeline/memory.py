"""Giving memory back after dropping a cached model."""

from __future__ import annotations

import gc


def release_memory() -> None:
    """Collect garbage, then return cached CUDA blocks to the driver (a no-op without CUDA)."""
    gc.collect()
    try:
        import torch
    except ImportError:
        return
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
