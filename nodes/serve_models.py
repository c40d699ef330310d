"""The models ComfyUI's endpoint (``/sdxlcn/fal``) runs with, checked before a request is given an id.

The operator picks the checkpoint, ControlNet and VAE by name in ComfyUI's model folders: ``SDXLCN_SERVE_CHECKPOINT``
(models/checkpoints or models/diffusers), ``SDXLCN_SERVE_CONTROLNET`` (models/controlnet), ``SDXLCN_SERVE_VAE``
(models/vae, or ``none``: the checkpoint's own); unset, the shipped workflow's. While one of them is absent the
endpoint takes no request: 503 naming the model and its variable (``/ready`` says the same). A field that needs a
model the server lacks is refused with 422 naming the field and where the model goes: ``enable_safety_checker``
(models/safety_checker), ``expand_prompt`` (models/prompt_expansion), ``loras[i].path`` (a .safetensors file in
models/loras). The same check runs again when a request is handed to ComfyUI's queue, so a model removed meanwhile
ends the request with these words, never ComfyUI's validation JSON. Messages name ComfyUI's folders, never a path on
the server.
"""

from __future__ import annotations

import os
import re

from ..pipeline.local.request_models.locate import (PROMPT_EXPANSION_FOLDER, PROMPT_EXPANSION_SOURCE, SAFETY_CHECKER_FOLDER,
                                          SAFETY_CHECKER_SOURCE)
from .model_folders import checkpoint_choices, controlnet_choices, search_dirs, vae_choices
from .serve_workflow import shipped_loader

CHECKPOINT_ENV = "SDXLCN_SERVE_CHECKPOINT"
CONTROLNET_ENV = "SDXLCN_SERVE_CONTROLNET"
VAE_ENV = "SDXLCN_SERVE_VAE"
OWN = (  # (loader input, variable, ComfyUI's folders for it, the list of names it may be)
    ("checkpoint", CHECKPOINT_ENV, "models/checkpoints (a single file) or models/diffusers (a diffusers folder)",
     checkpoint_choices),
    ("controlnet", CONTROLNET_ENV, "models/controlnet", controlnet_choices),
    ("vae", VAE_ENV, "models/vae", vae_choices),
)
SHOWN = {"checkpoint": "checkpoint", "controlnet": "ControlNet", "vae": "VAE"}
OPTIONAL = (  # (field, what it needs, ComfyUI's folder, where to get it)
    ("enable_safety_checker", "safety checker", SAFETY_CHECKER_FOLDER, SAFETY_CHECKER_SOURCE),
    ("expand_prompt", "prompt-expansion model", PROMPT_EXPANSION_FOLDER, PROMPT_EXPANSION_SOURCE),
)


class Refusal(Exception):
    """A request this ComfyUI cannot run: ``status`` 503 (the server's own model is absent) or 422 (a field asks for
    a model it lacks, ``loc`` as fal's), ``text`` one sentence in the pack's words."""

    def __init__(self, status: int, text: str, loc: list | None = None):
        self.status, self.text, self.loc = status, text, loc
        super().__init__(text)

    def http_error(self):
        from ..pipeline.serve.protocol import HttpError, invalid

        if self.status == 422:
            return invalid(self.loc, self.text)
        return HttpError(self.status, self.text)


def _lora_names() -> list[str]:
    from .comfy_hooks import folder_paths

    fp = folder_paths()
    try:
        return [n.replace(os.sep, "/") for n in fp.get_filename_list("loras")] if fp is not None else []
    except Exception:  # noqa: BLE001 - a broken folder config lists no LoRA
        return []


def _has(folder: str, finder) -> bool:
    from ..pipeline.local.request_models.locate import MissingModelError

    try:
        finder(search_dirs(folder))
        return True
    except MissingModelError:
        return False


def has_optional(field: str) -> bool:
    """Whether ComfyUI's model folders hold the model ``field`` (enable_safety_checker, expand_prompt) needs."""
    from ..pipeline.local.request_models.locate import find_prompt_expander, find_safety_checker

    if field == "enable_safety_checker":
        return _has(SAFETY_CHECKER_FOLDER, find_safety_checker)
    return _has(PROMPT_EXPANSION_FOLDER, find_prompt_expander)


