"""Look inside model files before loading them, and say clearly what is wrong.

Only the safetensors header (key names, shapes, offsets) is read here, so a check costs
microseconds even for a 7 GB checkpoint. ``.ckpt``/``.pt`` pickles are read only when the
caller opted in (``allow_pickle``), and then with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

from ...errors import ModelInputError, ModelLoadError
from ...units import file_size
from .pickles import UnsafePickleTorch, load_weights_only, refuse_unsafe_torch

SAFETENSORS_EXT = {".safetensors", ".sft"}
PICKLE_EXT = {".ckpt", ".pt", ".pth", ".bin"}
_MAX_HEADER = 100_000_000  # safetensors itself refuses headers over 100 MB
# a safetensors dtype name -> (torch's name for it, bytes per element): the types safetensors' torch loader reads
SAFETENSORS_DTYPES = {
    "F64": ("float64", 8), "F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2),
    "I64": ("int64", 8), "I32": ("int32", 4), "I16": ("int16", 2), "I8": ("int8", 1), "U8": ("uint8", 1),
    "U64": ("uint64", 8), "U32": ("uint32", 4), "U16": ("uint16", 2), "BOOL": ("bool", 1), "C64": ("complex64", 8),
    "F8_E4M3": ("float8_e4m3fn", 1), "F8_E4M3FNUZ": ("float8_e4m3fnuz", 1), "F8_E5M2": ("float8_e5m2", 1),
    "F8_E5M2FNUZ": ("float8_e5m2fnuz", 1),
}

HINT_BASE = (
    "Give an SDXL base checkpoint: a single .safetensors in the original (SGM) layout such as "
    "sd_xl_base_1.0.safetensors or a fine-tune of it, or a diffusers folder with model_index.json."
)
HINT_CONTROLNET = (
    "Give an SDXL ControlNet: a diffusers folder (config.json + diffusion_pytorch_model.safetensors, e.g. "
    "diffusers/controlnet-canny-sdxl-1.0 or xinsir/controlnet-canny-sdxl-1.0) or that "
    "diffusion_pytorch_model.safetensors file on its own."
)


@dataclass
class TensorIndex:
    """Key names and shapes of a weights file (no tensor data)."""

    path: Path
    shapes: dict[str, tuple[int, ...]]
    metadata: dict = field(default_factory=dict)
    state_dict: dict | None = None  # only for pickles, which cannot be read lazily
    locations: dict = field(default_factory=dict)  # safetensors: key -> (dtype name, first byte, end byte) in the file
    label: str = ""  # what the file is to the user ("checkpoint", "controlnet"...), for errors
    identity: tuple | None = None  # safetensors: the file whose header this is (:func:`file_identity`)

    def error(self, what: str) -> ModelLoadError:
        """The pack's error about this file: ``<label>: <path> <what>``."""
        return ModelLoadError(f"{self.label + ': ' if self.label else ''}{self.path} {what}")

    def has_prefix(self, prefix: str) -> bool:
        return any(k.startswith(prefix) for k in self.shapes)

    def first(self, pattern: str) -> tuple[str, tuple[int, ...]] | None:
        rx = re.compile(pattern)
        for k in sorted(self.shapes):
            if rx.search(k):
                return k, self.shapes[k]
        return None

    def summary(self, n: int = 3) -> str:
        keys = sorted(self.shapes)
        roots = sorted({".".join(k.split(".")[:2]) for k in keys})
        return f"{len(keys)} tensors, top-level names like {', '.join(roots[:6])}" + (" ..." if len(roots) > 6 else "")


def unreadable(path, label: str, exc: OSError) -> ModelLoadError:
    """The pack's error for a file or folder the OS refuses to read (permissions, a folder where a file belongs)."""
    return ModelInputError(
        label, f"{path} cannot be read ({exc.strerror or type(exc).__name__}). Check its permissions: the user "
        f"running this needs read access to it (and to its folders), e.g. chmod a+r on the file."
    )


