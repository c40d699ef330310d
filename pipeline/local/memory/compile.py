"""torch.compile that stays compiled: one graph per model for every fal size preset and every LoRA set.

What recompiled before (counted with a counting backend, ``tests/test_compile.py``):

- **sizes**: with static shapes every new resolution traced again; ``dynamic=True`` alone still specialised on the
  first call's square shape (torch's "duck sizing" makes equal sizes one symbol, so a 1024x1024 graph guards on
  height == width and a portrait preset recompiled). Compiled models are traced with duck sizing off
  (:func:`compiled_call`), so the six fal presets (all multiples of 64 pixels) share one graph;
- **LoRA**: PEFT's adapters wrap every layer they touch, and an adapter switch or a new scale changes what the
  graph traced. On a compiled pipeline the active set is fused into the weights instead (``lora_fused.py``): the
  module tree and the parameter objects stay the same, only their values change;
- **requires_grad**: loading a LoRA freezes the weights it touches; a graph traced on weights that still required
  grad guards on it. Compiled models are frozen first.
"""

from __future__ import annotations

import contextlib

MODELS = ("unet", "controlnet")


def is_compiled(pipe) -> bool:
    return any(hasattr(getattr(pipe, name, None), "_orig_mod") for name in MODELS)


def compile_models(pipe, backend: str | object = "inductor") -> None:
    """Compile the UNet and ControlNet of ``pipe`` in place, with dynamic shapes (``backend``: torch's name or a
    callable backend, as tests pass to count compilations)."""
    import torch

    for name in MODELS:
        model = getattr(pipe, name, None)
        if model is None or hasattr(model, "_orig_mod"):
            continue
        model.requires_grad_(False)
        setattr(pipe, name, torch.compile(model, backend=backend, dynamic=True))


@contextlib.contextmanager
def uncompiled(pipe):
    """``pipe`` with its plain modules in place of the compiled wrappers (what LoRA loading must see: the wrappers
    prefix every layer name), the wrappers put back afterwards. The wrapped modules are the same objects."""
    swapped = {}
    for name in MODELS:
        model = getattr(pipe, name, None)
        if hasattr(model, "_orig_mod"):
            swapped[name] = model
            setattr(pipe, name, model._orig_mod)
    try:
        yield pipe
    finally:
        for name, model in swapped.items():
            setattr(pipe, name, model)


def compiled_call(pipe):
    """The context a compiled pipeline's calls run in (tracing without duck sizing); a no-op otherwise."""
    if not is_compiled(pipe):
        return contextlib.nullcontext()
    import torch.fx.experimental._config as fx_config

    return fx_config.patch(use_duck_shape=False)
