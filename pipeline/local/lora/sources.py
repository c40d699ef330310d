"""Where a LoRA file comes from: a LoRA folder, a path or ``file://`` URL, an ``http(s)://`` URL (downloaded once
into a cache folder, with a size cap and a timeout), or a Hugging Face hub repo id (``owner/repo`` or
``owner/repo/file.safetensors``), fetched only when the network is allowed; offline, a copy already in the hub
cache is still used.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
import urllib.parse
import urllib.request
from dataclasses import replace
from pathlib import Path

from ...errors import FieldError
from ...folders import cache_root
from ...images import download, redact_url
from ...request import LoraSpec
from ..models.hub import hub_offline, looks_like_repo_id

LORA_EXTENSIONS = (".safetensors", ".pt", ".ckpt", ".bin", ".pth")
MAX_LORA_DOWNLOAD_BYTES = 2 * 1024**3
LORA_DOWNLOAD_TIMEOUT_S = 60.0


class LoraError(FieldError, ValueError):
    """A LoRA could not be found, read or applied. The message names the LoRA (``lora``: its name or path as given);
    ``field`` is the request's ``loras``."""

    def __init__(self, name: str, message: str):
        self.lora = name
        super().__init__("loras", message, label=f"LoRA {name!r}")


def default_lora_dirs() -> list[Path]:
    """LoRA folders from ``SDXLCN_LORA_DIRS`` (os.pathsep-separated)."""
    return [Path(p).expanduser() for p in os.environ.get("SDXLCN_LORA_DIRS", "").split(os.pathsep) if p.strip()]


def default_cache_dir() -> Path:
    env = os.environ.get("SDXLCN_LORA_CACHE")
    if env:
        return Path(env).expanduser()
    return cache_root() / "loras"


def find_in_dirs(name: str, lora_dirs) -> Path | None:
    """``name`` (relative, with or without an extension) inside one of ``lora_dirs``, or None."""
    for d in lora_dirs or ():
        d = Path(d).expanduser()
        for candidate in (d / name, *(d / (name + ext) for ext in LORA_EXTENSIONS)):
            if candidate.is_file():
                return candidate.resolve()
    return None


def resolve_source(
    source: str,
    lora_dirs=None,
    *,
    cache_dir: str | os.PathLike | None = None,
    max_bytes: int = MAX_LORA_DOWNLOAD_BYTES,
    timeout: float = LORA_DOWNLOAD_TIMEOUT_S,
) -> Path:
    """The local file for a LoRA source (see the module doc). Errors are :class:`LoraError`."""
    name = source
    if not isinstance(source, str) or not source.strip():
        raise LoraError(str(source), "is empty; give a file name, a path, an http(s) URL or a hub repo id")
    source = source.strip()
    lower = source[:10].lower()
    if lower.startswith(("http://", "https://")):
        return _download_cached(source, cache_dir, max_bytes, timeout)
    if lower.startswith("file://"):
        p = Path(urllib.request.url2pathname(urllib.parse.urlsplit(source).path))
        if not p.is_file():
            raise LoraError(name, f"file not found: {p}")
        return p.resolve()
    p = Path(source).expanduser()
    if p.is_file():
        return p.resolve()
    if p.is_dir():
        for weight in ("pytorch_lora_weights.safetensors", "pytorch_lora_weights.bin"):
            if (p / weight).is_file():
                return (p / weight).resolve()
        raise LoraError(name, f"{p} is a folder without pytorch_lora_weights.safetensors; give the LoRA file itself")
    dirs = list(lora_dirs) if lora_dirs is not None else []
    dirs += default_lora_dirs()
    if not p.is_absolute():
        found = find_in_dirs(source, dirs)
        if found is not None:
            return found
        if looks_like_repo_id(source, with_file=True):
            return _hub_file(source)
    where = f" (searched {', '.join(str(d) for d in dirs)})" if dirs else ""
    raise LoraError(name, f"not found{where}; give a file in a LoRA folder (ComfyUI's models/loras; --lora-dir DIR on "
                          "the command line), a local path, an http(s) URL or a hub repo id")


def _download_cached(url: str, cache_dir, max_bytes: int, timeout: float) -> Path:
    """Download ``url`` into the cache once; later calls reuse the file."""
    return cached_download(url, cache_dir, max_bytes=max_bytes, timeout=timeout)


_locks: dict[str, threading.Lock] = {}
_locks_guard = threading.Lock()


def _url_download(url: str, max_bytes: int, timeout: float) -> bytes:
    from ...errors import ImageInputError

    try:
        return download(url, "lora", max_bytes=max_bytes, timeout=timeout)
    except ImageInputError as exc:
        raise LoraError(redact_url(url), exc.detail) from None


