"""The request schema: the input of fal's endpoint (:data:`.endpoint.ENDPOINT`), with its names,
defaults and ranges, validated before any model work.

Image fields use fal's names ``image_url`` and ``control_image_url``; ``image`` and
``control_image`` are accepted as aliases. ``apply_canny`` is a local-only extension
(default true, as fal always runs Canny): set it false when the control image is already
an edge map. It is never sent to fal.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from .errors import RequestError
from .request_fields import (  # noqa: F401 - the request's constants, re-exported for its users
    ALIASES,
    DEFAULT_SCHEDULER,
    DEFAULTS,
    FIELD,
    FIELDS,
    LOCAL_ONLY,
    MAX_NUM_IMAGES,
    MAX_SEED,
    NUM_TRAIN_TIMESTEPS,
    SCHEDULERS,
)
from .sizes import parse_image_size


@dataclass(frozen=True)
class LoraSpec:
    path: str
    scale: float = 1.0


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str
    image_url: object  # path / URL / data URI string, or a PIL image when used as a library
    control_image_url: object
    negative_prompt: str = DEFAULTS["negative_prompt"]
    controlnet_conditioning_scale: float = DEFAULTS["controlnet_conditioning_scale"]
    image_size: object = DEFAULTS["image_size"]  # preset name, {"width", "height"}, or None = control image size
    num_inference_steps: int = DEFAULTS["num_inference_steps"]
    guidance_scale: float = DEFAULTS["guidance_scale"]
    strength: float = DEFAULTS["strength"]
    seed: int | None = DEFAULTS["seed"]
    num_images: int = DEFAULTS["num_images"]
    loras: tuple[LoraSpec, ...] = DEFAULTS["loras"]
    enable_safety_checker: bool = DEFAULTS["enable_safety_checker"]  # opt-in: fal's schema gives it no default
    expand_prompt: bool = DEFAULTS["expand_prompt"]
    sync_mode: bool = DEFAULTS["sync_mode"]
    apply_canny: bool = DEFAULTS["apply_canny"]
    # local only, never sent to fal (prefixed so they cannot collide with a field fal adds): the sampler and the
    # fraction of the steps in which the ControlNet acts, as ComfyUI's Apply ControlNet start/end percent
    local_scheduler: str = DEFAULTS["local_scheduler"]
    local_control_start: float = DEFAULTS["local_control_start"]
    local_control_end: float = DEFAULTS["local_control_end"]
    # local only: the timesteps the scheduler runs instead of its own (a LoRA card's list, e.g. DMD2's 999, 749, 499,
    # 249); () = the scheduler's own. img2img then runs the last int(num_inference_steps x strength) of them
    local_timesteps: tuple[int, ...] = DEFAULTS["local_timesteps"]

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict) -> "GenerationRequest":
        """Validate a fal-shaped request dict. Raises :class:`RequestError` naming the field."""
        if not isinstance(data, dict):
            raise RequestError("request", f"must be a JSON object, got {type(data).__name__}")
        data = dict(data)
        for alias, name in ALIASES.items():
            if alias in data:
                if name in data:
                    raise RequestError(alias, f"give either {alias!r} or {name!r}, not both")
                data[name] = data.pop(alias)
        known = set(FIELD)
        unknown = sorted(set(data) - known)
        if unknown:
            raise RequestError(unknown[0], f"is not a field of this request; valid fields: {', '.join(sorted(known))}")
        for required in (f.name for f in FIELDS if f.required):
            value = data.get(required)
            if value is None or isinstance(value, str) and not value.strip():
                raise RequestError(required, "is required")
        kwargs = dict(data)
        if "loras" in kwargs:
            kwargs["loras"] = parse_loras(kwargs["loras"])
        if "local_timesteps" in kwargs:
            kwargs["local_timesteps"] = parse_timesteps(kwargs["local_timesteps"])
        req = cls(**kwargs)
        req.validate()
        return req

    # ---- validation ---------------------------------------------------------------------
    def validate(self) -> "GenerationRequest":
        """Every field checked by its row of :data:`.request_fields.FIELDS`, then the rules between fields."""
        for f in FIELDS:
            _check_field(f, getattr(self, f.name))
        if int(self.num_inference_steps * self.strength) < 1:
            raise RequestError(
                "strength",
                f"{self.strength} with num_inference_steps {self.num_inference_steps} runs no denoising step "
                "(steps run = int(num_inference_steps * strength)); raise strength or num_inference_steps",
            )
        if self.local_control_start > self.local_control_end:
            raise RequestError("local_control_start", f"{self.local_control_start} is after local_control_end "
                                                      f"{self.local_control_end}: the ControlNet would act in no step; "
                                                      "set the start at or before the end")
        timesteps = parse_timesteps(self.local_timesteps)
        if timesteps and len(timesteps) != self.num_inference_steps:
            raise RequestError("local_timesteps", f"gives {len(timesteps)} timesteps but num_inference_steps is "
                                                  f"{self.num_inference_steps}: set num_inference_steps to "
                                                  f"{len(timesteps)} (img2img runs the last int(steps x strength))")
        return self

    def local_only_changes(self) -> dict:
        """The local-only fields set away from their defaults (what fal cannot honour)."""
        return {k: getattr(self, k) for k in LOCAL_ONLY if getattr(self, k) != DEFAULTS[k]}

    # ---- derived values ------------------------------------------------------------------
    @property
    def steps_to_run(self) -> int:
        """Denoising steps actually run: diffusers runs int(num_inference_steps * strength)."""
        return min(int(self.num_inference_steps * self.strength), self.num_inference_steps)

    def with_seed(self) -> "GenerationRequest":
        """This request with a concrete seed (a random one when absent)."""
        if self.seed is not None:
            return self
        return replace_fields(self, seed=random.randint(0, 2**32 - 1))

    def image_seed(self, index: int) -> int:
        """The seed of image ``index``: ``seed + index`` (wrapping at 2**64), so each image can be redone alone."""
        if self.seed is None:
            raise ValueError("call with_seed() first")
        return (self.seed + index) % (MAX_SEED + 1)

    def to_fal_arguments(self) -> dict:
        """The request as fal's API takes it (no local-only fields; images left as given)."""
        args = {f.name: getattr(self, f.name) for f in FIELDS if f.fal}
        args["loras"] = [{"path": l.path, "scale": l.scale} for l in self.loras]
        args.pop("image_size")
        args.pop("seed")
        if parse_image_size(self.image_size) is not None:  # "none" means: leave the field out, as fal expects
            args["image_size"] = self.image_size
        if self.seed is not None:
            args["seed"] = self.seed
        return args


