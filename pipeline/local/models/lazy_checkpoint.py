"""A safetensors checkpoint as a dict whose tensors are read, and cast to the load dtype, only when a converter
asks for them: diffusers' single-file converters then hold one component's tensors at a time, already in the
dtype the model keeps, instead of the whole file in its own dtype beside the cast copies.

Each tensor is copied (cast) out of a read-only memory map of the file straight into the tensor the model keeps,
and the map's pages are then given back (``MADV_DONTNEED``): mapped pages count in the process's resident memory
while they are mapped, the page cache does not. Faster than ``read()`` into fresh memory (5.1 s vs 7.3 s for the
full-size SDXL file to bf16 on this 2-core machine). Casts go through fp32 in steps (:func:`copy_into`): reading
the full-size SDXL ControlNet into bf16 took half the time of torch's direct cast. Measured on the full-size SDXL
single file + ControlNet in bf16 (``bench/fullsize.py``): see the README's Performance table.

The first read of a checkpoint reads all its kept tensors at once, split across torch's threads by tensor (each
tensor's copy on one thread): the copies are page faults and memory traffic, which both cores do in parallel on
separate tensors (the full-size UNet into bf16: 2.4-2.8 s on two threads, 4.4-6.5 s on one). This holds no more
in memory than the converters do: diffusers' single-file converters take every tensor of a component into their
converted state dict before the model is built. Each tensor is then given out once and forgotten.
"""

from __future__ import annotations

import ctypes
import os
import threading
from contextlib import contextmanager

from .checks import SAFETENSORS_DTYPES, TensorIndex, file_identity

_CHUNK = 1 << 18  # elements per step of a cast: a step's fp32 staging (1 MiB) stays in the cache
_staging = threading.local()  # per thread: its fp32 staging, made on its first cast
_omp = []  # [OpenMP's omp_set_num_threads as torch loaded it, or None], looked up once


def _torch_dtype(name: str):
    import torch

    return getattr(torch, SAFETENSORS_DTYPES[name][0])


def _set_own_threads():
    """The ``omp_set_num_threads`` of the OpenMP torch uses, which sets the calling thread's own count (None where it
    cannot be found). ``torch.set_num_threads`` would also set the count that every thread started later begins
    with: a thread that first used torch while a load had it at 1 would stay on one thread for good."""
    if not _omp:
        import torch

        try:  # looked up from torch's own extension: its dependencies are searched, so this is torch's OpenMP
            fn = ctypes.CDLL(torch._C.__file__).omp_set_num_threads
            fn.argtypes, fn.restype = [ctypes.c_int], None
        except (OSError, AttributeError, TypeError):  # no OpenMP symbols there (Windows, a non-OpenMP torch)
            fn = None
        _omp.append(fn)
    return _omp[0]


def _own_threads_to_one():
    """Put this thread's torch operations on one thread; its count before (None: nothing changed)."""
    import torch

    before = torch.get_num_threads()  # also torch's first setting of this thread's count: ours comes after it
    own = _set_own_threads() if before > 1 else None
    if own is None:
        return None
    own(1)
    if torch.get_num_threads() != 1:  # not the OpenMP torch's threads come from: leave it as it was
        own(before)
        return None
    return before


@contextmanager
def one_thread():
    """torch's operations on this thread run on one thread inside the block; no other thread's count changes, and
    this thread's is what it was afterwards. Where that cannot be done per thread, nothing changes (the values are
    the same, only the split of the work differs)."""
    before = _own_threads_to_one()
    try:
        yield
    finally:
        if before is not None:
            _set_own_threads()(before)


def copy_into(out, src) -> None:
    """``out.copy_(src)`` for two flat tensors of the same length, faster.

    A cast between 16-bit (or 8-bit) float types goes through fp32 in cache-sized steps: torch's direct
    fp16->bf16 kernel is about 3x slower than the two it is made of, and fp32 holds every such value exactly, so the
    result is torch's own cast (only a NaN's sign and payload bits may differ). The steps of one tensor run on one
    thread (torch's thread count is 1 for the copy, then restored): split by torch's threads, each step waited for
    the slowest core. Parallelism comes from copying several tensors at once (:meth:`LazyCheckpoint._read_all`)."""
    import torch

    staged = (out.dtype != src.dtype and out.is_floating_point() and src.is_floating_point()
              and torch.float32 not in (out.dtype, src.dtype) and src.element_size() <= 2)
    if not staged:
        out.copy_(src)
        return
    with one_thread():
        staging = getattr(_staging, "stage", None)
        if staging is None:
            staging = _staging.stage = torch.empty(_CHUNK, dtype=torch.float32)
        n = src.numel()
        for i in range(0, n, _CHUNK):
            j = min(i + _CHUNK, n)
            stage = staging[:j - i]
            stage.copy_(src[i:j])
            out[i:j].copy_(stage)


