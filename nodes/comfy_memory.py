"""Our diffusers pipeline under ComfyUI's model management, so it shares the GPU the way ComfyUI's own models do.

Imported lazily, and only inside ComfyUI (every function is a no-op or returns None without it). The facts behind
each choice are in ``shared/COMFY_MODEL_MANAGEMENT.md`` (ComfyUI 0.8.0):

- device and precision follow ComfyUI (``get_torch_device()``, its --cpu/--lowvram/--novram/--gpu-only state and
  its fp16/bf16 decision for the UNet, with manual cast resolved to a dtype diffusers layers compute in);
- with memory mode ``none`` the pipeline's five models sit in one container module, wrapped in an all-or-nothing
  ``ModelPatcher`` (a partial load would split plain layers across devices): ComfyUI loads it before each run with
  our working-memory estimate (``load_models_gpu``: only what is needed is evicted), its "Unload models" and its
  out-of-memory handling unload it, and its own loads evict it when VRAM is short;
- with an offload mode (diffusers' accelerate hooks, which must not be mixed with a patcher) we only ask ComfyUI
  to free the memory our largest stage needs (``free_memory``);
- when ComfyUI unloads our model on a CPU-only ComfyUI (where unloading moves nothing) the pipeline itself is
  freed: a run after "Unload models" loads it again.
"""

from __future__ import annotations

import weakref

from .comfy_hooks import log

CALLBACK_KEY = "sdxlcn"
_PATCHERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # pipe -> its ModelPatcher
_classes: dict = {}


def model_management():
    """ComfyUI's ``comfy.model_management``, or None outside ComfyUI."""
    try:
        import comfy.model_management as mm  # type: ignore
    except ImportError:
        return None
    return mm


def device_and_dtype():
    """(device name, torch dtype) as ComfyUI would run an SDXL UNet, or None outside ComfyUI."""
    mm = model_management()
    if mm is None:
        return None
    import torch

    device = mm.get_torch_device()
    supported = [torch.float16, torch.bfloat16, torch.float32]
    dtype = mm.unet_dtype(device, model_params=3_800_000_000, supported_dtypes=supported)
    cast = mm.unet_manual_cast(dtype, device, supported)
    if cast is not None:  # plain diffusers layers cannot cast per layer: compute in the cast dtype
        dtype = cast
    return str(device), dtype


def _container_and_patcher_classes():
    if not _classes:
        import torch
        from comfy.model_patcher import ModelPatcher  # type: ignore

        class SDXLCNPipelineModels(torch.nn.Module):
            """The pipeline's models as one module (named in ComfyUI's log); ``device`` is writable, as
            ModelPatcher needs (diffusers models have a read-only ``device``)."""

            def __init__(self, pipe):
                super().__init__()
                for name in ("unet", "controlnet", "vae", "text_encoder", "text_encoder_2"):
                    if getattr(pipe, name, None) is not None:
                        self.add_module(name, getattr(pipe, name))
                self.device = None
                self.pipe_ref = weakref.ref(pipe)

        class SDXLCNModelPatcher(ModelPatcher):
            """All or nothing: a partial load would leave plain layers on the CPU while the log says loaded."""

            def load(self, device_to=None, lowvram_model_memory=0, force_patch_weights=False, full_load=False):
                return super().load(device_to, 0, force_patch_weights, True)

            def partially_unload(self, device_to, memory_to_free=0, force_patch_weights=False):
                return 0  # ComfyUI then unloads us fully

        _classes.update(container=SDXLCNPipelineModels, patcher=SDXLCNModelPatcher)
    return _classes["container"], _classes["patcher"]


_RELEASED: list = []  # (pipe, patcher) emptied during ComfyUI's unload, kept alive until a safe point


