"""``LazyCheckpoint``: a safetensors file read one tensor at a time, cast on reading, equals what safetensors
itself reads cast by torch, for every cast the loader makes (the same width in place, widening and narrowing),
and leaves integer tensors alone."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from safetensors.torch import load_file, save_file

from sdxl_controlnet_img2img.pipeline.local.lazy_checkpoint import LazyCheckpoint
from sdxl_controlnet_img2img.pipeline.local.model_checks import read_safetensors_index


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
    from sdxl_controlnet_img2img.pipeline.local import lazy_checkpoint

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
    from sdxl_controlnet_img2img.pipeline.local import lazy_checkpoint

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
