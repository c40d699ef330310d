"""Where a loaded pipeline's weights go: the memory mode (a row of choices.MEMORY_MODES_TABLE; ``auto`` resolved from
the free memory and the models' sizes), VAE tiling, the attention backend and torch.compile."""

from __future__ import annotations

import contextlib
import logging
import weakref

from ...errors import ModelLoadError
from .choices import MEMORY_MODES_TABLE, memory_mode_row
from .devices import free_memory_bytes
from .plan import choose_memory_mode, component_bytes

log = logging.getLogger("sdxl_controlnet_img2img")

_MEMORY_MODE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # pipe -> the memory mode it was placed in
_DEVICE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # pipe -> the device its offload hooks run on
OFFLOAD_MODES = tuple(m.name for m in MEMORY_MODES_TABLE if m.offload)


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
    """Put ``pipe``'s weights where ``mode`` wants them (diffusers' own offload hooks for the offload modes: the
    row's ``offload`` method).

    The offload modes also take the CPU as the execution device (what the tests run them with: accelerate's real
    hooks, weights moved between the CPU and ``meta``)."""
    row = memory_mode_row(mode)
    if row is not None and row.offload:
        getattr(pipe, row.offload)(device=device)
    else:
        pipe.to(device)
    if row is not None and row.per_layer and str(device).split(":")[0] == "cpu":
        _plain_cpu_execution(pipe)
    _MEMORY_MODE[pipe] = mode
    _DEVICE[pipe] = device


def _plain_cpu_execution(pipe) -> None:
    """diffusers names the execution device ``cpu:0``; torch's ``Parameter.to("cpu:0")`` copies into a plain tensor
    (it is not the same device as ``cpu`` to ``.to``), which accelerate's sequential offload then cannot move back to
    ``meta``. Name it ``cpu``: the hooks then onload a weight without copying it. (Model offload moves whole
    modules with ``Module.to``, which keeps parameters; diffusers re-applies it after each call anyway.)"""
    import torch

    cpu = torch.device("cpu")
    pipe._offload_device = cpu
    for model in pipe.components.values():
        if not isinstance(model, torch.nn.Module):
            continue
        for module in model.modules():
            hook = getattr(module, "_hf_hook", None)
            for h in getattr(hook, "hooks", None) or ([hook] if hook is not None else []):
                if getattr(h, "execution_device", None) is not None and torch.device(h.execution_device).type == "cpu":
                    h.execution_device = cpu


@contextlib.contextmanager
def offload_suspended(pipe):
    """``pipe`` with its offload hooks out of the way while LoRA layers are added (PEFT) or merged, placed again as
    it was afterwards. diffusers' ``load_lora_weights`` would take the hooks off and put them back itself, but on the
    device it guesses (``enable_*_offload()`` without a device: refused where it finds no accelerator, as for a
    DirectML device or the CPU), and under model offload re-hooking changes every model's ``forward``, which a
    compiled model would trace again. So: under model offload the hooks stay (the models sit on the CPU between
    calls and the hook moves whatever the module holds, LoRA layers included) and diffusers is only kept from
    seeing them; under sequential offload (weights on ``meta``) they are taken off, which puts the weights back
    on the CPU, and applied again on the pipeline's own device."""
    mode = _MEMORY_MODE.get(pipe)
    if mode not in OFFLOAD_MODES:
        yield pipe
        return
    import torch

    models = [getattr(m, "_orig_mod", m) for m in pipe.components.values() if isinstance(m, torch.nn.Module)]
    if not memory_mode_row(mode).per_layer:
        hidden = {m: m.__dict__.pop("_hf_hook") for m in models if "_hf_hook" in m.__dict__}
        try:
            yield pipe
        finally:
            for m, hook in hidden.items():
                m._hf_hook = hook
        return
    from accelerate.hooks import remove_hook_from_module

    for m in models:
        remove_hook_from_module(m, recurse=True)
    try:
        yield pipe
    finally:
        apply_memory_mode(pipe, mode, _DEVICE[pipe])


def compile_conflict(mode: str, auto_reason: str | None = None) -> str | None:
    """Why ``compile`` cannot run in memory mode ``mode`` (None when it can), naming both options and what to choose.

    Sequential offload puts accelerate's hooks on every layer: each call moves each layer's weights from the CPU
    to the device and back to ``meta``, outside anything a compiled graph can hold (the traced graph breaks at every
    layer), and a fused LoRA set would have to be merged into weights that are not there. Model offload moves whole
    models between calls and works with compile (``tests/test_memory_modes.py``)."""
    row = memory_mode_row(mode)
    if row is None or not row.per_layer:
        return None
    chosen = f"memory_mode auto chose {mode} ({auto_reason})" if auto_reason is not None else f"memory_mode {mode}"
    return (f"compile: cannot be used with {chosen}: that mode moves every layer's weights onto the device and off "
            "again during each call, which a compiled graph cannot hold. Turn compile off, or choose memory_mode "
            "model_cpu_offload or none (they need more free GPU memory).")


def place(pipe, opts) -> None:
    """Place a freshly built pipeline as the resolved :class:`~.loading.LoadOptions` ``opts`` say."""
    compiles = opts.compile and opts.device.startswith("cuda")
    if opts.host_placement:
        _MEMORY_MODE[pipe] = "host"
    else:
        mode = resolve_memory_mode(pipe, opts.device) if opts.memory_mode == "auto" else opts.memory_mode
        conflict = compile_conflict(mode, "too little free GPU memory for the other modes") if compiles else None
        if conflict:
            raise ModelLoadError(conflict)
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
    if compiles:
        from .compile import compile_models

        compile_models(pipe)