def copy_bytes_into(out, raw, dtype) -> None:
    """:func:`copy_into` from ``raw``, a flat uint8 tensor holding ``out.numel()`` values of ``dtype``. Bytes at an
    address that is not a multiple of ``dtype``'s size (the safetensors format aligns only its header, to 8 bytes, and
    some writers not even that) cannot be viewed as ``dtype``: they are copied to aligned memory first, straight into
    ``out`` when it keeps ``dtype``, else a step at a time through an aligned buffer."""
    import torch

    size = dtype.itemsize
    if raw.data_ptr() % size == 0 and raw.storage_offset() % size == 0:
        copy_into(out, raw.view(dtype))
    elif out.dtype == dtype:
        out.view(torch.uint8).copy_(raw)
    else:
        step = _CHUNK * size
        aligned = torch.empty(min(step, raw.numel()), dtype=torch.uint8)
        for i in range(0, raw.numel(), step):
            part = aligned[:min(step, raw.numel() - i)]
            part.copy_(raw[i:i + step])
            copy_into(out[i // size:(i + part.numel()) // size], part.view(dtype))


class LazyCheckpoint(dict):
    """The tensors of ``index`` (a safetensors :class:`TensorIndex`) whose key passes ``keep``; each access reads
    the tensor from the file and casts a floating one to ``dtype`` (None: as stored). The first access reads every
    kept tensor (in parallel); each is given out once and then forgotten, a later access reads it again."""

    def __init__(self, index: TensorIndex, dtype=None, keep=None):
        super().__init__((k, None) for k in index.locations if keep is None or keep(k))
        self._index, self._dtype = index, dtype
        self._map = self._bytes = None  # the file, mapped read-only on the first read, and its bytes as a tensor
        self._ahead = None  # read ahead by the first access, each given out once: key -> tensor

    def _open(self):
        """Map the file read-only, once: the file whose header was read (the same device, inode, size and
        modification time), or none at all: offsets from another file's header would read the wrong bytes."""
        import mmap
        import warnings

        import torch

        if self._map is not None:
            return
        try:
            with open(self._index.path, "rb") as f:
                now = file_identity(os.fstat(f.fileno()))
                if self._index.identity is not None and now != self._index.identity:
                    raise self._index.error(
                        "changed on disk after its header was read (it was rewritten or replaced while loading): "
                        "let the copy or download finish, then load it again.")
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except OSError as exc:
            raise self._index.error(f"could not be opened ({type(exc).__name__}: {exc}).") from None
        with warnings.catch_warnings():  # read-only on purpose: the file's bytes are only read from
            warnings.simplefilter("ignore", UserWarning)
            self._bytes = torch.frombuffer(self._map, dtype=torch.uint8)

    def _read_all(self):
        """Every kept tensor, read by torch's threads in parallel (one tensor per thread at a time, each worker on one
        thread of its own: the calling thread's setting, and the one later threads start with, stay as they are)."""
        from concurrent.futures import ThreadPoolExecutor

        import torch

        keys = sorted(dict.keys(self), key=lambda k: self._index.locations[k][1])  # in file order
        threads = torch.get_num_threads()
        if threads <= 1 or len(keys) < 2:
            return {k: self._read(k) for k in keys}
        self._open()  # mapped once, before the threads
        with ThreadPoolExecutor(min(threads, len(keys)), thread_name_prefix="sdxlcn-read",
                                initializer=_own_threads_to_one) as pool:
            return dict(zip(keys, pool.map(self._read, keys)))

    def _read(self, key):
        import mmap

        import torch

        name, begin, end = self._index.locations[key]
        try:
            dtype, shape = _torch_dtype(name), self._index.shapes[key]
        except AttributeError:
            raise self._index.error(f"stores {key!r} as {name}, which this torch {torch.__version__} has no type "
                                    f"for: upgrade torch.") from None
        want = self._dtype if self._dtype is not None and dtype.is_floating_point else dtype
        try:
            kept = torch.empty(shape, dtype=want)
            if end == begin:
                return kept
            self._open()
            copy_bytes_into(kept.view(-1), self._bytes[begin:end], dtype)
        except (RuntimeError, ValueError) as exc:
            raise self._index.error(f"could not be read at {key!r} ({type(exc).__name__}: "
                                    f"{str(exc).strip()[:300]}).") from None
        if hasattr(self._map, "madvise") and hasattr(mmap, "MADV_DONTNEED"):  # give the file's pages back now
            start = begin - begin % mmap.PAGESIZE
            self._map.madvise(mmap.MADV_DONTNEED, start, end - start)
        return kept

    def __getitem__(self, key):
        if not dict.__contains__(self, key):
            raise KeyError(key)
        if self._ahead is None:
            self._ahead = self._read_all()
        value = self._ahead.pop(key, None)
        return value if value is not None else self._read(key)

    def get(self, key, default=None):
        return self[key] if key in self else default

    def pop(self, key, *default):
        if key in self:
            value = self[key]
            dict.pop(self, key)
            return value
        if default:
            return default[0]
        raise KeyError(key)

    def items(self):
        return [(k, self[k]) for k in list(self.keys())]

    def values(self):
        return [self[k] for k in list(self.keys())]

    def copy(self):
        return {k: self[k] for k in self.keys()}


def stored_dtypes(index: TensorIndex) -> set:
    """The torch dtypes a safetensors file's tensors are stored in (empty for a pickle)."""
    return {_torch_dtype(name) for name, _begin, _end in index.locations.values()}


def checkpoint_tensors(index: TensorIndex, dtype=None, keep=None) -> dict:
    """The tensors of a weights file for a converter: a pickle's state dict (read whole, it is in memory already),
    or a :class:`LazyCheckpoint` of a safetensors file; ``keep`` filters keys."""
    if index.state_dict is not None:
        return {k: v for k, v in index.state_dict.items() if keep is None or keep(k)}
    return LazyCheckpoint(index, dtype, keep)