def cached_download(url: str, cache_dir=None, *, max_bytes: int = MAX_LORA_DOWNLOAD_BYTES,
                    timeout: float = LORA_DOWNLOAD_TIMEOUT_S, fetch=None, cache_bytes: int | None = None) -> Path:
    """The cached file of ``url``, downloaded on the first call (one download at a time per URL in this process; a
    file only appears complete). ``fetch(url, max_bytes, timeout) -> bytes`` downloads (default: a plain GET; a
    server passes its own outbound rules) and raises :class:`LoraError`. ``cache_bytes`` caps the whole cache: the
    least recently used files go to make room, and a file larger than the cap is refused."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    base = Path(urllib.parse.urlsplit(url).path).name or "lora.safetensors"
    base = re.sub(r"[^\w.-]", "_", base)[-80:]
    target = cache / f"{hashlib.sha256(url.encode('utf-8')).hexdigest()[:16]}-{base}"
    with _locks_guard:
        lock = _locks.setdefault(str(target), threading.Lock())
    with lock:
        if target.is_file():
            os.utime(target)  # recently used: the last to go when the cache is full
            return target
        if cache_bytes is not None:
            max_bytes = min(max_bytes, cache_bytes)
        data = (fetch or _url_download)(url, max_bytes, timeout)
        if len(data) > max_bytes:
            raise LoraError(redact_url(url), f"is {len(data)} bytes, over the {max_bytes}-byte limit of the LoRA cache")
        cache.mkdir(parents=True, exist_ok=True)
        if cache_bytes is not None:
            make_room(cache, cache_bytes - len(data))
        tmp = target.with_name(target.name + f".part{os.getpid()}-{threading.get_ident()}")
        tmp.write_bytes(data)
        os.replace(tmp, target)
        return target


def make_room(cache: Path, keep_bytes: int) -> None:
    """Delete the least recently used complete files of ``cache`` until at most ``keep_bytes`` remain."""
    files = []
    for f in cache.iterdir():
        if f.is_file() and ".part" not in f.name:
            st = f.stat()
            files.append((st.st_mtime, st.st_size, f))
    total = sum(size for _t, size, _f in files)
    for _mtime, size, f in sorted(files, key=lambda item: item[0]):
        if total <= keep_bytes:
            break
        f.unlink(missing_ok=True)
        total -= size


def _hub_file(repo_spec: str) -> Path:
    """A LoRA file from the Hugging Face hub: ``owner/repo`` or ``owner/repo/path/in/repo``."""
    parts = repo_spec.split("/")
    repo_id, filename = "/".join(parts[:2]), "/".join(parts[2:]) or None
    online = not hub_offline()
    try:
        from huggingface_hub import HfApi, hf_hub_download
    except ImportError:  # pragma: no cover - huggingface_hub comes with diffusers
        raise LoraError(repo_spec, "looks like a hub repo id but huggingface_hub is not installed") from None
    candidates = [filename] if filename else ["pytorch_lora_weights.safetensors"]
    if online and not filename:
        try:
            files = [f for f in HfApi().list_repo_files(repo_id) if f.endswith(".safetensors")]
        except Exception as exc:  # noqa: BLE001 - hub errors come in many types
            raise LoraError(repo_spec, f"could not list the hub repo {repo_id} ({exc.__class__.__name__}: {exc})") from None
        if "pytorch_lora_weights.safetensors" not in files:
            if len(files) != 1:
                raise LoraError(
                    repo_spec,
                    f"hub repo {repo_id} has {len(files)} .safetensors files ({', '.join(files[:5])}); "
                    f"name one as {repo_id}/<file>",
                )
            candidates = files
    last = None
    for fname in candidates:
        try:
            return Path(hf_hub_download(repo_id, fname, local_files_only=not online))
        except Exception as exc:  # noqa: BLE001
            last = exc
    if not online:
        raise LoraError(
            repo_spec,
            "is a hub repo id, but network access is off (HF_HUB_OFFLINE=1) and it is not in the hub cache; "
            "download the LoRA file and give its path, or allow network access",
        )
    raise LoraError(repo_spec, f"could not download from the hub ({last.__class__.__name__}: {last})")


def resolve_request_loras(request, lora_dirs):
    """``request`` with each LoRA given by a bare name that lies in ``lora_dirs`` replaced by its full path
    (URLs, hub ids and existing paths are left as they are)."""
    out = []
    for spec in request.loras:
        p = spec.path
        if "://" not in p[:10] and not Path(p).expanduser().is_file():
            found = find_in_dirs(p, lora_dirs)
            if found is not None:
                spec = LoraSpec(str(found), spec.scale)
        out.append(spec)
    return replace(request, loras=tuple(out))
