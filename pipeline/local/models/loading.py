"""Loading a StableDiffusionXLControlNetImg2ImgPipeline from the files ComfyUI users keep.

Base model: a single ``.safetensors`` in the original SGM layout (``sd_xl_base_1.0.safetensors``
or a fine-tune), loaded offline with the bundled SDXL configs (:mod:`.sdxl_config`); a diffusers
folder; or a hub repo id when the network is allowed.
ControlNet: a diffusers folder, a single ``.safetensors`` with diffusers keys (bundled SDXL
ControlNet config), or a single file in the original layout (``control_model.*``).

Public API::

    load_pipeline(base, controlnet, options=None, *, device=None, dtype=None, **option_fields) -> pipe  # cached
    build_pipeline(base, controlnet, options) -> pipe                                                  # uncached
    free_cached_pipeline() -> bool
    LoadOptions(...)
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from ...errors import ModelInputError, ModelLoadError
from ..memory.choices import DEFAULT, MEMORY_MODES, memory_mode_row
from ..memory.devices import check_device, default_device, default_dtype, parse_dtype
from .diffusers_folder import folder_model, folder_models, load_diffusers_file
from .hub import hub_offline, looks_like_repo_id
from .load_lock import load_lock
from ..memory.release import SingleModelCache, release_memory
from .checks import (
    HINT_BASE,
    HINT_CONTROLNET,
    check_controlnet_config,
    check_controlnet_file,
    check_folder_weights,
    check_sdxl_base,
    read_index,
    read_json,
    unreadable,
)
from .pickles import pickles_readable
from ..memory.placement import compile_conflict, place
from ..quiet import drop_known_noise


@dataclass(frozen=True)
class LoadOptions:
    """How to load and place the pipeline. Every field is part of the cache key."""

    device: str | None = None  # None: the best available (devices.default_device)
    dtype: object = None  # None/"auto": bf16 (or fp16) on CUDA, fp16 on MPS, fp32 on CPU; or "fp16"/torch.float16...
    memory_mode: str = DEFAULT  # a name in choices.MEMORY_MODES (auto: chosen by memory_plan.py)
    vae_tiling: bool = False  # decode/encode in tiles: large images on small GPUs
    vae: str | None = None  # a VAE to use instead of the checkpoint's (e.g. sdxl-vae-fp16-fix): folder or file
    config_dir: str | None = None  # SDXL config folder for single-file checkpoints (default: bundled)
    controlnet_config_dir: str | None = None  # config.json folder for single-file ControlNets (default: bundled)
    allow_pickle: bool = False  # accept .ckpt/.pt (read with torch.load(weights_only=True))
    compile: bool = False  # torch.compile the UNet and ControlNet (CUDA only; ignored elsewhere)
    attention: str = "sdpa"  # sdpa | eager (alias classic) | a diffusers attention backend name (e.g. "flash")
    host_placement: bool = False  # leave the weights on the CPU: a host application (ComfyUI) places them

    def resolved(self) -> "LoadOptions":
        """Fill device/dtype defaults and validate; the result is what the cache key uses."""
        if self.compile and compile_conflict(self.memory_mode):  # the combination, whatever the device
            raise ModelLoadError(compile_conflict(self.memory_mode))
        device = check_device(self.device) if self.device else default_device()
        dtype = parse_dtype(self.dtype) or default_dtype(device)
        if self.memory_mode not in MEMORY_MODES:
            raise ModelInputError("memory_mode", f"{self.memory_mode!r} is not one of {', '.join(MEMORY_MODES)}")
        if memory_mode_row(self.memory_mode).needs_gpu and not device.startswith(("cuda", "xpu", "mps")):
            raise ModelInputError(
                "memory_mode", f"{self.memory_mode} moves weights between the CPU and a GPU, but the device is "
                               f"{device!r}. Use memory_mode none on the CPU."
            )
        if not isinstance(self.attention, str) or not self.attention:
            raise ModelInputError("attention", f"{self.attention!r} must be a name such as 'sdpa'")
        return replace(self, device=device, dtype=dtype)

    def describe(self) -> dict:
        d = asdict(self)
        d["dtype"] = str(d["dtype"]).replace("torch.", "") if d["dtype"] is not None else None
        return d


# ---------------------------------------------------------------- what a path is

def _classify(path, label: str, hint: str) -> tuple[str, object]:
    """('folder'|'file'|'hub', value). Raises ModelLoadError for a missing path."""
    if path is None or str(path).strip() == "":
        raise ModelLoadError(f"{label}: no model given. {hint}")
    p = Path(os.path.expanduser(str(path)))
    if p.is_dir():
        return "folder", p.resolve()
    if p.is_file():
        return "file", p.resolve()
    s = str(path)
    if looks_like_repo_id(s) and not p.suffix.lower() in (".safetensors", ".ckpt", ".pt", ".bin"):
        if hub_offline():
            raise ModelLoadError(
                f"{label}: {s} is not a file or folder here, and looks like a hub repo id, but the hub is offline "
                f"(HF_HUB_OFFLINE). Download it into a folder and give that folder. {hint}"
            )
        return "hub", s
    raise ModelLoadError(f"{label}: {p} does not exist. Check the path (and the file name's extension). {hint}")


def _file_identity(kind: str, value) -> tuple:
    """What identifies the source on disk, for the cache key: path + size + mtime of the files that matter."""
    if kind == "hub":
        return ("hub", value)
    p = Path(value)
    if kind == "file":
        st = p.stat()
        return ("file", str(p), st.st_size, st.st_mtime_ns)
    stamps = []
    for f in sorted(p.rglob("*")):
        if f.suffix in (".json", ".safetensors", ".bin", ".txt", ".ckpt") and f.is_file():
            st = f.stat()
            stamps.append((str(f.relative_to(p)), st.st_size, st.st_mtime_ns))
    return ("folder", str(p), tuple(stamps))


def _safetensors_only(opts: LoadOptions) -> bool | None:
    """``from_pretrained``'s ``use_safetensors``: True (pickles never read) unless the user opted in on a torch that
    reads them safely; then None (safetensors first, pickles where there are none)."""
    return None if pickles_readable(opts.allow_pickle) else True


def _wrap(label: str, where, exc: Exception, hint: str) -> ModelLoadError:
    msg = " ".join(str(exc).split()) or type(exc).__name__  # one line, with the cause a library gives below its first
    return ModelLoadError(f"{label}: loading {where} failed ({type(exc).__name__}: {msg[:400]}). {hint}")


def _names(folder: Path, label: str) -> list[str]:
    """The sorted names in ``folder``; the pack's error when it cannot be listed."""
    try:
        return sorted(f.name for f in folder.iterdir())
    except OSError as exc:
        raise unreadable(folder, label, exc) from None


