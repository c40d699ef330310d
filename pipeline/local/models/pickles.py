"""Reading a pickle (.ckpt/.pt/.bin) weights file: only with ``torch.load(weights_only=True)``, and only on a torch
whose ``weights_only`` loader is safe (2.6 and newer: older releases had a code-execution hole, CVE-2025-32434)."""

from __future__ import annotations

import os

from ...errors import FieldError

SAFE_WEIGHTS_ONLY = (2, 6)


class UnsafePickleTorch(FieldError, ValueError):
    """This torch cannot read a pickle safely; ``field`` is the label of the file's input."""


def torch_version() -> tuple[int, int]:
    import torch

    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return int(major), int(minor)


def refuse_unsafe_torch(label: str, version: tuple[int, int] | None = None) -> None:
    """Raise :class:`UnsafePickleTorch` (a ``ValueError``) naming ``label`` when this torch cannot read a pickle
    safely."""
    version = version or torch_version()
    if version < SAFE_WEIGHTS_ONLY:
        raise UnsafePickleTorch(
            label, f"pickle files are refused on torch {version[0]}.{version[1]}: its weights_only loader is not "
                   "safe before torch 2.6 (CVE-2025-32434). Use a .safetensors version, or upgrade torch to 2.6 or "
                   "newer")


def load_weights_only(path: str | os.PathLike, label: str, mmap: bool = False):
    """``torch.load(path, weights_only=True)`` on the CPU, after :func:`refuse_unsafe_torch`."""
    refuse_unsafe_torch(label)
    import torch

    return torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)


def pickles_readable(allow_pickle: bool) -> bool:
    """Whether a loader may read pickle weights where there are no safetensors (diffusers' and transformers'
    ``use_safetensors=None`` rather than ``True``): only opted in, on a torch that reads them safely."""
    return allow_pickle and torch_version() >= SAFE_WEIGHTS_ONLY
