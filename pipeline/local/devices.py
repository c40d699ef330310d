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


def check_device(device: str) -> str:
    """``device`` when torch can use it here; else a :class:`ModelLoadError` naming the input and the fix."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ModelLoadError(f"device: {device!r} is not a device name; use auto, cuda, cuda:N, xpu, mps or cpu") from None
    if dev.type == "cpu":
        return device
    if dev.type == "cuda":
        if torch.version.cuda is None and torch.version.hip is None:
            raise ModelLoadError(f"device: {device} was asked for, but this torch {torch.__version__} was built without "
                                 "CUDA (a CPU build). Use device auto or cpu, or install a CUDA build of torch.")
        if not torch.cuda.is_available():
            raise ModelLoadError(f"device: {device} was asked for, but no CUDA GPU is usable (driver missing or "
                                 "CUDA_VISIBLE_DEVICES hides it). Use device auto or cpu, or check the driver.")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ModelLoadError(f"device: {device} does not exist; this machine has {torch.cuda.device_count()} "
                                 f"CUDA device(s): cuda:0..cuda:{torch.cuda.device_count() - 1}")
        return device
    available = {
        "mps": getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available(),
        "xpu": hasattr(torch, "xpu") and torch.xpu.is_available(),
    }
    if dev.type not in available:
        raise ModelLoadError(f"device: {device!r} is not supported here; use auto, cuda, xpu, mps or cpu")
    if not available[dev.type]:
        raise ModelLoadError(f"device: {device} was asked for, but it is not available on this machine; "
                             "use device auto or cpu")
    return device


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
