"""``LazyCheckpoint``: a safetensors file read one tensor at a time, cast on reading, equals what safetensors
itself reads cast by torch, for every cast the loader makes (the same width in place, widening and narrowing),
and leaves integer tensors alone."""

from __future__ import annotations

import gc
import threading
import weakref

import pytest
import torch
from safetensors.torch import load_file, save_file

from sdxl_controlnet_img2img.pipeline.local.models.lazy_checkpoint import LazyCheckpoint
from sdxl_controlnet_img2img.pipeline.local.models.checks import read_safetensors_index


@pytest.fixture
def checkpoint(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {"a.weight": torch.randn(300, 70, generator=g).half(), "b.weight": torch.randn(5, generator=g),
               "c.bias": torch.randn(3, 4, 5, generator=g).bfloat16(), "ids": torch.arange(77)[None],
               "empty": torch.zeros(0, 4).half()}
    path = tmp_path / "m.safetensors"
    save_file(tensors, str(path))
    return path


@pytest.mark.parametrize("dtype", [None, torch.bfloat16, torch.float16, torch.float32])
def test_values_equal_safetensors_own_read_cast_by_torch(checkpoint, dtype):
    expected = load_file(str(checkpoint))
    lazy = LazyCheckpoint(read_safetensors_index(checkpoint, "x"), dtype)
    assert set(lazy) == set(expected)
    for key, ref in expected.items():
        want = ref.to(dtype) if dtype is not None and ref.is_floating_point() else ref
        got = lazy[key]
        assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want), key
    # read afresh each time, nothing kept: two reads held at once own separate memory, writing into one leaves the
    # other and every later read as the file has it, and the reader keeps no reference to what it gave out
    first, second = lazy["a.weight"], lazy["a.weight"]
    assert first.untyped_storage().data_ptr() != second.untyped_storage().data_ptr()
    first.add_(1)
    assert torch.equal(second, expected["a.weight"].to(second.dtype)) and torch.equal(lazy["a.weight"], second)
    gone = weakref.ref(first)
    del first
    gc.collect()
    assert gone() is None


def test_keep_and_pop_work_like_a_dict(checkpoint):
    lazy = LazyCheckpoint(read_safetensors_index(checkpoint, "x"), torch.bfloat16, keep=lambda k: k.endswith("weight"))
    assert sorted(lazy) == ["a.weight", "b.weight"] and "ids" not in lazy
    assert lazy.pop("b.weight").dtype == torch.bfloat16 and "b.weight" not in lazy
    assert lazy.get("b.weight") is None and lazy.pop("b.weight", 1) == 1
    with pytest.raises(KeyError):
        lazy["ids"]
    assert [k for k, _ in lazy.items()] == ["a.weight"]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("stored, dtype", [(torch.float16, torch.bfloat16), (torch.bfloat16, torch.float16),
                                           (torch.float16, torch.float32), (torch.float32, torch.bfloat16),
                                           (torch.float16, None)])
def test_large_tensors_copied_in_steps_equal_torchs_cast(tmp_path, stored, dtype, threads):
    """Tensors longer than one step go through the stepped copy (one thread): the
    values are torch's own cast, bit for bit (infinities and the largest fp16 included; NaNs stay NaNs), and
    torch's thread count is what it was."""
    from sdxl_controlnet_img2img.pipeline.local.models import lazy_checkpoint

    g = torch.Generator().manual_seed(1)
    n = 2 * lazy_checkpoint._CHUNK + 12340  # steps, and a short last one
    ref = (torch.randn(n, generator=g) * 100).to(stored)
    ref[:4] = torch.tensor([float("inf"), float("-inf"), float("nan"), 65504.0])
    path = tmp_path / "big.safetensors"
    save_file({"w": ref.reshape(-1, 4)}, str(path))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = LazyCheckpoint(read_safetensors_index(path, "x"), dtype)["w"]
        assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)
    want = ref.reshape(-1, 4).to(dtype) if dtype is not None else ref.reshape(-1, 4)
    assert got.dtype == want.dtype and got.shape == want.shape
    nan = want.isnan()
    assert torch.equal(got.isnan(), nan)  # a NaN stays a NaN (its sign and payload bits may differ)
    bits = torch.int16 if got.element_size() == 2 else torch.int32
    assert torch.equal(got.view(bits)[~nan], want.view(bits)[~nan])


