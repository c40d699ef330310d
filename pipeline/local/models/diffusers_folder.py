"""Models with diffusers' own tensor names, built empty and filled from their weights file as the single file is.

diffusers' and transformers' ``from_pretrained`` read a component's whole file in its stored dtype and then cast each
tensor to the load dtype, on one thread. A model whose file has diffusers' names needs no converter: it is built on
``meta`` without random initialisation and its tensors come from a :class:`~.lazy_checkpoint.LazyCheckpoint`,
cast once into their final place and read on torch's threads. This is how the SDXL base's models in a diffusers
folder, a ControlNet folder and a ControlNet file in diffusers layout are loaded.

A folder this cannot read the same way (weights sharded, only in a variant or a pickle, or names from an older
diffusers) is left to ``from_pretrained``, which knows those layouts, and so is a file stored in the load dtype
already (``from_pretrained`` then maps it without a copy): :func:`folder_models` returns only what it loaded.
"""

from __future__ import annotations

import json
from pathlib import Path

from ...errors import ModelLoadError
from .lazy_checkpoint import checkpoint_tensors, stored_dtypes
from .checks import TensorIndex, read_index
from .load_lock import load_lock, no_random_init

# component -> (weights file diffusers reads first, library, class name)
SDXL_PARTS = {
    "unet": ("diffusion_pytorch_model.safetensors", "diffusers", "UNet2DConditionModel"),
    "vae": ("diffusion_pytorch_model.safetensors", "diffusers", "AutoencoderKL"),
    "text_encoder": ("model.safetensors", "transformers", "CLIPTextModel"),
    "text_encoder_2": ("model.safetensors", "transformers", "CLIPTextModelWithProjection"),
}


def empty_model(cls, folder: Path | None = None, config: dict | None = None):
    """``cls`` (a diffusers or transformers model class) on ``meta``, built from ``config`` or ``folder``'s."""
    try:
        from accelerate import init_empty_weights
    except ImportError:  # pragma: no cover - accelerate is a diffusers dependency here: built on the CPU instead
        from contextlib import nullcontext as init_empty_weights
    with no_random_init(), init_empty_weights():
        if hasattr(cls, "from_config"):  # diffusers
            return cls.from_config(config if config is not None else cls.load_config(str(folder)))
        return cls(cls.config_class.from_pretrained(str(folder)))


def mismatch(model, idx: TensorIndex) -> str | None:
    """What keeps ``idx``'s tensors from filling ``model`` as they are (None: nothing)."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(idx.shapes))
    wrong = sorted(k for k in expected if k in idx.shapes and tuple(idx.shapes[k]) != expected[k])
    if wrong:
        k = wrong[0]
        return f"{len(wrong)} tensors have other shapes (e.g. {k}: file {tuple(idx.shapes[k])}, config {expected[k]})"
    if missing:
        return f"{len(missing)} tensors are missing (e.g. {missing[0]})"
    return None


def fill(model, idx: TensorIndex, dtype):
    """``model`` (from :func:`empty_model`, checked by :func:`mismatch`) with ``idx``'s tensors, cast to ``dtype``;
    tensors the model has no place for are not read."""
    expected = model.state_dict().keys()
    sd = checkpoint_tensors(idx, dtype, keep=lambda k: k in expected)
    tensors = {k: sd[k] for k in expected}  # read (the long part) before taking the lock
    with load_lock():  # assign=True registers each as a parameter: another load's init_empty_weights puts it on meta
        try:
            model.load_state_dict(tensors, strict=True, assign=True)
        except RuntimeError as exc:  # shapes were checked: a type the model cannot hold (int8 weights, say)
            raise idx.error(f"does not fit {type(model).__name__} ({' '.join(str(exc).split())[:400]}).") from None
        if dtype is not None:
            model.to(dtype=dtype)  # the buffers the constructor made (the weights are in dtype already)
    return model.eval()


def needs_cast(idx: TensorIndex, dtype) -> bool:
    """Whether a floating tensor of the file is stored in another dtype than ``dtype``."""
    return dtype is not None and any(t.is_floating_point and t != dtype for t in stored_dtypes(idx))


def folder_model(cls, folder: Path, weights: str, dtype, label: str):
    """``cls`` from a model folder (``config.json`` + ``weights``) read as the single file is; None when its one
    weights file is absent, does not fit the config as it is, or is stored in ``dtype`` already: then
    ``from_pretrained`` maps the file's tensors as they are, which copies nothing at all."""
    if not (folder / weights).is_file():
        return None
    idx = read_index(folder / weights, label)
    if not needs_cast(idx, dtype):
        return None
    model = empty_model(cls, folder)
    return fill(model, idx, dtype) if mismatch(model, idx) is None else None


def folder_models(folder: Path, dtype, label: str, skip=()) -> dict:
    """The SDXL base's models in diffusers folder ``folder`` that can be read as the single file is; the others
    (and those in ``skip``) are left out, for ``from_pretrained``."""
    import importlib

    models = {}
    index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    for name, (weights, library, cls_name) in SDXL_PARTS.items():
        if name in skip or list(index.get(name) or ()) != [library, cls_name]:
            continue
        cls = getattr(importlib.import_module(library), cls_name)
        model = folder_model(cls, folder / name, weights, dtype, f"{label} ({name})")
        if model is not None:
            models[name] = model
    return models


def load_diffusers_file(cls, idx: TensorIndex, config: dict, dtype, refusal: str):
    """A model with diffusers' names in one file; ``refusal`` (with ``{detail}``) is the error when it does not
    match ``config``."""
    model = empty_model(cls, config=config)
    detail = mismatch(model, idx)
    if detail is not None:
        raise ModelLoadError(refusal.replace("{detail}", detail))
    return fill(model, idx, dtype)
