"""Output folders: checked before any work starts (nothing loaded, nothing submitted to fal and billed), and a write
that still fails later (a full disk) said in words, not in errno names."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import SDXLCNError

# the pack's folder in ComfyUI's user directory (user/<this>): the fal key file and request log, serve's key file
# and store
USER_FOLDER = "sdxl_controlnet_img2img"


def cache_root() -> Path:
    """The pack's cache folder: ``SDXLCN_CACHE_DIR``, else ``$XDG_CACHE_HOME`` or ``~/.cache``, then the pack's name."""
    env = os.environ.get("SDXLCN_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / USER_FOLDER


def folder_problem(path) -> str | None:
    """What keeps ``path`` from being (or becoming) a folder that can be written, in words; None when nothing does.
    A missing folder is no problem (it is made when the first file is written)."""
    p = Path(path).expanduser()
    for q in (p, *p.parents):
        if not q.exists():
            continue
        if not q.is_dir():
            return f"{q} is a file, not a folder" + ("" if q == p else f" (so {p} cannot be made)")
        if not os.access(q, os.W_OK | os.X_OK):
            return f"{q} cannot be written (no permission)" + ("" if q == p else f" (so {p} cannot be made)")
        return None
    return None


def check_output_folder(path, option: str) -> Path:
    """``path`` as a :class:`~pathlib.Path` when a result can be written there; otherwise one
    :class:`~.errors.SDXLCNError` naming ``option`` (``--out``), what is in the way and the fix."""
    problem = folder_problem(path)
    if problem:
        raise SDXLCNError(f"{option}: {problem}; give a folder that can be written (a missing one is made)")
    return Path(path)


def write_error_text(exc: OSError, folder) -> str:
    """An error writing into ``folder``, in words: "X is a file, not a folder" when a file stands where the folder
    should be, else the system's own words and the file they concern."""
    problem = folder_problem(folder)
    if problem:
        return problem
    if isinstance(exc, IsADirectoryError) and exc.filename:
        return f"{exc.filename} is a folder, not a file"
    where = f" at {exc.filename}" if exc.filename and str(exc.filename) != str(folder) else ""
    return f"{exc.strerror or type(exc).__name__}{where}"


def comfyui_folder() -> Path | None:
    """ComfyUI's folder (the one holding custom_nodes/, models/ and user/) when this pack sits in its custom_nodes
    folder, as ComfyUI-Manager installs it (a link there counts too: the path is not resolved); else None."""
    pack = Path(os.path.abspath(__file__)).parent.parent
    return pack.parent.parent if pack.parent.name == "custom_nodes" else None
