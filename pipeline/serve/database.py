"""The queue database's connections, and what a store call does when SQLite or the disk fails.

One connection writes, one write at a time (a lock; each attempt waits at most ``busy_s`` for SQLite's own lock).
Reads run on connections of their own, from a pool: in WAL mode a reader never waits for a writer, of this process or
another, so a status, result or ``/ready`` call answers while a write waits for a lock another program holds.

A transient error (a lock held elsewhere, a full disk, an I/O error) is retried with growing pauses until the call's
window ends, then :class:`StoreUnavailable` (a submit's window is short: it is answered 503 within seconds). A write
that fails is reported by :meth:`Database.health` from its first failed attempt until a write succeeds. A damaged
database (SQLite's "malformed", "not a database") is never retried: :class:`StoreDamaged` names the file and what
to do. The database and the files beside it are created readable by this user only (they hold prompts and the
result files' tokens).
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from pathlib import Path

from . import disk

log = logging.getLogger("sdxl_controlnet_img2img.serve")
# what a store call retries with back-off: SQLite's busy/locked/full/I-O errors, and the file system's (ENOSPC, EIO)
TRANSIENT = (sqlite3.DatabaseError, OSError)
DAMAGED_CODES = (11, 26)  # SQLITE_CORRUPT ("database disk image is malformed"), SQLITE_NOTADB ("file is not a database")


class StoreUnavailable(Exception):
    """The store could not be read or written for its whole retry window (a lock held elsewhere, a full disk, a
    broken file): the caller answers 503, the worker says it is not ready. The message names the cause."""


class StoreDamaged(StoreUnavailable):
    """The queue database is damaged: retrying cannot help; the message names the file and what to do."""


def is_damaged(exc: BaseException) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in DAMAGED_CODES
    text = str(exc).lower()
    return isinstance(exc, sqlite3.DatabaseError) and ("malformed" in text or "not a database" in text)


class _Queued(Exception):
    """A write waited its whole window behind this process's other writes (stuck on SQLite's lock)."""


class Changes(threading.Condition):
    """Notified on every state change (on the write lock); ``count`` tells a waiter about a change it did not see."""

    count = 0

    def notify_all(self) -> None:
        self.count += 1
        super().notify_all()


class Database:
    """For :class:`~.store.Store`: ``self._db`` is the connection of the call running in this thread (a reader
    inside :meth:`_read`, else the writer)."""

    def _open(self, path: Path, busy_s: float) -> None:
        self.path, self.busy_s = Path(path), busy_s
        self._problem: str | None = None  # why writes fail, from the first failed attempt until one succeeds
        self._damaged = False
        self._probed = 0.0
        self._lock = threading.RLock()
        self.changed = Changes(self._lock)  # notified on every state change
        self._readers: list = []  # idle read connections
        self._readers_lock = threading.Lock()
        self._closed = False
        self._here = threading.local()
        private = 0o600
        for suffix in ("", "-wal", "-shm"):  # SQLite gives the files it adds the database's own mode
            name = self.path.with_name(self.path.name + suffix)
            if not suffix:
                os.close(os.open(name, os.O_RDWR | os.O_CREAT, private))
            try:
                os.chmod(name, private)
            except OSError:  # absent yet, or another user's: as it is
                pass
        self._writer = self._connect()

    def _connect(self, reader: bool = False):
        db = sqlite3.connect(str(self.path), timeout=self.busy_s, check_same_thread=False, isolation_level=None)
        db.row_factory = sqlite3.Row
        if reader:
            db.execute("PRAGMA query_only=1")
        return db

    @property
    def _db(self):
        return getattr(self._here, "db", None) or self._writer

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._writer.close()
            with self._readers_lock:
                for db in self._readers:
                    db.close()
                self._readers.clear()

    # ---- one attempt ----------------------------------------------------------------------------
    def _with(self, db, fn):
        before = getattr(self._here, "db", None)
        self._here.db = db
        try:
            return fn()
        finally:
            self._here.db = before

    def _read_once(self, fn):
        if self._closed:
            raise StoreUnavailable("the queue store is closed (the server stops)")
        with self._readers_lock:
            db = self._readers.pop() if self._readers else None
        if db is None:
            db = self._connect(reader=True)
        try:
            return self._with(db, fn)
        finally:
            with self._readers_lock:
                if self._closed:
                    db.close()
                else:
                    self._readers.append(db)

    def _write_once(self, fn, end: float):
        if self._closed:
            raise StoreUnavailable("the queue store is closed (the server stops)")
        if not self._lock.acquire(timeout=max(0.0, end - time.monotonic())):
            raise _Queued()
        try:
            return self._with(None, fn)
        finally:
            self._lock.release()

    # ---- resilience -----------------------------------------------------------------------------
    def _do(self, what: str, fn, retry_s: float | None = None):
        """``fn()`` (a read: ``what`` is "read"; else under the write lock), retried with growing pauses (taken
        outside the lock) while it fails with a transient error; :class:`StoreUnavailable` after ``retry_s``."""
        end = time.monotonic() + (self.retry_s if retry_s is None else retry_s)
        pause, warned = 0.05, False
        while True:
            try:
                out = self._read_once(fn) if what == "read" else self._write_once(fn, end)
                if self._problem is not None and what != "read" and not self._damaged:
                    log.warning("serve: the store works again (%s)", what)
                    self._problem = None
                return out
            except _Queued:
                problem = self._problem or ("the queue store cannot be written: this server's earlier writes still "
                                            "wait for the database")
                if what != "log":
                    self._problem = problem
                raise StoreUnavailable(f"{problem}; try again later") from None
            except TRANSIENT as exc:
                cause = f"{type(exc).__name__}: {exc}"
                if is_damaged(exc):
                    self._damaged = True
                    self._problem = (f"the queue database {self.path} is damaged ({exc}); stop the server and move "
                                     "it away (the queue then starts empty) or put a backup in its place")
                    raise StoreDamaged(self._problem) from exc
                if what not in ("read", "log"):  # /ready says so at once, not after the retry window
                    self._problem = f"the queue store cannot be written ({cause})"
                if time.monotonic() + pause > end:
                    raise StoreUnavailable(f"the queue store cannot be {'read' if what == 'read' else 'written'} "
                                           f"({cause}); try again later") from exc
                if not warned:
                    log.warning("serve: %s failed (%s); retrying for up to %.3g s", what, cause,
                                end - time.monotonic())
                    warned = True
                time.sleep(pause)
                pause = min(pause * 2, 2.0)

    def _tx(self, fn):
        """``fn()`` as one transaction: all of it or nothing (BEGIN IMMEDIATE takes the write lock first)."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            out = fn()
        except BaseException:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")
        self.changed.notify_all()
        return out

    def _read(self, fn):
        return self._do("read", fn, min(self.retry_s, 5.0))

    def health(self) -> str | None:
        """None while the store works; else why it does not (a write failed and none succeeded since; probed again
        at most once a second, never waiting: a file written and synced, SQLite's write lock taken at once)."""
        if self._problem is not None and not self._damaged and time.monotonic() - self._probed > 1.0 and \
                self._lock.acquire(blocking=False):  # a write in progress tells soon enough
            self._probed = time.monotonic()
            probe = self.path.parent / ".probe"
            try:
                disk.write_synced(probe, b"ok")
                probe.unlink()
                self._writer.execute("PRAGMA busy_timeout=0")
                try:
                    self._writer.execute("BEGIN IMMEDIATE")
                    self._writer.execute("ROLLBACK")
                finally:
                    self._writer.execute(f"PRAGMA busy_timeout={int(self.busy_s * 1000)}")
                log.warning("serve: the store works again")
                self._problem = None
            except TRANSIENT:
                pass
            finally:
                self._lock.release()
        return self._problem

    def ready(self) -> bool:
        return self._problem is None
