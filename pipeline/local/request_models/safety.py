"""The Stable Diffusion safety checker, run locally on generated images (``enable_safety_checker``).

What fal returns, and what this matches
---------------------------------------
fal's SDXL endpoints answer with ``has_nsfw_concepts``: one boolean per returned image (that much
is in fal's output schema). For an image that is flagged, the image itself comes back as a plain
black image of the same size: fal's docs do not spell this out, but it is the behaviour of diffusers'
``StableDiffusionSafetyChecker`` and what users of fal's API report (e.g. gokayfem/ComfyUI-fal-API
issue #4, black images with the NSFW filter on). The request still succeeds; nothing is dropped or
reordered.

Locally we do the same, with the same model: the checker is diffusers' ``StableDiffusionSafetyChecker``
(weights: ``CompVis/stable-diffusion-safety-checker``) with its CLIP image processor. Its own
``forward`` decides the flags and blanks the flagged images (an all-zero array, i.e. black RGB of the
same width and height); unflagged images are returned untouched (the same PIL objects, no
round-trip). The flags go to ``GenerationResult.has_nsfw_concepts`` and from there to
``result.json`` and the node's output.

Folder layouts accepted by :func:`load_safety_checker`:

* the checker's own layout (as on the hub as ``CompVis/stable-diffusion-safety-checker``):
  ``config.json`` + ``model.safetensors`` (or ``pytorch_model.bin``) + ``preprocessor_config.json``;
* a diffusers pipeline folder with ``safety_checker/`` and ``feature_extractor/`` subfolders
  (e.g. a Stable Diffusion 1.5 diffusers folder);
* a checker folder without ``preprocessor_config.json``: CLIP's standard preprocessing at the
  vision model's ``image_size`` is used (what the real checker's processor file says anyway).

A hub id (``owner/name``) is only looked up in the local Hugging Face cache unless the caller
passes ``allow_network=True``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ...errors import ModelLoadError
from ..models.load_lock import load_lock
from ..memory.release import SingleModelCache

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json")
CHECKER_CLASS = "StableDiffusionSafetyChecker"
# CLIP's standard image statistics (the values in the real checker's preprocessor_config.json)
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

_cache = SingleModelCache()


def _has_weights(folder: Path) -> bool:
    return any((folder / name).is_file() for name in WEIGHT_FILES)


def _config_class(config_path: Path) -> list[str]:
    try:
        cfg = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    return list(cfg.get("architectures") or [])


def split_layout(folder: str | os.PathLike) -> tuple[Path, Path | None]:
    """``(model_dir, processor_dir or None)`` for a checker folder; raises :class:`ModelLoadError` naming what is missing."""
    folder = Path(folder)
    if (folder / "safety_checker" / "config.json").is_file():  # diffusers pipeline layout
        model_dir = folder / "safety_checker"
        proc_dir = None
        for proc in (folder / "feature_extractor", model_dir):
            if (proc / "preprocessor_config.json").is_file():
                proc_dir = proc
                break
    elif (folder / "config.json").is_file():
        model_dir = folder
        proc_dir = folder if (folder / "preprocessor_config.json").is_file() else None
    else:
        raise ModelLoadError(
            f"safety checker: {folder} has no config.json (nor safety_checker/config.json); it should hold "
            "CompVis/stable-diffusion-safety-checker (config.json, model.safetensors, preprocessor_config.json)"
        )
    archs = _config_class(model_dir / "config.json")
    if CHECKER_CLASS not in archs:
        raise ModelLoadError(
            f"safety checker: {model_dir / 'config.json'} describes {archs or 'an unknown model'}, "
            f"not {CHECKER_CLASS}; use CompVis/stable-diffusion-safety-checker"
        )
    if not _has_weights(model_dir):
        raise ModelLoadError(
            f"safety checker: {model_dir} has config.json but no weights ({' or '.join(WEIGHT_FILES[:2])}); "
            "copy the weights file of CompVis/stable-diffusion-safety-checker next to it"
        )
    return model_dir, proc_dir


def _processor_class():
    """CLIP's image processor: the torchvision-backed one when torchvision is there, else the PIL one."""
    import importlib.util

    import transformers

    if importlib.util.find_spec("torchvision") is None and hasattr(transformers, "CLIPImageProcessorPil"):
        return transformers.CLIPImageProcessorPil
    return transformers.CLIPImageProcessor


