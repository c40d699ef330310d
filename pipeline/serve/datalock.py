"""One server per data folder: an exclusive lock on ``<folder>/serve.lock`` held while it runs (the system drops it
when the process ends, however it ends). A second server on the same folder would queue the first one's running
request again, or run one request twice."""

from __future__ import annotations

import os
from pathlib import Path

LOCK_NAME = "serve.lock"


def lock_folder(folder, what: str = "--data-dir"):
    """Holds the folder's lock (keep the returned file open while serving); ``SDXLCNError`` naming ``what`` when
    another process holds it."""
    from ..errors import SDXLCNError

    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle = open(folder / LOCK_NAME, "a+", encoding="ascii")
    except OSError as exc:
        raise SDXLCNError(f"{what} {folder}: cannot be used ({exc.strerror or exc}); give a folder this user may "
                          "write") from None
    try:
        _lock(handle)
    except OSError:
        handle.seek(0)
        holder = handle.read().strip()[:20]
        handle.close()
        raise SDXLCNError(f"{what} {folder}: another server uses it{f' (pid {holder})' if holder else ''}; stop "
                          "that one, or give this one its own folder") from None
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    return handle


def _lock(handle) -> None:
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        handle.seek(0)
        msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
        return
    fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
