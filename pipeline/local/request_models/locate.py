"""Where the safety checker and the prompt-expansion model live, and the hooks a request needs.

Folder names (under ComfyUI's ``models/``, registered with ``folder_paths`` by the nodes; and
under any models folder given to the CLI):

* ``models/safety_checker/`` : CompVis/stable-diffusion-safety-checker (config.json,
  model.safetensors or pytorch_model.bin, preprocessor_config.json), directly or in one subfolder;
* ``models/prompt_expansion/`` : a GPT-2-class causal LM, e.g. Fooocus' ``fooocus_expansion``
  (config.json, pytorch_model.bin, vocab.json, merges.txt, tokenizer files, positive.txt),
  directly or in one subfolder.

Nothing is ever skipped silently: a request that enables a feature whose model is not there
fails with :class:`MissingModelError`, which names the folder to create and what to put in it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from ...errors import FieldError

SAFETY_CHECKER_FOLDER = "safety_checker"
PROMPT_EXPANSION_FOLDER = "prompt_expansion"

SAFETY_CHECKER_SOURCE = (
    "the Stable Diffusion safety checker: download the files of "
    "https://huggingface.co/CompVis/stable-diffusion-safety-checker (config.json, "
    "model.safetensors or pytorch_model.bin, preprocessor_config.json)"
)
PROMPT_EXPANSION_SOURCE = (
    "a GPT-2-class prompt-expansion model, e.g. Fooocus' fooocus_expansion: the files of "
    "models/prompt_expansion/fooocus_expansion in https://github.com/lllyasviel/Fooocus (config.json, "
    "vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json, positive.txt) plus "
    "https://huggingface.co/lllyasviel/misc/resolve/main/fooocus_expansion.bin saved as pytorch_model.bin"
)


class MissingModelError(FieldError, FileNotFoundError):
    """A feature was enabled but its model is not on disk. ``field`` is the request field that enabled it."""


def _candidates(search_dirs: Iterable, folder_name: str) -> list[Path]:
    """Each search dir itself, its ``folder_name`` subfolder, then their immediate subfolders (sorted)."""
    out: list[Path] = []
    seen: set[str] = set()

    def add(p: Path):
        key = os.path.normcase(str(p.resolve())) if p.exists() else str(p)
        if key not in seen and p.is_dir():
            seen.add(key)
            out.append(p)

    roots = []
    for d in search_dirs or ():
        if d is None:
            continue
        d = Path(d).expanduser()
        roots += [d, d / folder_name]
    for r in roots:
        add(r)
    for r in roots:
        if r.is_dir():
            for sub in sorted(r.iterdir()):
                if sub.is_dir() and not sub.name.startswith("."):
                    add(sub)
    return out


def _find(search_dirs, folder_name: str, field: str, source: str, check) -> Path:
    from ...errors import ModelLoadError

    search_dirs = [Path(d).expanduser() for d in (search_dirs or ()) if d is not None]
    near_misses = []
    for cand in _candidates(search_dirs, folder_name):
        try:
            check(cand)
            return cand
        except ModelLoadError as exc:
            if (cand / "config.json").is_file() or (cand / folder_name / "config.json").is_file():
                near_misses.append(str(exc))
    looked = ", ".join(str(d) for d in search_dirs) or "(no folders given)"
    if search_dirs:
        where = " or ".join(
            str(d) if d.name == folder_name else str(d / folder_name) for d in search_dirs[:2]
        )
    else:
        where = f"ComfyUI's models/{folder_name}"
    msg = (f"is on but no model was found; put {source} into {where} "
           f"(directly or in one subfolder), or turn {field} off. Looked in: {looked}")
    if near_misses:
        msg += ". Found but unusable: " + "; ".join(near_misses)
    raise MissingModelError(field, msg)


def find_safety_checker(search_dirs) -> Path:
    """The first safety-checker folder in ``search_dirs`` (each dir, its ``safety_checker`` subfolder, or
    one level below); raises :class:`MissingModelError` saying which folder to put which model in."""
    from .safety import split_layout

    return _find(search_dirs, SAFETY_CHECKER_FOLDER, "enable_safety_checker", SAFETY_CHECKER_SOURCE, split_layout)


def find_prompt_expander(search_dirs) -> Path:
    """The first prompt-expansion model folder in ``search_dirs`` (as for :func:`find_safety_checker`)."""
    from .prompt_expansion import check_folder

    return _find(search_dirs, PROMPT_EXPANSION_FOLDER, "expand_prompt", PROMPT_EXPANSION_SOURCE, check_folder)


def resolve_hooks(request, search_dirs=None, *, safety_dirs=None, expansion_dirs=None,
                  safety_checker_path=None, prompt_expansion_path=None, device: str | None = None, dtype=None):
    """``(safety_checker, prompt_expander)`` for ``request``, loaded (and cached) only when it enables them.

    A hook the request does not enable is ``None`` and its model is not loaded. An explicit
    ``*_path`` wins over searching; otherwise ``safety_dirs`` / ``expansion_dirs`` (or the shared
    ``search_dirs``) are searched with :func:`find_safety_checker` / :func:`find_prompt_expander`.
    ``device``/``dtype``: the pipeline's, so the side models run where it runs (default: the best device).
    Raises :class:`MissingModelError` (nothing found) or ``ModelLoadError`` (found but unloadable).
    """
    safety = expander = None
    if getattr(request, "enable_safety_checker", False):
        from .safety import load_safety_checker

        path = safety_checker_path or find_safety_checker(safety_dirs if safety_dirs is not None else search_dirs)
        safety = load_safety_checker(path, device=device, dtype=dtype)
    if getattr(request, "expand_prompt", False):
        from .prompt_expansion import load_prompt_expander

        path = prompt_expansion_path or find_prompt_expander(expansion_dirs if expansion_dirs is not None else search_dirs)
        expander = load_prompt_expander(path, device=device, dtype=dtype)
    return safety, expander


def free_model_hooks() -> None:
    """Free the cached safety checker and prompt-expansion model (call it wherever the pipeline is freed)."""
    from .prompt_expansion import free_prompt_expander
    from .safety import free_safety_checker

    free_safety_checker()
    free_prompt_expander()


def default_search_dirs() -> list[Path]:
    """Where the CLI looks when no path is given: ``./models`` and the package's own ``models/``."""
    pkg = Path(__file__).resolve().parents[2]
    return [Path.cwd() / "models", pkg / "models"]