def _default_processor(image_size: int):
    return _processor_class()(
        do_resize=True,
        size={"shortest_edge": image_size},
        do_center_crop=True,
        crop_size={"height": image_size, "width": image_size},
        do_normalize=True,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
        do_convert_rgb=True,
    )


class LocalSafetyChecker:
    """The ``safety_checker`` hook of :func:`pipeline.generate.generate`.

    ``checker(images) -> (images, flags)``: ``images`` is a list of PIL images; flagged ones come back
    as black images of the same size and mode "RGB", the others unchanged; ``flags`` is one bool per image.
    """

    def __init__(self, model, processor, device: str, dtype, source: str = ""):
        self.model = model
        self.processor = processor
        self.device = device
        self.dtype = dtype
        self.source = source

    def __call__(self, images: list) -> tuple[list, list[bool]]:
        import numpy as np
        import torch
        from PIL import Image

        images = list(images)
        if not images:
            return [], []
        rgb = [img.convert("RGB") for img in images]
        clip_input = self.processor(images=rgb, return_tensors="pt").pixel_values.to(self.device, self.dtype)
        arrays = [np.asarray(img) for img in rgb]
        with torch.inference_mode():
            checked, flags = self.model(clip_input=clip_input, images=arrays)
        out = []
        for original, arr, flag in zip(images, checked, flags):
            if flag:  # the checker's own replacement: an all-zero array, i.e. a black image
                out.append(Image.fromarray(np.clip(np.asarray(arr), 0, 255).astype(np.uint8), "RGB"))
            else:
                out.append(original)
        return out, [bool(f) for f in flags]


def load_safety_checker(path: str | os.PathLike, *, device: str | None = None, dtype=None,
                        allow_network: bool = False) -> LocalSafetyChecker:
    """Load (once; later calls with the same folder/device/dtype reuse it) the checker at ``path``.

    ``path`` is a folder (layouts in the module docstring) or a hub id such as
    ``CompVis/stable-diffusion-safety-checker``; a hub id is read from the local Hugging Face cache
    only, unless ``allow_network`` is true.
    """
    from ..memory.devices import default_device, default_dtype

    device = device or default_device()
    dtype = dtype or default_dtype(device)
    local = Path(path).expanduser()
    key = (str(local.resolve()) if local.exists() else str(path), device, str(dtype))
    return _cache.get_or_load(key, lambda: _load(path, local, device, dtype, allow_network))


def _load(path, local: Path, device, dtype, allow_network: bool) -> LocalSafetyChecker:
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

    if local.exists():
        model_dir, proc_dir = split_layout(local)
        try:
            with load_lock():
                model = StableDiffusionSafetyChecker.from_pretrained(model_dir, dtype=dtype, local_files_only=True)
            if proc_dir is not None:
                processor = _processor_class().from_pretrained(proc_dir, local_files_only=True)
            else:
                processor = _default_processor(int(model.config.vision_config.image_size))
        except ModelLoadError:
            raise
        except Exception as exc:  # corrupt or mismatched files
            raise ModelLoadError(f"safety checker: could not load {local}: {exc}") from exc
    else:
        if "/" not in str(path) or str(path).startswith((".", "/", "~")):
            raise ModelLoadError(f"safety checker: {path} does not exist; give a folder or a hub id")
        try:
            with load_lock():
                model = StableDiffusionSafetyChecker.from_pretrained(str(path), dtype=dtype,
                                                                     local_files_only=not allow_network)
            processor = _processor_class().from_pretrained(str(path), local_files_only=not allow_network)
        except Exception as exc:
            hint = "" if allow_network else " (looked in the local Hugging Face cache only; no download was attempted)"
            raise ModelLoadError(f"safety checker: could not load {path!r}{hint}: {exc}") from exc
    model.to(device)
    model.eval()
    return LocalSafetyChecker(model, processor, device, dtype, source=str(path))


def free_safety_checker() -> bool:
    """Drop the cached checker (and its GPU memory). Returns whether one was loaded."""
    return _cache.free()


def cached_safety_checker() -> LocalSafetyChecker | None:
    """The loaded checker, if any (for status displays and tests)."""
    return _cache.current()
