"""LoRA on a loaded SDXL ControlNet pipeline, through diffusers' PEFT integration.

* **Sources** (:func:`resolve_source`): a file in a LoRA folder (bare name, with or without
  ``.safetensors``), a local path or ``file://`` URL, an ``http(s)://`` URL (downloaded once into
  a cache folder, with a size cap and a timeout), or a Hugging Face hub repo id
  (``owner/repo`` or ``owner/repo/file.safetensors``), fetched only when the network is allowed
  (``HF_HUB_OFFLINE`` unset); offline, a copy already in the hub cache is still used.
* **Formats**: kohya/A1111 SDXL LoRAs (``lora_unet_*``, ``lora_te1_*``, ``lora_te2_*`` with
  ``.lora_down``/``.lora_up``/``.alpha``, in sgm or diffusers block naming) and diffusers/PEFT
  LoRAs (``unet.*``, ``text_encoder.*``, ``text_encoder_2.*`` with ``lora_A``/``lora_B`` or
  ``lora.down``/``lora.up``). Every LoRA weight is checked against the model's layers before
  loading: an SD 1.x/2.x LoRA, a file that is not a LoRA, and a LoRA none of whose weights fit are
  errors naming the LoRA; weights that fit nothing are skipped, reported by a warning and in
  :attr:`LoadedLora.skipped`.
* **Switching is cheap**: each file is read once per pipeline and kept as a PEFT adapter, keyed by
  (path, mtime, size). :func:`activate` only selects adapters and sets their weights; it never
  fuses, so an empty LoRA list disables every adapter and gives the base model's output exactly.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import weakref
from dataclasses import dataclass, field
from pathlib import Path

from ...errors import ModelInputError
from ...request import LoraSpec
from .sources import LoraError, resolve_source
from ..models.load_lock import load_lock
from ..models.pickles import UnsafePickleTorch, load_weights_only, refuse_unsafe_torch
from ..quiet import quiet_libraries

log = logging.getLogger(__name__)

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
_SD1_CROSS_DIMS = (768, 1024)  # SD 1.x / SD 2.x text-embedding widths; SDXL's is 2048


@dataclass(frozen=True)
class LoadedLora:
    """A LoRA file kept as an adapter on one pipeline."""

    name: str  # as the user gave it (path, URL, repo id)
    path: str  # the local file read
    adapter_name: str
    format: str  # "kohya" or "diffusers"
    modules: dict = field(default_factory=dict)  # component -> number of layers the LoRA changes
    skipped: tuple[str, ...] = ()  # "<component>.<layer>: <why>" for weights that fit no layer


# ---- reading and checking a LoRA file ------------------------------------------------------------


def is_safetensors(path) -> bool:
    path = Path(path)
    return path.suffix.lower() == ".safetensors" or _looks_like_safetensors(path)


def _refuse_pickle(path: Path, name: str, allow_pickle: bool) -> None:
    if not allow_pickle:
        raise LoraError(name, f"{path.name} is a pickle file (.pt/.bin/.ckpt), which can run code when read; refused "
                              "by default. Use a .safetensors version of the LoRA, or opt in (--allow-pickle on the command "
                              "line; in ComfyUI allow_pickle on the LoRA node with SDXLCN_ALLOW_PICKLE=1 set for the server); read with "
                              "torch.load(weights_only=True)")


def check_lora_file(path: str | os.PathLike, name: str | None = None, allow_pickle: bool = False) -> None:
    """Check that ``path`` is a readable LoRA file, from a safetensors file's header alone (no tensor is read),
    so a bad file is refused before any model is loaded."""
    path = Path(path)
    if not path.is_file():
        raise LoraError(name or str(path), f"file not found: {path}")
    read_lora_file(path, name, allow_pickle, keys_only=True)


def read_lora_file(path: str | os.PathLike, name: str | None = None, allow_pickle: bool = False,
                   keys_only: bool = False) -> dict:
    """Read a LoRA file into a state dict of CPU tensors (the only place files are read). With ``keys_only``,
    a safetensors file's tensors are not read (the dict is empty); a pickle has no header and is read whole."""
    path = Path(path)
    name = name or str(path)
    if is_safetensors(path):
        from safetensors import SafetensorError, safe_open

        from ..models.checks import read_safetensors_index

        try:  # the pack's header check: a damaged file, a web page or a cut-off download said in words
            keys = list(read_safetensors_index(path, "LoRA").shapes)
        except ModelInputError as exc:
            raise LoraError(name, exc.detail) from None
        _check_lora_keys(name, keys)
        if keys_only:
            return {}
        try:
            with safe_open(str(path), framework="pt") as f:
                return {k: f.get_tensor(k) for k in keys}
        except SafetensorError:
            raise LoraError(name, f"{path} is not a readable safetensors file (its weights could not be read: it "
                                  "is damaged); download it again") from None
    _refuse_pickle(path, name, allow_pickle)
    import torch

    try:
        refuse_unsafe_torch(name)
    except UnsafePickleTorch as exc:
        raise LoraError(name, exc.detail) from None
    try:
        sd = load_weights_only(path, name)
    except Exception as exc:  # noqa: BLE001 - pickle/zip errors come in many types
        raise LoraError(name, f"is not a LoRA file: it cannot be read as safetensors or a torch file ({exc.__class__.__name__})") from None
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise LoraError(name, "is not a LoRA file: it holds no tensor dictionary")
    _check_lora_keys(name, list(sd))
    return dict(sd)