def _on_detach(patcher, unpatch_all):
    """ComfyUI unloaded our models. On a CPU-only ComfyUI that moves nothing, so the weights are dropped here.

    This runs inside ComfyUI's ``free_memory`` loop: nothing may be garbage-collected now (the container dying would
    run ComfyUI's finalizer, which edits the list being iterated). So the weights go to the ``meta`` device (their
    memory is returned at once), the pipeline leaves our cache, and the emptied objects are kept until
    :func:`release_pending` runs at the start of our next node."""
    if not unpatch_all:  # a re-load of an already loaded model, or the patcher being collected: not an unload
        return
    if str(patcher.load_device) != str(patcher.offload_device):
        return  # the weights moved to the offload device; the next run loads them back
    from ..pipeline.local.models.loading import forget_cached_pipeline
    from ..pipeline.local.memory.release import trim_heap

    pipe = patcher.model.pipe_ref()
    if pipe is None:
        return
    patcher.model.to("meta")
    trim_heap()  # the freed weights' pages back to the OS (no garbage collection: safe here)
    forget_cached_pipeline(pipe)
    _RELEASED.append((pipe, patcher))
    log.info("SDXL ControlNet: ComfyUI unloaded the pipeline; its memory is freed and it loads again when next used")


def release_pending() -> None:
    """Let go of pipelines emptied during an unload (call where collecting garbage is safe: our own nodes)."""
    _RELEASED.clear()


def choose_mode(pipe, mode: str, device: str) -> str:
    """``auto`` inside ComfyUI: --novram -> sequential offload, --lowvram -> model offload, the CPU and MPS -> none;
    otherwise from the card's *total* memory (ComfyUI evicts its own models for ours as needed)."""
    if mode != "auto":
        return mode
    mm = model_management()
    state = getattr(mm.vram_state, "name", str(mm.vram_state))
    if state in ("DISABLED", "SHARED"):
        chosen, why = "none", f"ComfyUI runs on {device} ({state})"
    elif state == "NO_VRAM":
        chosen, why = "sequential_cpu_offload", "ComfyUI was started with --novram"
    elif state == "LOW_VRAM":
        chosen, why = "model_cpu_offload", "ComfyUI was started with --lowvram"
    else:
        from ..pipeline.local.memory.plan import choose_memory_mode, component_bytes

        chosen, why = choose_memory_mode(int(mm.get_total_memory(mm.get_torch_device())), component_bytes(pipe))
    log.info("SDXL ControlNet: memory_mode auto -> %s (%s)", chosen, why)
    return chosen


def adopt(pipe, mode: str) -> None:
    """Take a freshly loaded pipeline (weights on the CPU) under ComfyUI's management in memory mode ``mode``."""
    mm = model_management()
    if mm is None:
        return
    release_pending()
    from ..pipeline.local.memory.choices import memory_mode_row
    from ..pipeline.local.memory.placement import apply_memory_mode

    device = mm.get_torch_device()
    mode = choose_mode(pipe, mode, str(device))
    if memory_mode_row(mode).offload:  # diffusers' hooks place the weights (never mixed with a patcher)
        apply_memory_mode(pipe, mode, str(device))
        return
    container_cls, patcher_cls = _container_and_patcher_classes()
    from comfy.patcher_extension import CallbacksMP  # type: ignore

    from ..pipeline.local.memory.plan import component_bytes

    size = sum(component_bytes(pipe).values())
    patcher = patcher_cls(container_cls(pipe), load_device=device, offload_device=mm.unet_offload_device(), size=size)
    patcher.add_callback_with_key(CallbacksMP.ON_DETACH, CALLBACK_KEY, _on_detach)
    _PATCHERS[pipe] = patcher


def patcher_of(pipe):
    return _PATCHERS.get(pipe)


def before_sampling(pipe, width: int, height: int) -> None:
    """Ask ComfyUI for what this run needs: load our models (evicting only what must go), or, in an offload mode,
    free the memory of our largest stage plus the working memory."""
    mm = model_management()
    if mm is None:
        return
    release_pending()
    if getattr(pipe, "codec", None) is not None:
        return  # on ComfyUI's own models: its codec has ComfyUI load them before each denoise
    from ..pipeline.local.memory.plan import STAGES, component_bytes, working_bytes

    work = working_bytes(width, height)
    patcher = _PATCHERS.get(pipe)
    if patcher is not None:
        mm.load_models_gpu([patcher], memory_required=work, force_full_load=True)
        return
    sizes = component_bytes(pipe)
    mm.free_memory(sum(sizes.get(n, 0) for n in STAGES) + work, mm.get_torch_device())