# ---------------------------------------------------------------- ControlNet

def _check_controlnet_folder(value: Path, label: str, allow_pickle: bool = False) -> None:
    """A diffusers ControlNet folder: config.json of an SDXL ControlNetModel, weights whose headers read (pickles
    only with the opt-in)."""
    cfg_file = value / "config.json"
    if not cfg_file.is_file():
        found = ", ".join(_names(value, label)[:8]) or "nothing"
        raise ModelLoadError(
            f"{label}: {value} is a folder without config.json (found: {found}); expected a diffusers ControlNet "
            f"folder. {HINT_CONTROLNET}"
        )
    config = read_json(cfg_file, label)
    if config.get("_class_name") not in (None, "ControlNetModel"):
        raise ModelLoadError(
            f"{label}: {value} is a diffusers {config.get('_class_name')} folder, not a ControlNetModel. {HINT_CONTROLNET}"
        )
    check_controlnet_config(config, value, label)
    check_folder_weights(value, label, allow_pickle)  # truncated/corrupt files get a clear message


def check_sources(base, controlnet, options: "LoadOptions | None" = None) -> None:
    """Everything about the model files that can be checked without reading weights (paths, file headers, the
    kind of model, configs) and the device, so a bad input is refused before a long load. Raises ModelLoadError."""
    from .checks import swapped_message

    opts = (options or LoadOptions()).resolved()
    for label, source, hint, check_file, check_folder in (
            ("checkpoint", base, HINT_BASE, check_sdxl_base, _base_folder_check),
            ("controlnet", controlnet, HINT_CONTROLNET, check_controlnet_file, _check_controlnet_folder)):
        kind, value = _classify(source, label, hint)
        try:
            if kind == "folder":
                check_folder(value, label, opts.allow_pickle)
            elif kind == "file" and (value.suffix.lower() == ".safetensors" or not opts.allow_pickle):
                # the header only; a pickle has none and is refused here unless opted in (then reading it is the load)
                check_file(read_index(value, label), label)
        except ModelLoadError:
            swapped = swapped_message(base, controlnet)  # one line that names the real mistake, not two refusals
            if swapped:
                raise ModelLoadError(swapped) from None
            raise
    if opts.vae:
        kind, value = _classify(opts.vae, "vae", "Give a diffusers VAE folder or a VAE .safetensors file.")
        if kind == "folder":
            check_folder_weights(_vae_folder(value), "vae", opts.allow_pickle)


