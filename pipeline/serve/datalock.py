"""One server per data folder: an exclusive lock held while it runs, which the system drops when the process ends,
however it ends. A second server on the same folder would queue the first one's running request again, or run one
request twice.

The lock is taken on the folder itself (``flock`` on the directory), so it holds while the folder does: deleting
``<folder>/serve.lock`` (which says the holder's process id, and is locked too) does not let a second server in.
Where the system has no ``flock`` (Windows) the file is locked, and an open file cannot be deleted there."""

from __future__ import annotations

import os
from pathlib import Path

from . import disk

LOCK_NAME = "serve.lock"


class FolderLock:
    """Held until :meth:`close` (or the process ends)."""

    def __init__(self, handle, folder_fd: int | None):
        self.handle, self.folder_fd = handle, folder_fd

    def close(self) -> None:
        self.handle.close()
        if self.folder_fd is not None:
            os.close(self.folder_fd)
            self.folder_fd = None


def lock_folder(folder, what: str = "--data-dir") -> FolderLock:
    """Holds the folder's lock (keep the returned lock while serving); ``SDXLCNError`` naming ``what`` when another
    process holds it. The folder is made if missing, readable by this user only."""
    from ..errors import SDXLCNError

    folder = Path(folder)
    try:
        disk.private_dir(folder)
        handle = open(os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600), "r+", encoding="ascii")
    except OSError as exc:
        raise SDXLCNError(f"{what} {folder}: cannot be used ({exc.strerror or exc}); give a folder this user may "
                          "write") from None
    folder_fd = None
    try:
        folder_fd = _lock(handle, folder)
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
    return FolderLock(handle, folder_fd)


def _lock(handle, folder: Path) -> int | None:
    """Locks the file and, where the system can, the folder (its descriptor, kept open, is returned)."""
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        handle.seek(0)
        msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
        return None
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the folder: whatever happens to the file in it
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)  # the file: what an older serve locked
    except OSError:
        os.close(fd)
        raise
    return fd