def test_first_access_reads_every_tensor_on_torchs_threads(tmp_path):
    """The first access reads all kept tensors, split by tensor across torch's threads: every value is safetensors'
    own read cast by torch, each read-ahead tensor is given out once (a second access reads the file again into
    memory of its own), and torch's thread count is what it was."""
    from sdxl_controlnet_img2img.pipeline.local.models import lazy_checkpoint

    g = torch.Generator().manual_seed(2)
    tensors = {f"t{i}": torch.randn(lazy_checkpoint._CHUNK // 3 + i, generator=g).half() for i in range(9)}
    tensors["skipped"] = torch.ones(3).half()
    path = tmp_path / "many.safetensors"
    save_file(tensors, str(path))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        lazy = LazyCheckpoint(read_safetensors_index(path, "x"), torch.bfloat16, keep=lambda k: k != "skipped")
        first = lazy["t4"]
        assert set(lazy._ahead) == {f"t{i}" for i in range(9)} - {"t4"}  # read ahead, the one asked for given out
        got = {k: lazy[k] for k in sorted(lazy)}
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert lazy._ahead == {}
    for key, value in got.items():
        assert torch.equal(value, tensors[key].to(torch.bfloat16)), key
    again = lazy["t4"]
    assert torch.equal(again, first) and again.untyped_storage().data_ptr() != first.untyped_storage().data_ptr()


# ---------------------------------------------------------------- files whose tensors are not aligned (issue 30)

@pytest.mark.parametrize("residue", [1, 2, 3, 6])
@pytest.mark.parametrize("dtype", [None, torch.float32, torch.bfloat16, torch.float16])
def test_unaligned_tensors_read_as_safetensors_reads_them(tmp_path, residue, dtype):
    """A valid file whose data starts at an odd (or 2 mod 4) offset: every tensor, read ahead on torch's threads and
    read again on its own, is what ``safetensors.torch.load_file`` reads from that file, cast by torch (fp32, fp16
    and bf16 stored, long enough to be cast in steps, and the types that are never cast)."""
    from padded_safetensors import write_padded

    from sdxl_controlnet_img2img.pipeline.local.models import lazy_checkpoint

    g = torch.Generator().manual_seed(3)
    n = lazy_checkpoint._CHUNK + 777
    tensors = {"f32": torch.randn(n, generator=g), "f16": torch.randn(n, generator=g).half(),
               "bf16": torch.randn(n // 3, 3, generator=g).bfloat16(), "small": torch.randn(5, generator=g),
               "ids": torch.arange(7), "flags": torch.tensor([True, False, True]), "odd": torch.ones(3, dtype=torch.int8)}
    path = write_padded(tmp_path / "unaligned.safetensors", tensors, residue)
    expected = load_file(str(path))
    lazy = LazyCheckpoint(read_safetensors_index(path, "x"), dtype)
    for _ in ("read ahead", "read again"):
        for key, ref in expected.items():
            want = ref.to(dtype) if dtype is not None and ref.is_floating_point() else ref
            got = lazy[key]
            assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want), key


class _ThreadProbe(dict):
    """An index's shapes that, when a read worker first looks one up, note the worker's torch thread count and run a
    second read in a thread started then (a second load overlapping the first), noting that thread's count after it."""

    def __init__(self, shapes, second):
        super().__init__(shapes)
        self.second, self.seen, self._lock = second, {}, threading.Lock()

    def __getitem__(self, key):
        with self._lock:
            if not self.seen and threading.current_thread().name.startswith("sdxlcn-read"):
                self.seen["worker"] = torch.get_num_threads()
                thread = threading.Thread(target=self._second_load)
                thread.start()
                thread.join()
        return super().__getitem__(key)

    def _second_load(self):
        lazy = LazyCheckpoint(read_safetensors_index(self.second, "second"), torch.bfloat16)
        self.seen["second values"] = {k: lazy[k] for k in lazy}
        self.seen["second thread"] = torch.get_num_threads()


def test_the_read_pools_thread_setting_stays_in_its_workers(tmp_path):
    """The first access reads on a pool whose workers run on one thread each; the calling thread, and a thread that
    starts a second load while the first is reading, keep torch's thread count (torch.set_num_threads in the caller
    was also the count every thread started meanwhile began with: the second load ran, and stayed, on one thread)."""
    g = torch.Generator().manual_seed(4)
    files = {}
    for name in ("first", "second"):
        files[name] = {f"t{i}": torch.randn(5000 + i, generator=g).half() for i in range(6)}
        save_file(files[name], str(tmp_path / f"{name}.safetensors"))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        index = read_safetensors_index(tmp_path / "first.safetensors", "first")
        index.shapes = probe = _ThreadProbe(index.shapes, tmp_path / "second.safetensors")
        got = {k: v for k, v in LazyCheckpoint(index, torch.bfloat16).items()}
        assert torch.get_num_threads() == 2  # the caller's
        later = []
        thread = threading.Thread(target=lambda: later.append(torch.get_num_threads()))
        thread.start()
        thread.join()
    finally:
        torch.set_num_threads(before)
    counts = {k: v for k, v in probe.seen.items() if k != "second values"}
    assert counts["worker"] == 1 and counts["second thread"] == 2 and later == [2], (counts, later)
    for name, values in (("first", got), ("second", probe.seen["second values"])):
        assert values.keys() == files[name].keys()
        assert all(torch.equal(values[k], files[name][k].to(torch.bfloat16)) for k in values), name


@pytest.mark.parametrize("change", ["replaced", "rewritten longer", "rewritten same size"])
def test_a_file_changed_after_its_header_was_read_is_refused(tmp_path, change):
    """Offsets read from one file's header are never used on another: a file replaced (another inode) or rewritten
    in place (another size, or the same size and a later modification time) between reading its header and mapping
    it is refused, naming the file; read afresh, the new file loads."""
    import os

    from sdxl_controlnet_img2img.pipeline.errors import ModelLoadError

    path = tmp_path / "model.safetensors"
    save_file({"a": torch.zeros(16), "b": torch.ones(48)}, str(path))
    index = read_safetensors_index(path, "checkpoint")
    new = tmp_path / "new.safetensors"
    if change == "rewritten longer":
        save_file({"a": torch.full((64,), 2.0), "b": torch.full((16,), 3.0)}, str(new))
    else:  # the same size, "a" and "b" where the other was
        save_file({"a": torch.full((48,), 2.0), "b": torch.full((16,), 3.0)}, str(new))
        assert new.stat().st_size == path.stat().st_size
    if change == "replaced":
        os.replace(new, path)
    else:
        path.write_bytes(new.read_bytes())
        if change == "rewritten same size":  # the clock a write stamps ticks coarsely: a rewrite a tick later
            stamp = index.identity[3] + 10**9
            os.utime(path, ns=(stamp, stamp))
    with pytest.raises(ModelLoadError, match="checkpoint: .*model.safetensors changed on disk after its header"):
        LazyCheckpoint(index, None)["a"]
    fresh = LazyCheckpoint(read_safetensors_index(path, "checkpoint"), None)
    assert torch.equal(fresh["a"], load_file(str(path))["a"])