def load_controlnet(source, options: LoadOptions):
    """A ControlNetModel from a diffusers folder, a single file (diffusers or original keys), or a hub id."""
    from diffusers import ControlNetModel

    label = "controlnet"
    opts = options.resolved()
    kind, value = _classify(source, label, HINT_CONTROLNET)
    if kind == "hub":
        try:
            with load_lock():
                return ControlNetModel.from_pretrained(value, dtype=opts.dtype, use_safetensors=_safetensors_only(opts))
        except Exception as exc:  # noqa: BLE001
            raise _wrap(label, value, exc, HINT_CONTROLNET) from None
    if kind == "folder":
        _check_controlnet_folder(value, label, opts.allow_pickle)
        try:
            model = folder_model(ControlNetModel, value, "diffusion_pytorch_model.safetensors", opts.dtype, label)
            if model is not None:
                return model
            with load_lock():
                return ControlNetModel.from_pretrained(value, dtype=opts.dtype, local_files_only=True,
                                                       use_safetensors=_safetensors_only(opts))
        except ModelLoadError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise _wrap(label, value, exc, HINT_CONTROLNET) from None
    # a single file
    idx = read_index(value, label, allow_pickle=opts.allow_pickle)
    fmt = check_controlnet_file(idx, label)
    cfg_dir = Path(opts.controlnet_config_dir) if opts.controlnet_config_dir else None
    if cfg_dir is None:
        from .sdxl_config import CONTROLNET_SDXL_CONFIG

        cfg_dir = CONTROLNET_SDXL_CONFIG
    if fmt == "ldm":
        try:
            from .lazy_checkpoint import checkpoint_tensors

            with load_lock():
                return ControlNetModel.from_single_file(checkpoint_tensors(idx, opts.dtype), config=str(cfg_dir),
                                                        local_files_only=True, torch_dtype=opts.dtype)
        except Exception as exc:  # noqa: BLE001
            raise _wrap(label, value, exc, HINT_CONTROLNET) from None
    # diffusers keys in one file: build from the config and load the weights strictly
    config = ControlNetModel.load_config(str(cfg_dir))
    check_controlnet_config(config, cfg_dir, label)
    try:
        return load_diffusers_file(
            ControlNetModel, idx, config, opts.dtype,
            f"{label}: {value} is an SDXL ControlNet in diffusers layout, but it does not match the config in "
            f"{cfg_dir}: {{detail}}. It is probably a different size (mid/small variant): put it in a folder next to "
            "its own config.json and give the folder, or give that config.json's folder as controlnet_config_dir "
            "(--controlnet-config-dir on the command line).")
    except ModelLoadError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise _wrap(label, value, exc, HINT_CONTROLNET) from None


# ---------------------------------------------------------------- VAE override

def _vae_folder(folder: Path) -> Path:
    """A VAE folder given as such, or the ``vae/`` of a pipeline folder."""
    return folder / "vae" if (folder / "vae" / "config.json").is_file() else folder