class ServedModels:
    """The endpoint's models, read from the environment once (ComfyUI's start); their files are looked for at
    every check, so a model put in its folder is served without a restart."""

    def __init__(self, env=None):
        env = os.environ if env is None else env
        shipped = shipped_loader()
        self.names = {key: (env.get(var) or "").strip() or shipped[key] for key, var, _f, _l in OWN}

    def missing(self) -> str | None:
        """Why the server's own models cannot run (one sentence per absent model), else None."""
        problems = []
        for key, var, folders, listing in OWN:
            name = self.names[key]
            if key == "vae" and name == "none":
                continue
            if name not in listing():
                problems.append(f"the {SHOWN[key]} {name!r} ({var}) is not in "
                                f"ComfyUI's {folders}: put it there, or set {var} to a model that is and restart "
                                "ComfyUI")
        return "; ".join(problems) or None

    def field_refusal(self, args: dict) -> Refusal | None:
        """The 422 for the first field of ``args`` whose model this ComfyUI lacks, else None."""
        for field, what, folder, source in OPTIONAL:
            if args.get(field) and not has_optional(field):
                return Refusal(422, f"this server has no {what}: its operator puts {source} into ComfyUI's "
                                    f"models/{folder} (directly or in one subfolder); or set {field} to false",
                               ["body", field])
        loras = args.get("loras") or ()
        names = _lora_names() if loras else []
        for i, lora in enumerate(loras):
            path = str(lora.get("path", "")) if isinstance(lora, dict) else ""
            if not path.lower().endswith(".safetensors"):
                return Refusal(422, f"{path[:200]!r} is not a .safetensors file name; name a LoRA file in this "
                                    "server's ComfyUI models/loras (safetensors only)", ["body", "loras", i, "path"])
            if path not in names:
                return Refusal(422, f"{path[:200]!r} is not in this server's ComfyUI models/loras; name one of its "
                                    "LoRA files (its operator puts .safetensors LoRAs there)",
                               ["body", "loras", i, "path"])
        return None

    def refusal(self, args: dict) -> Refusal | None:
        """What keeps ``args`` from running here (the server's own models first), else None."""
        why = self.missing()
        return Refusal(503, why) if why else self.field_refusal(args)

    def summary(self) -> str:
        """For the start-up line: the models served, what the optional fields find, and what is missing."""
        own = ", ".join(f"{SHOWN[key]} {self.names[key]!r}" for key, _v, _f, _l in OWN
                        if not (key == "vae" and self.names[key] == "none"))
        if self.names["vae"] == "none":
            own += ", the checkpoint's VAE"
        extras = [f"{field} {'on request' if has_optional(field) else f'refused (no model in models/{folder})'}"
                  for field, _w, folder, _s in OPTIONAL]
        loras = _lora_names()
        extras.append(f"{len(loras)} LoRA(s) in models/loras")
        missing = self.missing()
        text = f"models: {own}; {', '.join(extras)}"
        return text + (f". MISSING, every request is refused with 503 until fixed: {missing}" if missing else "")


def comfy_refusal_text(error, node_errors) -> str:
    """ComfyUI's refusal of a served workflow (``validate_prompt``'s error and node errors) in one line."""
    for node in (node_errors or {}).values():
        for err in node.get("errors", []) if isinstance(node, dict) else []:
            info = err.get("extra_info") or {}
            where = f"{node.get('class_type', 'a node')}'s {info['input_name']}" if info.get("input_name") else \
                node.get("class_type", "a node")
            return one_line(f"ComfyUI refused the request's workflow: {where}: {err.get('message', 'refused')}")
    message = error.get("message") if isinstance(error, dict) else str(error)
    return one_line(f"ComfyUI refused the request's workflow: {message or 'no reason given'}")


def one_line(text: str, limit: int = 600) -> str:
    """``text`` on one line, at most ``limit`` characters, cut at a word."""
    text = re.sub(r"\s+", " ", str(text)).strip()
    return text if len(text) <= limit else text[:limit].rsplit(" ", 1)[0] + " ..."
