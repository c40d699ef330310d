"""Which local failures a remote run can help with (the sampler's opt-in fallback to fal).

Only the classification lives here; running the request on fal is the fal client's job.
"""

from __future__ import annotations

from ..errors import GenerationCancelled, RequestError


def local_failure_reason(exc: BaseException) -> str | None:
    """Why a *local* run cannot go on (so falling back to fal makes sense), or None.

    True for: CUDA/MPS out of memory, no usable GPU / CUDA driver, a device that cannot be used.
    Not for bad requests, missing model files or a user cancel (fal would not help, or must not run).
    """
    if isinstance(exc, (RequestError, GenerationCancelled, KeyboardInterrupt)):
        return None
    name = type(exc).__name__
    text = str(exc)
    low = text.lower()
    if name in ("OutOfMemoryError",) or "out of memory" in low:
        return f"local generation ran out of GPU memory ({name})"
    markers = ("no cuda gpus are available", "found no nvidia driver", "cuda driver", "torch not compiled with cuda",
               "cuda error", "mps backend out of memory", "no usable gpu", "cudnn_status",
               "requires accelerator, but not found")
    if any(m in low for m in markers):
        return f"no usable GPU for local generation ({name}: {text[:200]})"
    return None