def load_vae(source, options: LoadOptions, config_dir: Path | None = None):
    """A user VAE (e.g. madebyollin/sdxl-vae-fp16-fix): a diffusers folder (its config decides ``force_upcast``) or
    a single file (upcast like the stock SDXL VAE unless its weights show it is fp16-safe)."""
    import torch
    from diffusers import AutoencoderKL

    label = "vae"
    opts = options.resolved()
    hint = "Give a diffusers VAE folder (config.json + weights) or a VAE .safetensors file (e.g. sdxl_vae_fp16_fix.safetensors)."
    kind, value = _classify(source, label, hint)
    try:
        if kind == "hub":
            with load_lock():
                return AutoencoderKL.from_pretrained(value, dtype=opts.dtype, use_safetensors=_safetensors_only(opts))
        if kind == "folder":
            sub = _vae_folder(value)
            check_folder_weights(sub, label, opts.allow_pickle)
            with load_lock():
                return AutoencoderKL.from_pretrained(sub, dtype=opts.dtype, local_files_only=True,
                                                     use_safetensors=_safetensors_only(opts))
        idx = read_index(value, label, allow_pickle=opts.allow_pickle)
        if not any(k.split(".", 1)[-1].startswith(("encoder.", "decoder.")) or k.startswith(("encoder.", "decoder."))
                   for k in idx.shapes):
            raise ModelLoadError(f"{label}: {value} is not a VAE ({idx.summary()}). {hint}")
        from .sdxl_config import SDXL_BASE_CONFIG

        cfg = Path(config_dir) if config_dir else SDXL_BASE_CONFIG
        channels = json.loads((cfg / "vae" / "config.json").read_text(encoding="utf-8")).get("latent_channels", 4)
        conv_in = next((shape for k, shape in idx.shapes.items() if k.endswith("decoder.conv_in.weight")), None)
        if conv_in is not None and len(conv_in) == 4 and conv_in[1] != channels:
            raise ModelLoadError(
                f"{label}: {value} decodes {conv_in[1]}-channel latents (an SD3/Flux-style VAE), but SDXL's have "
                f"{channels}. Use an SDXL VAE (sdxl_vae.safetensors or sdxl-vae-fp16-fix), or none.")
        with load_lock():
            vae = AutoencoderKL.from_single_file(
                str(value), config=str(cfg), subfolder="vae", local_files_only=True, dtype=opts.dtype
            )
        # keep the SDXL config's force_upcast (fp32 decode in fp16) unless the weights show the VAE is fp16-safe
        if opts.dtype == torch.float16 and vae.config.force_upcast:
            from ..vae_decode import fp16_safe

            if fp16_safe(vae):
                vae.register_to_config(force_upcast=False)
        return vae
    except ModelLoadError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise _wrap(label, value, exc, hint) from None


# ---------------------------------------------------------------- the pipeline

def _base_folder_check(folder: Path, label: str, allow_pickle: bool = False) -> None:
    index = folder / "model_index.json"
    if not index.is_file():
        singles = [name for name in _names(folder, label) if Path(name).suffix in (".safetensors", ".ckpt")]
        extra = f" It holds {', '.join(singles[:4])}: give one of those files instead." if singles else ""
        raise ModelLoadError(f"{label}: {folder} is a folder without model_index.json, so not a diffusers model.{extra} {HINT_BASE}")
    mi = read_json(index, label)
    if "text_encoder_2" not in mi or "unet" not in mi:
        raise ModelLoadError(
            f"{label}: {folder} is a diffusers {mi.get('_class_name', 'pipeline')} without the two SDXL text "
            f"encoders (not SDXL base; SD 1.x/2.x or a refiner). {HINT_BASE}"
        )
    for sub in ("unet", "vae", "text_encoder", "text_encoder_2"):
        check_folder_weights(folder / sub, f"{label} ({sub})", allow_pickle)


def build_pipeline(base, controlnet, options: LoadOptions | None = None):
    """Load without the cache. Raises ModelLoadError (never a bare library error) for bad inputs; a load that fails
    part-way gives back what it had read, as an unload does."""
    try:
        return _build_pipeline(base, controlnet, options)
    except ModelLoadError as exc:
        error = exc
    # its traceback's frames, and the library error it stands for, hold the models read so far
    error.__traceback__ = error.__context__ = error.__cause__ = None
    release_memory()
    raise error


