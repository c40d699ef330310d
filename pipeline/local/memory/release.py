"""Giving memory back after dropping a cached model."""

from __future__ import annotations

import ctypes
import gc
import sys
import threading


def trim_heap() -> None:
    """Hand the C heap's free pages back to the OS (glibc's ``malloc_trim``; nothing elsewhere). Weights are read
    into memory by several threads (lazy_checkpoint), and glibc keeps what is freed in those threads' arenas: without
    this the process's resident memory does not fall when a model is dropped."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # a C library without malloc_trim (musl): its own policy stands
        pass


def release_memory() -> None:
    """Collect garbage, give the heap's free pages back, then cached CUDA blocks to the driver."""
    gc.collect()
    trim_heap()
    try:
        import torch
    except ImportError:
        return
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class SingleModelCache:
    """Holds at most one loaded model, keyed by what it was loaded from (path, device, dtype, ...)."""

    def __init__(self):
        self._lock = threading.RLock()
        self._key = None
        self._value = None

    def get_or_load(self, key, load, before_load=None):
        """The cached model for ``key``; otherwise drop the previous model (memory given back, so two
        never sit in memory at once), call ``before_load()`` if given, and cache ``load()``'s result."""
        with self._lock:
            if self._value is not None and self._key == key:
                return self._value
            if self._value is not None:
                self._key = self._value = None
                release_memory()
            if before_load is not None:
                before_load()
            value = load()
            self._key, self._value = key, value
            return value

    def free(self) -> bool:
        """Drop the model and give its memory back. True if one was loaded."""
        with self._lock:
            had = self._value is not None
            self._key = self._value = None
        if had:
            release_memory()
        return had

    def forget(self, value) -> bool:
        """Drop the reference to ``value`` if it is the cached model, without collecting garbage (for a caller
        inside a host's own memory bookkeeping, where a collection must not run). True if it was cached."""
        with self._lock:
            if self._value is not None and self._value is value:
                self._key = self._value = None
                return True
            return False

    def current(self):
        with self._lock:
            return self._value