def replace_fields(req: GenerationRequest, **changes) -> GenerationRequest:
    from dataclasses import replace

    return replace(req, **changes).validate()


def parse_loras(value) -> tuple[LoraSpec, ...]:
    if value is None:
        return ()
    if not isinstance(value, (list, tuple)):
        raise RequestError("loras", f"must be a list of {{path, scale}} objects, got {type(value).__name__}")
    out = []
    for i, item in enumerate(value):
        name = f"loras[{i}]"
        if isinstance(item, LoraSpec):
            item = {"path": item.path, "scale": item.scale}
        if not isinstance(item, dict):
            raise RequestError(name, f"must be an object with 'path' and optional 'scale', got {item!r}")
        unknown = set(item) - {"path", "scale"}
        if unknown:
            raise RequestError(name, f"unknown keys {sorted(unknown)}; a LoRA has 'path' and 'scale'")
        _check_str(f"{name}.path", item.get("path"), required=True)
        scale = item.get("scale", 1.0)
        _check_number(f"{name}.scale", scale, -4.0, 4.0)
        out.append(LoraSpec(path=item["path"], scale=float(scale)))
    return tuple(out)


def parse_timesteps(value) -> tuple[int, ...]:
    """``local_timesteps`` as a tuple: a list of whole numbers or comma-separated text (``"999, 749, 499, 249"``),
    strictly descending, each in [0, 999]; empty (``[]``, ``""``, None) = the scheduler's own timesteps."""
    name = "local_timesteps"
    if value is None:
        return ()
    if isinstance(value, str):
        parts = [p.strip() for p in value.replace(";", ",").split(",")]
        if parts == [""]:
            return ()
        if not all(p.lstrip("-").isdigit() for p in parts):
            raise RequestError(name, f"{value!r} is not a comma-separated list of whole numbers; write them "
                                     "descending, e.g. 999, 749, 499, 249")
        value = [int(p) for p in parts]
    if not isinstance(value, (list, tuple)):
        raise RequestError(name, f"must be a list of whole numbers (e.g. [999, 749, 499, 249]), got "
                                 f"{type(value).__name__}")
    for i, t in enumerate(value):
        _check_int(f"{name}[{i}]", t, 0, NUM_TRAIN_TIMESTEPS - 1)
    if any(a <= b for a, b in zip(value, value[1:])):
        raise RequestError(name, f"{list(value)} must be strictly descending (the noisiest first), e.g. "
                                 "999, 749, 499, 249")
    return tuple(value)


def _check_field(f, value) -> None:
    """One field's value against its row (kind and range)."""
    if f.kind == "text":
        _check_str(f.name, value, required=f.required)
    elif f.kind == "image":
        _check_image_source(f.name, value)
    elif f.kind == "number":
        _check_number(f.name, value, f.low, f.high, low_open=f.low_open)
    elif f.kind == "whole":
        if value is not None or f.default is not None:  # an absent seed is drawn later
            _check_int(f.name, value, f.low, f.high)
    elif f.kind == "switch":
        if not isinstance(value, bool):
            raise RequestError(f.name, f"must be true or false, got {value!r}")
    elif f.kind == "size":
        parse_image_size(value)
    elif f.kind == "loras":
        parse_loras(value)
    elif f.kind == "choice":
        if value not in f.choices:
            raise RequestError(f.name, f"{value!r} is not one of {', '.join(f.choices)}")
    elif f.kind == "timesteps":
        parse_timesteps(value)


def _check_image_source(name, value):
    """An image field holds text (a path, a file:// or http(s):// URL, a data: URI), a path object or a PIL image."""
    import os

    if isinstance(value, (str, os.PathLike)) or hasattr(value, "convert") and hasattr(value, "size"):
        return
    raise RequestError(name, f"must be a path, a file:// or http(s):// URL or a data: URI (text), got "
                             f"{type(value).__name__} {value!r:.40}")


def _check_str(name, value, required=False):
    if not isinstance(value, str):
        raise RequestError(name, f"must be text, got {type(value).__name__}")
    if required and not value.strip():
        raise RequestError(name, "is required and must not be empty")


def _check_number(name, value, low, high, low_open=False):
    if isinstance(value, int) and not isinstance(value, bool) and not -1e300 < value < 1e300:
        raise RequestError(name, f"must be a number in [{low}, {high}], got one of {value.bit_length()} bits")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RequestError(name, f"must be a number, got {value!r}")
    too_low = value <= low if low_open else value < low
    if too_low or value > high:
        bracket = "(" if low_open else "["
        raise RequestError(name, f"must be in {bracket}{low}, {high}], got {value}")


def _check_int(name, value, low, high):
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            raise RequestError(name, f"must be a whole number, got {value!r}; write {int(value)}")
        raise RequestError(name, f"must be a whole number, got {value!r}")
    if not low <= value <= high:
        raise RequestError(name, f"must be between {low} and {high}, got {value}")