def _build_pipeline(base, controlnet, options: LoadOptions | None = None):
    drop_known_noise()
    from diffusers import StableDiffusionXLControlNetImg2ImgPipeline

    opts = (options or LoadOptions()).resolved()
    label = "checkpoint"
    kind, value = _classify(base, label, HINT_BASE)
    # check the base before spending time on the ControlNet
    idx = config_dir = None
    if kind == "folder":
        _base_folder_check(value, label, opts.allow_pickle)
    elif kind == "file":
        idx = read_index(value, label, allow_pickle=opts.allow_pickle)
        check_sdxl_base(idx, label)  # the kind of model first: no config or tokenizer needed to say "this is SD1.5"
        if opts.config_dir:
            config_dir = Path(opts.config_dir)
            if not (config_dir / "model_index.json").is_file():
                raise ModelLoadError(f"config_dir: {config_dir} has no model_index.json; expected an SDXL config folder.")
        else:
            from .sdxl_config import sdxl_config_dir

            config_dir = sdxl_config_dir()
        unet_cfg = json.loads((config_dir / "unet" / "config.json").read_text(encoding="utf-8"))
        check_sdxl_base(idx, label, expected_context=unet_cfg.get("cross_attention_dim"))
    cn = load_controlnet(controlnet, opts)
    extra = {}
    if opts.vae:
        extra["vae"] = load_vae(opts.vae, opts, config_dir)
    try:
        if kind == "file":
            from .single_file import build_from_single_file

            pipe = build_from_single_file(idx, config_dir, opts.dtype, controlnet=cn, **extra)
            idx = None  # a pickle's tensors: not kept past the build
        else:
            if kind == "folder":  # its models read as the single file's are; from_pretrained for the rest
                extra.update(folder_models(value, opts.dtype, label, skip=extra))
            with load_lock():
                pipe = StableDiffusionXLControlNetImg2ImgPipeline.from_pretrained(
                    str(value), controlnet=cn, dtype=opts.dtype, local_files_only=(kind != "hub"),
                    use_safetensors=_safetensors_only(opts), **extra,
                )
    except ModelLoadError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise _wrap(label, value, exc, HINT_BASE) from None
    place(pipe, opts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---------------------------------------------------------------- the cache

_cache = SingleModelCache()


def _cache_key(base, controlnet, opts: LoadOptions) -> tuple:
    bk, bv = _classify(base, "checkpoint", HINT_BASE)
    ck, cv = _classify(controlnet, "controlnet", HINT_CONTROLNET)
    vae = _file_identity(*_classify(opts.vae, "vae", "")) if opts.vae else None
    o = opts.describe()
    o.pop("vae")
    return (_file_identity(bk, bv), _file_identity(ck, cv), vae, tuple(sorted(o.items())))


def free_cached_pipeline() -> bool:
    """Drop the cached pipeline (and the cached safety checker / prompt expander with it) and give
    the memory back (gc + CUDA cache). True if a pipeline was cached."""
    from ..request_models.locate import free_model_hooks

    had = _cache.free()
    free_model_hooks()
    return had


def forget_cached_pipeline(pipe) -> bool:
    """Stop caching ``pipe`` (if it is the cached one) without collecting garbage; the next load reads the disk."""
    return _cache.forget(pipe)


def cached_pipeline():
    """The pipeline currently held by the cache, or None."""
    return _cache.current()


@dataclass(frozen=True)
class PipelineRef:
    """What a pipeline is loaded from, standing in for it without holding its weights: :meth:`get` returns the
    cached pipeline, loading it again when it was freed or replaced by another one."""

    base: str
    controlnet: str
    options: LoadOptions
    before_load: object = None  # called on a cache miss, before reading the disk
    after_load: object = None  # called with the new pipeline after a cache miss

    def get(self):
        return load_pipeline(self.base, self.controlnet, self.options, before_load=self.before_load,
                             after_load=self.after_load)


def load_pipeline(base, controlnet, options: LoadOptions | None = None, *, device=None, dtype=None,
                  before_load=None, after_load=None, **option_fields):
    """The cached loader. Same files (path, size, mtime) and same options -> the same pipeline object, no disk read.

    A different model or option frees the previous pipeline first (so two never sit in memory together),
    as far as nobody else holds a reference to it.
    ``load_pipeline(ckpt, cn, device="cpu", dtype=torch.float32)`` keeps working.
    ``before_load()`` is called only when the disk will be read (a cache miss), e.g. to ask a host
    application to free its own models first; ``after_load(pipe)`` right after such a load (e.g. to register the
    pipeline with the host's memory management).
    """
    opts = options or LoadOptions()
    if device is not None or dtype is not None or option_fields:
        unknown = set(option_fields) - {f.name for f in fields(LoadOptions)}
        if unknown:
            raise TypeError(f"load_pipeline: unknown options {sorted(unknown)}")
        upd = dict(option_fields)
        if device is not None:
            upd["device"] = device
        if dtype is not None:
            upd["dtype"] = dtype
        opts = replace(opts, **upd)
    opts = opts.resolved()
    key = _cache_key(base, controlnet, opts)

    def _before_build():
        from ..request_models.locate import free_model_hooks

        free_model_hooks()  # the checker / expander go with the pipeline they served
        if before_load is not None:
            before_load()

    def _build():
        pipe = build_pipeline(base, controlnet, opts)
        if after_load is not None:
            after_load(pipe)
        return pipe

    return _cache.get_or_load(key, _build, _before_build)
