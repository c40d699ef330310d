"""Where the nodes find models: ComfyUI's ``folder_paths`` (checkpoints, diffusers, controlnet, vae,
loras) plus the pack's own ``safety_checker`` and ``prompt_expansion`` folders under models/."""

from __future__ import annotations

import os

from ..pipeline.local.request_models.locate import PROMPT_EXPANSION_FOLDER, SAFETY_CHECKER_FOLDER, resolve_hooks
from .comfy_hooks import folder_paths

WEIGHT_EXTENSIONS = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


def register_model_folders() -> None:
    """Add the pack's own model folders to ComfyUI (models/safety_checker, models/prompt_expansion)."""
    fp = folder_paths()
    if fp is None:
        return
    for name in (SAFETY_CHECKER_FOLDER, PROMPT_EXPANSION_FOLDER):
        if name not in fp.folder_names_and_paths:
            fp.folder_names_and_paths[name] = ([os.path.join(fp.models_dir, name)], {"folder"})


def _folders(name: str) -> list[str]:
    fp = folder_paths()
    if fp is None:
        return []
    try:
        return [p for p in fp.get_folder_paths(name) if os.path.isdir(p)]
    except KeyError:
        return []


def _subfolders_with(name: str, marker: str) -> dict[str, str]:
    """Folders (any depth) under ComfyUI's ``name`` model folders that contain ``marker``, by relative name."""
    found: dict[str, str] = {}
    for root in _folders(name):
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            if marker in filenames:
                rel = os.path.relpath(dirpath, root).replace(os.sep, "/")
                if rel != ".":
                    found.setdefault(rel, dirpath)
                dirnames[:] = []  # a model folder's subfolders are its components
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
    return found


def _weight_files(name: str) -> list[str]:
    fp = folder_paths()
    if fp is None:
        return []
    try:
        return [f for f in fp.get_filename_list(name) if f.lower().endswith(WEIGHT_EXTENSIONS)]
    except KeyError:
        return []


def checkpoint_choices() -> list[str]:
    """SDXL single files in models/checkpoints, then diffusers folders in models/diffusers (by folder name)."""
    return sorted(_weight_files("checkpoints")) + sorted(_subfolders_with("diffusers", "model_index.json"))


def _files_and_folders(name: str) -> list[str]:
    """Single weight files, then diffusers folders (with config.json), of a model folder; a file inside a listed
    folder is that folder's weights, not a model of its own, so it is listed once, as the folder."""
    folders = sorted(_subfolders_with(name, "config.json"))
    inside = tuple(f + "/" for f in folders)
    files = sorted(f for f in _weight_files(name) if not f.replace(os.sep, "/").startswith(inside))
    return files + folders


DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"


def _weights_only_folders(name: str) -> dict[str, str]:
    """Folders holding a diffusers model's weights file but no config.json, by relative name -> that file: what the
    shipped workflows' models lists download for ``controlnet-canny-sdxl-1.0`` (ComfyUI's frontend can list files,
    not folders). The file loads as a single file, with the pack's own SDXL ControlNet config."""
    found = _subfolders_with(name, DIFFUSERS_WEIGHTS)
    return {rel: os.path.join(path, DIFFUSERS_WEIGHTS) for rel, path in found.items()
            if not os.path.isfile(os.path.join(path, "config.json"))}


def controlnet_choices() -> list[str]:
    """ControlNet files and diffusers folders (with config.json) in models/controlnet, then folders that hold only
    the weights file (whose file stays listed too, as saved workflows may name it)."""
    return _files_and_folders("controlnet") + sorted(_weights_only_folders("controlnet"))


def vae_choices() -> list[str]:
    return ["none"] + _files_and_folders("vae")


def _is_folder(folder_name: str, name: str) -> bool:
    return any(os.path.isdir(os.path.join(root, name)) for root in _folders(folder_name))


def resolve(kind: str, name: str) -> str:
    """The full path of a combo value; raises with the folder to put it in when it is gone. Inside ComfyUI only a
    name in its model folders resolves (as the dropdowns list them): a workflow cannot name any other file."""
    fp = folder_paths()
    if fp is None and os.path.isabs(name) and os.path.exists(name):
        return name  # outside ComfyUI (scripts, tests): a path. Inside, only what the model folders list
    if fp is not None:
        folder = {"checkpoint": "checkpoints", "controlnet": "controlnet", "vae": "vae"}[kind]
        # a folder's name is not asked of get_full_path (files only): for a linked folder it logs "WARNING path ...
        # exists but doesn't link anywhere, skipping", untrue, at every run
        path = None if _is_folder(folder, name) else fp.get_full_path(folder, name)
        if path:
            return path
        marker = "model_index.json" if kind == "checkpoint" else "config.json"
        for folder_name in (("diffusers",) if kind == "checkpoint" else (folder,)):
            found = _subfolders_with(folder_name, marker).get(name)
            if found:
                return found
        found = _weights_only_folders(folder).get(name) if kind == "controlnet" else None
        if found:
            return found
    where = {"checkpoint": "models/checkpoints (single files) or models/diffusers (diffusers folders)",
             "controlnet": "models/controlnet", "vae": "models/vae"}[kind]
    raise FileNotFoundError(f"{kind}: {name!r} was not found; put it in ComfyUI's {where} and refresh")


def search_dirs(folder_name: str) -> list[str]:
    """ComfyUI's folders for one of the pack's model kinds (empty outside ComfyUI)."""
    register_model_folders()
    return _folders(folder_name)


def resolve_request_hooks(request, device: str | None = None, dtype=None) -> dict:
    """Safety checker / prompt expander for a request, from models/safety_checker and models/prompt_expansion."""
    safety, expander = resolve_hooks(
        request,
        safety_dirs=search_dirs(SAFETY_CHECKER_FOLDER),
        expansion_dirs=search_dirs(PROMPT_EXPANSION_FOLDER),
        device=device,
        dtype=dtype,
    )
    return {"safety_checker": safety, "prompt_expander": expander}