def _looks_like_safetensors(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{"


def _check_lora_keys(name: str, keys) -> None:
    lora_keys = [k for k in keys if re.search(r"(lora_down|lora_up|lora_A|lora_B|lora\.down|lora\.up|lora_linear_layer)", k)]
    if not lora_keys:
        sample = ", ".join(sorted(keys)[:3]) or "none"
        kind = ""
        if any(k.startswith(("model.diffusion_model.", "conditioner.")) for k in keys):
            kind = " (it looks like a full SDXL checkpoint; load it as the checkpoint instead)"
        elif any(k.startswith(("input_blocks.", "control_model.", "controlnet_")) for k in keys):
            kind = " (it looks like a ControlNet)"
        elif any("lokr" in k or "hada_" in k for k in keys):
            kind = " (it looks like a LyCORIS LoKr/LoHa file, which is not supported)"
        raise LoraError(name, f"is not a LoRA: none of its {len(keys)} weights is a LoRA weight (first keys: {sample}){kind}")


def _lora_format(sd: dict) -> str:
    if all(k.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")) for k in sd):
        return "kohya"
    return "diffusers"


def _component_peft_dicts(pipe, sd: dict) -> dict:
    """Per component: the LoRA weights under the PEFT key names diffusers will use when loading."""
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft, convert_unet_state_dict_to_peft

    converted, _alphas = pipe.lora_state_dict(dict(sd), unet_config=pipe.unet.config)
    out = {}
    for comp in COMPONENTS:
        part = {k[len(comp) + 1:]: v for k, v in converted.items() if k.startswith(comp + ".")}
        if not part:
            continue
        if comp == "unet":
            if "lora_A" not in next(iter(part)):
                part = convert_unet_state_dict_to_peft(part)
        else:
            part = convert_state_dict_to_peft(convert_state_dict_to_diffusers(part))
            if not hasattr(getattr(pipe, comp), "text_model"):
                part = {k.removeprefix("text_model."): v for k, v in part.items()}
        out[comp] = part
    leftovers = [k for k in converted if not k.startswith(tuple(c + "." for c in COMPONENTS))]
    if leftovers:
        out["?"] = {k: converted[k] for k in leftovers}
    return out


@dataclass
class _Analysis:
    modules: dict  # component -> count of matched layers
    skipped: list  # human-readable
    skipped_tensor_ids: set
    sd1_hint: str | None
    total: int


def _analyse(pipe, sd: dict, name: str) -> _Analysis:
    """Match each LoRA layer against the pipeline's modules by name and shape."""
    try:
        per_comp = _component_peft_dicts(pipe, sd)
    except (ValueError, KeyError, IndexError) as exc:
        raise LoraError(name, f"is not a LoRA layout this loader knows (kohya SDXL or diffusers/PEFT): {exc}") from None
    modules: dict = {}
    skipped: list = []
    skipped_ids: set = set()
    sd1_hint = None
    total = 0
    cross_dim = pipe.unet.config.cross_attention_dim
    for comp, part in per_comp.items():
        model = getattr(pipe, comp, None) if comp != "?" else None
        layers: dict = {}
        for key, tensor in part.items():
            m = re.match(r"^(.*)\.(lora_A|lora_B|lora_magnitude_vector)(\.|$)", key)
            layer = m.group(1) if m else key
            layers.setdefault(layer, {})[m.group(2) if m else "other"] = tensor
        for layer, ts in layers.items():
            total += 1
            why = None
            a, b = ts.get("lora_A"), ts.get("lora_B")
            try:
                target = model.get_submodule(layer) if model is not None else None
            except AttributeError:
                target = None
            if any(p == "base_layer" or p.startswith("lora_") for p in layer.split(".")):
                target = None  # PEFT's own wrapper internals are no LoRA target
            if target is None:
                why = "no such layer in this model"
            elif a is None or b is None:
                why = "lora_A/lora_B pair incomplete"
            else:
                fan_in = getattr(target, "in_features", getattr(target, "in_channels", None))
                fan_out = getattr(target, "out_features", getattr(target, "out_channels", None))
                if fan_in is None:
                    why = f"layer type {type(target).__name__} takes no LoRA"
                elif a.shape[1] != fan_in or b.shape[0] != fan_out:
                    why = f"shape {tuple(a.shape[1:2])}->{tuple(b.shape[:1])} does not fit the layer's {fan_in}->{fan_out}"
                    if (
                        comp == "unet"
                        and "attn2" in layer
                        and layer.endswith(("to_k", "to_v"))
                        and a.shape[1] in _SD1_CROSS_DIMS
                        and a.shape[1] != cross_dim
                    ):
                        sd1_hint = f"its cross-attention layers take {a.shape[1]}-wide text embeddings (SD {'1.x' if a.shape[1] == 768 else '2.x'}); this model's take {cross_dim}"
            if why is None:
                modules[comp] = modules.get(comp, 0) + 1
            else:
                skipped.append(f"{comp}.{layer}: {why}")
                skipped_ids.update(id(t) for t in ts.values())
    return _Analysis(modules, skipped, skipped_ids, sd1_hint, total)


# ---- adapters kept per pipeline ------------------------------------------------------------------

_ADAPTERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # pipe -> {file key: LoadedLora}, LRU order
MAX_INACTIVE_ADAPTERS = 3  # LoRAs kept on the pipe beyond the active set (each is 50-400 MB for SDXL)
_PICKLE_OPTED_IN: set[str] = set()  # resolved paths of pickled LoRAs the user allowed


def _file_key(path: Path) -> tuple:
    st = path.stat()
    return (str(path.resolve()), st.st_mtime_ns, st.st_size)


def loaded_adapters(pipe) -> dict:
    """{(path, mtime_ns, size): LoadedLora} of the LoRAs kept on ``pipe``."""
    return _ADAPTERS.setdefault(pipe, {})


def load_lora(pipe, source: str, lora_dirs=None, allow_pickle: bool = False, **resolve_kwargs) -> LoadedLora:
    """Make sure the LoRA ``source`` is an adapter on ``pipe``; reads the file only the first time.

    A file changed on disk (other mtime or size) is read again and replaces its old adapter.
    """
    path = resolve_source(source, lora_dirs, **resolve_kwargs)
    key = _file_key(path)
    kept = loaded_adapters(pipe)
    if allow_pickle:
        _PICKLE_OPTED_IN.add(key[0])  # a later re-read (after eviction) keeps the user's opt-in
    if key in kept:
        kept[key] = kept.pop(key)  # most recently used last: eviction takes the oldest first
        return kept[key]
    for old_key in [k for k in kept if k[0] == key[0]]:  # same file, changed on disk
        _delete_adapter(pipe, kept.pop(old_key).adapter_name)
    sd = read_lora_file(path, source, allow_pickle or key[0] in _PICKLE_OPTED_IN)
    fmt = _lora_format(sd)
    te_only_sd1 = any(k.startswith("lora_te_") for k in sd) and not any(k.startswith(("lora_te1_", "lora_te2_")) for k in sd)
    try:
        info = _analyse(pipe, sd, source)
    except LoraError:
        if not te_only_sd1:
            raise
        info = _Analysis({}, ["(layout not convertible for SDXL)"], set(), None, 0)
    if info.sd1_hint or (te_only_sd1 and (info.skipped or "unet" not in info.modules)):
        why = info.sd1_hint or "its text-encoder weights are named lora_te_* (SD 1.x/2.x); SDXL LoRAs use lora_te1_*/lora_te2_*"
        raise LoraError(source, f"is an SD 1.x/2.x LoRA, not an SDXL LoRA: {why}. Use an SDXL LoRA")
    if not info.modules:
        sample = "; ".join(info.skipped[:3])
        raise LoraError(source, f"none of its {info.total} LoRA layers matches a layer of this SDXL model ({sample}); is it a LoRA for another model?")
    if info.skipped:
        sd = _drop(sd, info.skipped_tensor_ids)
        shown = "; ".join(info.skipped[:5]) + (f"; and {len(info.skipped) - 5} more" if len(info.skipped) > 5 else "")
        log.warning("LoRA %r: loaded %d of %d layers; skipped %s", source, info.total - len(info.skipped), info.total, shown)
    adapter = "sdxlcn_" + hashlib.sha1(repr(key).encode()).hexdigest()[:12]
    try:
        with load_lock(), quiet_libraries():  # peft builds the adapter's layers under init_empty_weights
            pipe.load_lora_weights(sd, adapter_name=adapter)
    except (ValueError, RuntimeError, KeyError) as exc:
        _delete_adapter(pipe, adapter)
        raise LoraError(source, f"could not be applied to this model ({exc.__class__.__name__}: {exc})") from None
    loaded = LoadedLora(source, str(path), adapter, fmt, dict(info.modules), tuple(info.skipped))
    kept[key] = loaded
    others = len(kept) - 1  # PEFT's own warning for a second adapter is silenced (quiet.py): this line says it
    log.info("LoRA %s: loaded%s", Path(path).name,
             f" (kept beside {others} other LoRA{'s' if others > 1 else ''}: switching between them reads no file)"
             if others else "")
    return loaded


def _drop(sd: dict, tensor_ids: set) -> dict:
    """``sd`` without the tensors in ``tensor_ids`` (and kohya alphas whose down weight went)."""
    out = {k: v for k, v in sd.items() if id(v) not in tensor_ids}
    groups = {k.split(".")[0] for k in out if k.endswith("lora_down.weight")}
    return {k: v for k, v in out.items() if not k.endswith(".alpha") or k.split(".")[0] in groups}


def _delete_adapter(pipe, adapter_name: str) -> None:
    present = any(adapter_name in (getattr(getattr(pipe, c, None), "peft_config", None) or {}) for c in COMPONENTS)
    if present:
        pipe.delete_adapters(adapter_name)


def activate(pipe, loras, lora_dirs=None, **resolve_kwargs) -> list[LoadedLora]:
    """Make exactly ``loras`` (LoraSpec or {path, scale}) the active LoRAs of ``pipe``, with their scales.

    Files not yet kept on the pipe are read and loaded once; then adapters are selected and
    weighted (``set_adapters``' per-component work), never fused. An empty list disables every
    adapter, so the output equals the base model's. The same file listed twice has its scales added.
    """
    from diffusers.utils.peft_utils import set_adapter_layers, set_weights_and_activate_adapters

    specs = [l if isinstance(l, LoraSpec) else LoraSpec(l["path"], float(l.get("scale", 1.0))) for l in loras or ()]
    kept = _ADAPTERS.get(pipe)
    if not specs and not kept:
        return []  # no LoRA ever loaded on this pipe: nothing to switch off
    loaded = [load_lora(pipe, s.path, lora_dirs, **resolve_kwargs) for s in specs]
    weights: dict = {}
    for s, l in zip(specs, loaded):
        weights[l.adapter_name] = weights.get(l.adapter_name, 0.0) + float(s.scale)
    names, scales = list(weights), list(weights.values())
    _evict_inactive(pipe, set(names))
    for comp in COMPONENTS:
        model = getattr(pipe, comp, None)
        if model is None or not getattr(model, "peft_config", None):
            continue
        if names:
            set_adapter_layers(model, enabled=True)
            set_weights_and_activate_adapters(model, names, scales)
        else:
            set_adapter_layers(model, enabled=False)
    return loaded


def _evict_inactive(pipe, active: set) -> None:
    """Delete the least recently used adapters outside ``active`` beyond :data:`MAX_INACTIVE_ADAPTERS`, so memory
    (and the per-step cost of unfused adapters) does not grow with every LoRA a user tries."""
    kept = loaded_adapters(pipe)
    inactive = [k for k, l in kept.items() if l.adapter_name not in active]  # oldest first
    for key in inactive[: max(0, len(inactive) - MAX_INACTIVE_ADAPTERS)]:
        log.info("LoRA %r: dropped from memory (not used recently; read again when used)", kept[key].name)
        _delete_adapter(pipe, kept.pop(key).adapter_name)


def unload_all(pipe) -> None:
    """Delete every adapter this module kept on ``pipe`` (frees their memory)."""
    for l in list(loaded_adapters(pipe).values()):
        _delete_adapter(pipe, l.adapter_name)
    _ADAPTERS.pop(pipe, None)