def read_json(path, label: str) -> dict:
    """A model folder's JSON file; a :class:`ModelLoadError` naming it when unreadable or not JSON."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise unreadable(path, label, exc) from None
    except ValueError as exc:
        raise ModelInputError(label, f"{path} is not valid JSON ({exc}).") from None


def file_identity(st: os.stat_result) -> tuple:
    """Device, inode, size and modification time of a file: what changes when it is rewritten or replaced."""
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _counts(values) -> bool:
    """A JSON list of whole numbers >= 0 (what safetensors reads shapes and offsets as)."""
    return isinstance(values, list) and all(type(x) is int and x >= 0 for x in values)


def _check_layout(path, label: str, start: int, size: int, locations: dict, fix: str) -> None:
    """The tensors of a safetensors file, in the order of their offsets, fill its data from its first byte
    (``start``) to the file's end, each beginning where the one before ends: safetensors refuses a file with a gap,
    an overlap or bytes after the last tensor (and its own writer makes none)."""
    at = start
    for k, (_dtype, begin, stop) in sorted(locations.items(), key=lambda item: item[1][1:]):
        if begin != at:
            raise ModelInputError(
                label, f"{path} has a corrupt safetensors header ({k!r} starts at data byte {begin - start}, but "
                f"the tensors before it end at {at - start}: tensors must follow each other without gaps or "
                f"overlaps). {fix}")
        at = stop
    if at > size:
        raise ModelInputError(
            label, f"{path} is truncated: it is {file_size(size)} but its header says the tensors need "
            f"{file_size(at)}. The download or copy did not finish. {fix}"
        )
    if at < size:
        raise ModelInputError(label, f"{path} has {size - at} bytes after its last tensor that its header does not "
                             f"describe: it is corrupt or not one safetensors file. {fix}")


def _not_a_header(start: bytes, n: int, size: int) -> str:
    """Why a file whose first 8 bytes (a safetensors file's header length, ``n``) do not fit is not one, in words,
    from its first bytes ``start``."""
    text = start.lstrip()
    if text[:1] == b"<":
        return ("it is a web page (HTML), not the model; a page was saved instead of the file (on Hugging Face, "
                "download from the file's /resolve/ link, not its /blob/ page)")
    if text.startswith(b"version https://git-lfs"):
        return ("it is a Git LFS pointer (a small text file that stands for the model), not the model; the repository "
                "was cloned without Git LFS (run `git lfs pull` there, or download the file itself)")
    if start and all(32 <= b < 127 or b in b"\t\r\n" for b in start):
        return "it is a text file, not model weights"
    if n > _MAX_HEADER:
        return ("its first bytes are not the start of one (it is damaged, or another kind of file named "
                ".safetensors)")
    return (f"its header alone would need {file_size(8 + n)} but the whole file is {file_size(size)}, so it was cut "
            "off (an unfinished download or copy)")


def read_safetensors_index(path: str | os.PathLike, label: str) -> TensorIndex:
    """Read and validate a safetensors header; raise ModelLoadError for truncated or corrupt files."""
    path = Path(path)
    fix = "Download the file again (compare its size with the source) and retry."
    try:
        with open(path, "rb") as f:
            identity = file_identity(os.fstat(f.fileno()))
            size = identity[2]
            head = f.read(8)
            if len(head) < 8:
                raise ModelInputError(label, f"{path} is {file_size(size)}, too short to be a safetensors file. {fix}")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER or 8 + n > size:
                f.seek(0)
                raise ModelInputError(label, f"{path} is not a readable safetensors file: "
                                     f"{_not_a_header(f.read(64), n, size)}. {fix}")
            raw = f.read(n)
    except OSError as exc:
        raise unreadable(path, label, exc) from None
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (UnicodeDecodeError, ValueError):
        raise ModelInputError(label, f"{path} is not a readable safetensors file: it has a corrupt safetensors "
                             "header (the list of its tensors at the start of the file is not readable text). "
                             f"{fix}") from None
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    elif not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ModelInputError(label, f"{path} has a corrupt safetensors header (its __metadata__ is not a map of "
                             f"strings). {fix}")
    shapes, locations, k = {}, {}, None
    try:
        for k, v in header.items():
            shape, offsets = v["shape"], v["data_offsets"]
            if not (_counts(shape) and _counts(offsets) and len(offsets) == 2):
                raise ValueError(k)
            shapes[k] = tuple(shape)
            locations[k] = (str(v["dtype"]), 8 + n + offsets[0], 8 + n + offsets[1])
    except (KeyError, TypeError, ValueError, IndexError):
        raise ModelInputError(label, f"{path} has a corrupt safetensors header (bad entry for {k!r}). {fix}") from None
    for k, (dtype, begin, stop) in locations.items():
        if dtype not in SAFETENSORS_DTYPES:
            raise ModelInputError(label, f"{path} stores {k!r} as {dtype!r}, a type safetensors' torch loader does "
                                 f"not read. Use a file saved with torch tensors of a standard type.")
        need = math.prod(shapes[k]) * SAFETENSORS_DTYPES[dtype][1]
        if stop - begin != need:
            raise ModelInputError(label, f"{path} has a corrupt safetensors header ({k!r} spans {stop - begin} "
                                 f"bytes, but a {dtype} tensor of shape {shapes[k]} needs {need}). {fix}")
    if not shapes:
        raise ModelInputError(label, f"{path} is a safetensors file with no tensors in it. {fix}")
    _check_layout(path, label, 8 + n, size, locations, fix)
    return TensorIndex(path, shapes, metadata, locations=locations, label=label, identity=identity)


def refuse_pickle(path: Path, label: str, allow_pickle: bool) -> None:
    """Raise ModelLoadError for the pickle ``path`` unless the user opted in (``allow_pickle``) on a torch whose
    ``weights_only`` loader is safe."""
    if not allow_pickle:
        raise ModelInputError(
            label, f"{path} is a pickle checkpoint ({path.suffix}); pickles can run code when loaded, so they are "
            f"refused by default. Use a .safetensors version of the model, or opt in with allow_pickle "
            f"(CLI: --allow-pickle; it is then read with torch.load(weights_only=True), which refuses code)."
        )
    try:
        refuse_unsafe_torch(label)
    except UnsafePickleTorch as exc:
        raise ModelInputError(exc.field, exc.detail) from None


def read_pickle_index(path: str | os.PathLike, label: str, allow_pickle: bool) -> TensorIndex:
    """Read a .ckpt/.pt pickle with weights_only=True, only when the user opted in."""
    path = Path(path)
    refuse_pickle(path, label, allow_pickle)
    try:
        try:
            sd = load_weights_only(path, label, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            sd = load_weights_only(path, label)
    except OSError as exc:
        raise unreadable(path, label, exc) from None
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is reported the same way
        raise ModelInputError(
            label, f"{path} could not be read as a weights-only pickle ({type(exc).__name__}: {str(exc)[:300]}). "
            f"It is corrupt, truncated, or contains objects other than tensors. Use a .safetensors version."
        ) from None
    while isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise ModelInputError(label, f"{path} holds a {type(sd).__name__}, not a dict of tensors.")
    shapes = {k: tuple(v.shape) for k, v in sd.items() if hasattr(v, "shape")}
    if not shapes:
        raise ModelInputError(label, f"{path} holds no tensors.")
    return TensorIndex(path, shapes, state_dict=sd, label=label)


def check_folder_weights(folder: Path, label: str, allow_pickle: bool) -> None:
    """The weights of a diffusers model folder (``unet/``, a ControlNet folder...) as its loader reads them: every
    ``.safetensors`` file's header (a truncated or corrupt one is named), and where there is none, the pickles
    (``.bin``) diffusers would read instead: refused as a pickle file is (:func:`refuse_pickle`)."""
    try:
        files = sorted(f for f in folder.iterdir() if f.is_file()) if folder.is_dir() else []
    except OSError as exc:
        raise unreadable(folder, label, exc) from None
    weights = [f for f in files if f.suffix.lower() in SAFETENSORS_EXT]
    for w in weights:
        read_safetensors_index(w, label)
    pickles = [f for f in files if f.suffix.lower() in PICKLE_EXT]
    if pickles and not weights:
        refuse_pickle(pickles[0], label, allow_pickle)


def read_index(path: str | os.PathLike, label: str, allow_pickle: bool = False) -> TensorIndex:
    path = Path(path)
    ext = path.suffix.lower()
    if ext in SAFETENSORS_EXT:
        return read_safetensors_index(path, label)
    if ext in PICKLE_EXT:
        return read_pickle_index(path, label, allow_pickle)
    raise ModelInputError(
        label, f"{path} has an unknown extension {ext!r}; expected .safetensors (or .ckpt with allow_pickle), "
        f"or a diffusers folder."
    )


# ---------------------------------------------------------------- SDXL base checkpoints

UNET_PREFIX = "model.diffusion_model."
TE1_PREFIX = "conditioner.embedders.0.transformer."
TE2_PREFIX = "conditioner.embedders.1.model."


def _context_dim(idx: TensorIndex, prefix: str) -> int | None:
    hit = idx.first(re.escape(prefix) + r".*attn2\.to_k\.weight$")
    return hit[1][1] if hit else None


def describe_base(idx: TensorIndex) -> str:
    """What kind of model a single-file checkpoint is, in words (for error messages)."""
    ctx = _context_dim(idx, UNET_PREFIX)
    if idx.has_prefix(UNET_PREFIX):
        if idx.has_prefix("cond_stage_model.transformer.") or ctx == 768:
            return "a Stable Diffusion 1.x checkpoint (one CLIP ViT-L text encoder, UNet context 768)"
        if idx.has_prefix("cond_stage_model.model.") or ctx == 1024:
            return "a Stable Diffusion 2.x checkpoint (OpenCLIP ViT-H text encoder, UNet context 1024)"
        if idx.has_prefix("conditioner.embedders.0.model.") and not idx.has_prefix(TE1_PREFIX):
            return "an SDXL refiner checkpoint (only the OpenCLIP bigG text encoder, UNet context 1280)"
        if idx.has_prefix(TE1_PREFIX) and idx.has_prefix(TE2_PREFIX):
            return f"an SDXL base checkpoint (UNet context {ctx})"
        if idx.has_prefix("conditioner.") is False:
            return f"a UNet-only checkpoint in the original layout (no text encoders, UNet context {ctx})"
        return f"a checkpoint in the original layout with unrecognised text encoders (UNet context {ctx})"
    if idx.has_prefix("controlnet_cond_embedding.") or idx.has_prefix("control_model.") or idx.has_prefix("input_hint_block."):
        return "a ControlNet, not a base model"
    if idx.first(r"^(down_blocks|up_blocks|mid_block)\.") and idx.first(r"attn2\.to_k\.weight$"):
        return "a UNet saved in diffusers layout (diffusion_pytorch_model.safetensors of a unet/ folder), not a whole checkpoint"
    if idx.first(r"^(encoder|decoder)\.(down|up|mid)"):
        return "a VAE on its own, not a whole checkpoint"
    if idx.first(r"lora_(unet|te)|\.lora_(up|down|A|B)\."):
        return "a LoRA, not a base model"
    return f"not a Stable Diffusion checkpoint ({idx.summary()})"


def check_sdxl_base(idx: TensorIndex, label: str, expected_context: int | None = None) -> None:
    """Raise ModelLoadError unless ``idx`` is an SDXL base checkpoint in the original layout."""
    kind = describe_base(idx)
    if not kind.startswith("an SDXL base checkpoint"):
        raise ModelInputError(label, f"{idx.path} is {kind}. {HINT_BASE}")
    ctx = _context_dim(idx, UNET_PREFIX)
    if expected_context is not None and ctx != expected_context:
        raise ModelInputError(
            label, f"{idx.path} has UNet context dimension {ctx} but the SDXL config in use expects "
            f"{expected_context}. It is not a standard SDXL base; pass a matching config folder (config_dir / "
            f"--config-dir) or use a standard SDXL checkpoint."
        )


# ---------------------------------------------------------------- ControlNets

def describe_controlnet(idx: TensorIndex) -> tuple[str, str]:
    """(format, description) of a ControlNet-like file. format is 'diffusers', 'ldm' or 'unsupported'."""
    if idx.has_prefix("controlnet_cond_embedding.") and idx.has_prefix("controlnet_down_blocks."):
        ctx = idx.first(r"attn2\.to_k\.weight$")
        ctx = ctx[1][1] if ctx else None
        if idx.has_prefix("add_embedding."):
            return "diffusers", f"an SDXL ControlNet in diffusers layout (context {ctx})"
        family = {768: "Stable Diffusion 1.x", 1024: "Stable Diffusion 2.x"}.get(ctx, "non-SDXL")
        return "unsupported", f"a {family} ControlNet in diffusers layout (context {ctx}, no SDXL text-time embedding)"
    pre = "control_model." if idx.has_prefix("control_model.") else ""
    if idx.has_prefix(pre + "input_hint_block.") and idx.has_prefix(pre + "zero_convs."):
        if idx.has_prefix(pre + "label_emb."):
            return "ldm", "an SDXL ControlNet in the original (ldm/sgm) layout"
        return "unsupported", "a Stable Diffusion 1.x/2.x ControlNet in the original layout (no SDXL label embedding)"
    if idx.first(r"lllite"):
        return "unsupported", "a ControlNet-LLLite (kohya) model, which diffusers cannot run"
    if idx.first(r"lora_controlnet|control_lora") or "lora_controlnet" in idx.metadata:
        return "unsupported", "a Control-LoRA (Stability), which diffusers cannot run as a ControlNet"
    if idx.has_prefix("adapter.") or idx.has_prefix("body."):
        return "unsupported", "a T2I-Adapter, not a ControlNet"
    if idx.has_prefix(UNET_PREFIX):
        return "unsupported", "a base model checkpoint, not a ControlNet"
    return "unsupported", f"not a ControlNet ({idx.summary()})"


def check_controlnet_file(idx: TensorIndex, label: str) -> str:
    fmt, what = describe_controlnet(idx)
    if fmt == "unsupported":
        raise ModelInputError(label, f"{idx.path} is {what}; expected an SDXL ControlNet. {HINT_CONTROLNET}")
    return fmt


def check_controlnet_config(config: dict, path, label: str) -> None:
    if config.get("addition_embed_type") != "text_time":
        ctx = config.get("cross_attention_dim")
        raise ModelInputError(
            label, f"{path} is a ControlNet for Stable Diffusion 1.x/2.x (cross_attention_dim {ctx}, no SDXL "
            f"text-time embedding); expected an SDXL ControlNet. {HINT_CONTROLNET}"
        )


# ---------------------------------------------------------------- the two inputs swapped

def _what_source_is(source) -> str | None:
    """'controlnet', 'sdxl_base' or None (anything else, or not readable cheaply), from a folder's config or a
    .safetensors header only; never raises (it only refines a refusal already decided)."""
    try:
        p = Path(os.path.expanduser(str(source)))
        if p.is_dir():
            if (p / "model_index.json").is_file():
                index = json.loads((p / "model_index.json").read_text(encoding="utf-8"))
                return "sdxl_base" if "unet" in index and "text_encoder_2" in index else None
            if (p / "config.json").is_file():
                config = json.loads((p / "config.json").read_text(encoding="utf-8"))
                return "controlnet" if config.get("_class_name") == "ControlNetModel" else None
            return None
        if p.is_file() and p.suffix.lower() in SAFETENSORS_EXT:
            idx = read_safetensors_index(p, "")
            if describe_controlnet(idx)[0] != "unsupported" or describe_base(idx) == "a ControlNet, not a base model":
                return "controlnet"
            return "sdxl_base" if describe_base(idx).startswith("an SDXL base checkpoint") else None
    except (OSError, ValueError, ModelLoadError):
        return None
    return None


def swapped_message(checkpoint, controlnet) -> str | None:
    """One line when the checkpoint given is a ControlNet and the ControlNet given is an SDXL base, else None."""
    if _what_source_is(checkpoint) != "controlnet" or _what_source_is(controlnet) != "sdxl_base":
        return None
    return (f"checkpoint and controlnet look swapped: the checkpoint {checkpoint} is a ControlNet and the controlnet "
            f"{controlnet} is an SDXL base checkpoint. Give them the other way round: checkpoint {controlnet}, "
            f"controlnet {checkpoint}.")
