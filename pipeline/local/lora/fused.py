"""LoRA on a compiled pipeline: the active set is fused into the weights, so the compiled graph never changes.

On a plain pipeline LoRAs stay PEFT adapters (``lora.py``: switching is a scale change). Under torch.compile each
adapter switch or scale change would recompile. Here the request's set is read and checked by the same code
(``lora.load_lora``), merged into the weights in place at its scales, and PEFT's wrappers are removed again: the
compiled models keep their module tree and parameter objects, only the values change. The weights a LoRA touched
are kept once, on the CPU (up to the size of those layers: about 2.6 GB for an SDXL LoRA on every attention layer),
and copied back before the next set is fused, so switching never drifts by rounding. A switch costs reading the
set's files again and one merge; the same set again costs nothing.
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass, field

from ...request import LoraSpec
from ..memory.compile import is_compiled, uncompiled
from .adapters import COMPONENTS, LoadedLora, _file_key, activate, load_lora, loaded_adapters, resolve_source
from ..memory.placement import offload_suspended
from ..quiet import quiet_libraries


@dataclass
class _Fused:
    backup: dict = field(default_factory=dict)  # layer -> its original weight, on the CPU
    active: tuple = ()  # ((file key, scale), ...) of the set fused now
    loaded: list = field(default_factory=list)


_STATE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # pipe -> _Fused


def activate_any(pipe, loras, lora_dirs=None, **resolve_kwargs) -> list[LoadedLora]:
    """Make ``loras`` the pipeline's active set: fused on a compiled pipeline, as PEFT adapters otherwise. Under an
    offload mode, a set that reads files runs with the offload hooks out of the way (``offload_suspended``)."""
    if not is_compiled(pipe):
        kept = loaded_adapters(pipe)
        reads = any(_file_key(resolve_source(s.path, lora_dirs, **resolve_kwargs)) not in kept for s in _specs(loras))
        with offload_suspended(pipe) if reads else contextlib.nullcontext():
            return activate(pipe, loras, lora_dirs, **resolve_kwargs)
    return activate_fused(pipe, loras, lora_dirs, **resolve_kwargs)


def _specs(loras) -> list[LoraSpec]:
    return [l if isinstance(l, LoraSpec) else LoraSpec(l["path"], float(l.get("scale", 1.0))) for l in loras or ()]


def preload(pipe, source: str, lora_dirs=None, **kwargs) -> LoadedLora:
    """Read and check a LoRA now (so a bad file fails early); on a compiled pipeline nothing stays loaded."""
    if not is_compiled(pipe):
        with offload_suspended(pipe):
            return load_lora(pipe, source, lora_dirs, **kwargs)
    with uncompiled(pipe), offload_suspended(pipe):
        try:
            return load_lora(pipe, source, lora_dirs, **kwargs)
        finally:
            _unload(pipe)


def activate_fused(pipe, loras, lora_dirs=None, **resolve_kwargs) -> list[LoadedLora]:
    """Fuse ``loras`` into the weights. If anything fails once the weights may have changed (an out-of-memory error
    halfway through the merge), the originals are copied back before the error goes on, and the state says
    "unknown", so the next call restores them again whatever it asks for."""
    from diffusers.utils.peft_utils import set_weights_and_activate_adapters

    specs = _specs(loras)
    state = _STATE.setdefault(pipe, _Fused())
    wanted = tuple((_file_key(resolve_source(s.path, lora_dirs, **resolve_kwargs)), float(s.scale)) for s in specs)
    if wanted == state.active:
        return state.loaded
    with uncompiled(pipe), offload_suspended(pipe):
        state.active, state.loaded = None, []  # unknown until the originals are back or the set is fused
        _restore(state)
        if not specs:
            state.active = ()
            return []
        try:
            loaded = [load_lora(pipe, s.path, lora_dirs, **resolve_kwargs) for s in specs]
            weights: dict = {}
            for s, l in zip(specs, loaded):
                weights[l.adapter_name] = weights.get(l.adapter_name, 0.0) + float(s.scale)
            components = [c for c in COMPONENTS if getattr(getattr(pipe, c, None), "peft_config", None)]
            for comp in components:
                set_weights_and_activate_adapters(getattr(pipe, comp), list(weights), list(weights.values()))
            _keep_originals(pipe, state, components)
            with quiet_libraries():
                pipe.fuse_lora(components=components, adapter_names=list(weights), lora_scale=1.0)
        except BaseException:
            _unload(pipe)
            _restore(state)  # no half-merged weights left behind
            state.active = ()
            raise
        _unload(pipe)
    state.active, state.loaded = wanted, loaded
    return loaded


def _keep_originals(pipe, state: _Fused, components) -> None:
    for comp in components:
        for module in getattr(pipe, comp).modules():
            base = getattr(module, "base_layer", None)
            if base is not None and base not in state.backup:
                state.backup[base] = base.weight.detach().to("cpu", copy=True)


def _restore(state: _Fused) -> None:
    import torch

    with torch.no_grad():
        for layer, original in state.backup.items():
            layer.weight.copy_(original.to(layer.weight.device, layer.weight.dtype))


def _unload(pipe) -> None:
    """Remove PEFT's wrappers (fused values stay in the weights) and forget the adapters."""
    with quiet_libraries():
        pipe.unload_lora_weights()
    loaded_adapters(pipe).clear()
