"""Where the models run and in which precision: the defaults and the names users may give.

One home for these facts, imported by the loader, the safety checker, the prompt expander and the
loader node.
"""

from __future__ import annotations

from ..errors import ModelLoadError

MEMORY_MODES = ("none", "model_cpu_offload", "sequential_cpu_offload")


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


def parse_dtype(value):
    """None/"auto" -> None; "fp16"/"float16"/"bf16"/"fp32"... or a torch.dtype -> torch.dtype."""
    if value is None or value == "auto":
        return None
    import torch

    if isinstance(value, torch.dtype):
        return value
    names = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
             "half": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
    try:
        return names[str(value).lower()]
    except KeyError:
        raise ModelLoadError(f"dtype: {value!r} is not one of auto, fp32, fp16, bf16") from None
