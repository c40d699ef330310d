"""Where a loaded pipeline's weights go: the memory mode (``auto`` resolved from the free memory and the models'
sizes), VAE tiling, the attention backend and torch.compile."""

from __future__ import annotations

import logging
import weakref

from ..errors import ModelLoadError
from .devices import free_memory_bytes
from .memory_plan import choose_memory_mode, component_bytes

log = logging.getLogger("sdxl_controlnet_img2img")

_MEMORY_MODE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # pipe -> the memory mode it was placed in


def memory_mode_of(pipe) -> str | None:
    """The memory mode ``pipe`` was placed in (``auto`` resolved), or "host" when a host application places it."""
    return _MEMORY_MODE.get(pipe)


def resolve_memory_mode(pipe, device: str, free_bytes: int | None = None) -> str:
    """``auto``'s choice for ``pipe`` on ``device`` (logged with the reason): none on the CPU/MPS and where the free
    memory cannot be read; otherwise from the free memory (``free_bytes``, default: as torch reads it) and the models'
    sizes (:func:`memory_plan.choose_memory_mode`)."""
    free = free_bytes if free_bytes is not None else free_memory_bytes(device)
    if device.startswith(("cpu", "mps")):
        mode, why = "none", f"on {device} the models share the machine's memory: nothing to offload"
    elif free is None:
        mode, why = "none", f"the device {device} does not report its free memory"
    else:
        mode, why = choose_memory_mode(free, component_bytes(pipe))
    log.info("memory_mode auto -> %s: %s", mode, why)
    return mode


def apply_memory_mode(pipe, mode: str, device: str) -> None:
    """Put ``pipe``'s weights where ``mode`` wants them (diffusers' own offload hooks for the offload modes)."""
    if mode == "model_cpu_offload":
        pipe.enable_model_cpu_offload(device=device)
    elif mode == "sequential_cpu_offload":
        pipe.enable_sequential_cpu_offload(device=device)
    else:
        pipe.to(device)
    _MEMORY_MODE[pipe] = mode


def place(pipe, opts) -> None:
    """Place a freshly built pipeline as the resolved :class:`~.loading.LoadOptions` ``opts`` say."""
    if opts.host_placement:
        _MEMORY_MODE[pipe] = "host"
    else:
        mode = resolve_memory_mode(pipe, opts.device) if opts.memory_mode == "auto" else opts.memory_mode
        apply_memory_mode(pipe, mode, opts.device)
    if opts.vae_tiling:
        pipe.vae.enable_tiling()
    if opts.attention in ("eager", "classic"):
        from diffusers.models.attention_processor import AttnProcessor

        pipe.unet.set_attn_processor(AttnProcessor())
        pipe.controlnet.set_attn_processor(AttnProcessor())
    elif opts.attention != "sdpa":
        try:
            pipe.unet.set_attention_backend(opts.attention)
            pipe.controlnet.set_attention_backend(opts.attention)
        except Exception as exc:  # noqa: BLE001
            raise ModelLoadError(
                f"attention: {opts.attention!r} cannot be used here ({type(exc).__name__}: {str(exc)[:200]}). "
                f"Use 'sdpa' (the default)."
            ) from None
    if opts.compile and opts.device.startswith("cuda"):
        from .compile import compile_models

        compile_models(pipe)
