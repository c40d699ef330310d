"""Where the models run and in which precision: the defaults, and a device or dtype name checked and read.

Imported by the loader, the safety checker, the prompt expander and the loader node; the dtype names users may give
are a table in choices.py.
"""

from __future__ import annotations

from ...errors import ModelInputError
from .choices import DTYPES, DTYPES_TABLE


def default_device() -> str:
    """The best device torch can use here: CUDA (or ROCm), then Intel XPU, then Apple MPS, then the CPU."""
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if hasattr(torch, "xpu") and torch.xpu.is_available():
        return "xpu"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def check_device(device: str) -> str:
    """``device`` when torch can use it here; else a :class:`ModelInputError` naming the input and the fix."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ModelInputError("device", f"{device!r} is not a device name; use auto, cuda, cuda:N, xpu, mps or "
                                        "cpu") from None
    if dev.type == "cpu":
        return device
    if dev.type == "cuda":
        if torch.version.cuda is None and torch.version.hip is None:
            raise ModelInputError("device", f"{device} was asked for, but this torch {torch.__version__} was built "
                                            "without CUDA (a CPU build). Use device auto or cpu, or install a CUDA "
                                            "build of torch.")
        if not torch.cuda.is_available():
            raise ModelInputError("device", f"{device} was asked for, but no CUDA GPU is usable (driver missing or "
                                            "CUDA_VISIBLE_DEVICES hides it). Use device auto or cpu, or check the "
                                            "driver.")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ModelInputError("device", f"{device} does not exist; this machine has {torch.cuda.device_count()} "
                                            f"CUDA device(s): cuda:0..cuda:{torch.cuda.device_count() - 1}")
        return device
    available = {
        "mps": getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available(),
        "xpu": hasattr(torch, "xpu") and torch.xpu.is_available(),
    }
    if dev.type not in available:
        return device  # a backend torch knows (e.g. DirectML's privateuseone, as ComfyUI picks it): torch decides
    if not available[dev.type]:
        raise ModelInputError("device", f"{device} was asked for, but it is not available on this machine; "
                                        "use device auto or cpu")
    return device


def dtype_for(device_type: str, cuda_capability: tuple[int, int] | None = None, xpu_bf16: bool = False):
    """The default precision for a device, from the facts that decide it (the narrowest point tests stub).

    CUDA: bf16 only where the card computes it natively (compute capability >= 8.0: Ampere and newer);
    ``torch.cuda.is_bf16_supported()`` also says True on Turing/Volta/Pascal (T4, V100, RTX 20xx, GTX 16xx),
    where bf16 is emulated and very slow, so those get fp16. XPU: bf16 where the card supports it, else fp16.
    MPS: fp16. CPU: fp32 (bf16 on the CPU is slower than fp32 on most machines; ask for it with dtype bf16).
    """
    import torch

    if device_type == "cuda":
        return torch.bfloat16 if cuda_capability is not None and tuple(cuda_capability) >= (8, 0) else torch.float16
    if device_type == "xpu":
        return torch.bfloat16 if xpu_bf16 else torch.float16
    if device_type == "mps":
        return torch.float16
    return torch.float32


def default_dtype(device: str):
    """:func:`dtype_for` the device ``device`` names, with its facts read from torch."""
    import torch

    dev = torch.device(device)
    capability = xpu_bf16 = None
    if dev.type == "cuda" and torch.cuda.is_available():
        capability = torch.cuda.get_device_capability(dev)
    if dev.type == "xpu" and hasattr(torch, "xpu"):
        xpu_bf16 = bool(getattr(torch.xpu, "is_bf16_supported", lambda: False)())
    return dtype_for(dev.type, capability, bool(xpu_bf16))


def parse_dtype(value):
    """None/"auto" -> None; "fp16"/"float16"/"bf16"/"fp32"... or a torch.dtype -> torch.dtype."""
    if value is None or value == "auto":
        return None
    import torch

    if isinstance(value, torch.dtype):
        return value
    names = {n: getattr(torch, d.torch_name) for d in DTYPES_TABLE if d.torch_name for n in (d.name, *d.spellings)}
    try:
        return names[str(value).lower()]
    except KeyError:
        raise ModelInputError("dtype", f"{value!r} is not one of {', '.join(DTYPES)}") from None


def free_memory_bytes(device: str) -> int | None:
    """Free memory on a GPU device as torch sees it (None for the CPU, MPS and devices that cannot tell)."""
    import torch

    dev = torch.device(device)
    try:
        if dev.type == "cuda":
            return int(torch.cuda.mem_get_info(dev)[0])
        if dev.type == "xpu" and hasattr(torch.xpu, "mem_get_info"):
            return int(torch.xpu.mem_get_info(dev)[0])
    except Exception:  # noqa: BLE001 - a driver that cannot tell: decide as if unknown
        return None
    return None
