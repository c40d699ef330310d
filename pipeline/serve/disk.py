"""The store's files on disk: written and synced before the database row that names them commits, readable by this
user only (folders 0700, files 0600: they hold prompts, input images and results), and a floor of free space below
which no request is accepted and no downloaded image stored (a full disk would otherwise fail requests already
accepted)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

MIN_FREE_ENV = "SDXLCN_SERVE_MIN_FREE_MB"
KEEP_ENV = "SDXLCN_SERVE_KEEP_RESULTS_HOURS"
MIN_FREE_MB = 256.0  # below this (after the request's own bytes) a submit is answered 507
KEEP_HOURS = 168.0  # a finished request's result, status and files are deleted this long after it ended (7 days)


class LowDisk(Exception):
    """Too little free space to accept a request (HTTP 507); the message says how much there is and what to do."""


def setting(env: str, default: float) -> float:
    """A number from the environment (ComfyUI's way of setting the endpoint), else ``default``."""
    try:
        value = float(os.environ.get(env, "").strip() or default)
    except ValueError:
        return default
    return value if value >= 0 else default


def private_dir(path: Path) -> None:
    """``path`` (and missing parents) made if missing; the folder itself readable by this user only, as are files
    written here (:func:`write_synced`)."""
    path = Path(path)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if path.stat().st_mode & 0o077:
        try:
            os.chmod(path, 0o700)
        except OSError:  # another user's folder: left as it is
            pass


def write_synced(path: Path, data: bytes) -> None:
    """``data`` in ``path`` (mode 0600), on the disk (fsync) when this returns."""
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def sync_dir(path: Path) -> None:
    """The folder's entries (files created or renamed in it) on the disk."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_synced(path: Path, data: bytes) -> None:
    """``data`` in ``path`` as a whole or not at all (written beside it, synced, renamed over it)."""
    tmp = path.with_name(path.name + ".part")
    write_synced(tmp, data)
    tmp.replace(path)


def check_free(folder: Path, incoming: int, min_free: int) -> None:
    """:class:`LowDisk` when ``folder``'s disk would keep less than ``min_free`` bytes after ``incoming`` more."""
    free = shutil.disk_usage(folder).free
    if free - incoming < min_free:
        raise LowDisk(f"the server's disk is almost full ({free / 2**20:.0f} MiB free, {min_free / 2**20:.0f} MiB "
                      "kept free); no request is accepted until space is freed: try again later (the operator: free "
                      f"space in {folder}, or lower {MIN_FREE_ENV} / --min-free-mb)")
