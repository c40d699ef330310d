"""The header check refuses what safetensors refuses, and reads what it reads.

Each file is written here byte by byte; ``safetensors.torch.load_file`` (the outside truth) decides whether it is a
valid file. A file it refuses is refused by the pack too, naming the file, before anything is read: offsets that
are negative (the tensor read from the header's own bytes), tensors that overlap, gaps between tensors, bytes after
the last tensor, numbers that are not whole numbers, metadata that is not strings. A file it reads, however its
header is ordered, is read by the pack with the same values.
"""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import load_file

from sdxl_controlnet_img2img.pipeline.errors import ModelLoadError
from sdxl_controlnet_img2img.pipeline.local.models.lazy_checkpoint import LazyCheckpoint
from sdxl_controlnet_img2img.pipeline.local.models.loading import LoadOptions, check_sources
from sdxl_controlnet_img2img.pipeline.local.models.checks import read_safetensors_index

ONE, TWO, THREE = (struct.pack("<f", x) for x in (1.0, 2.0, 3.0))


def f32(shape, begin, end):
    return {"dtype": "F32", "shape": shape, "data_offsets": [begin, end]}


def _write(path, header: dict, data: bytes):
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    path.write_bytes(struct.pack("<Q", len(head)) + head + data)
    return path


REFUSED = {
    "negative offset": ({"a": f32([2], -8, 0), "b": f32([1], 0, 4)}, ONE, "bad entry for 'a'"),
    "same bytes twice": ({"a": f32([1], 0, 4), "b": f32([1], 0, 4)}, ONE, "without gaps or overlaps"),
    "overlapping": ({"a": f32([2], 0, 8), "b": f32([1], 4, 8)}, ONE + TWO, "without gaps or overlaps"),
    "gap before the first": ({"a": f32([1], 4, 8)}, ONE + TWO, "'a' starts at data byte 4, but the tensors before "
                                                             "it end at 0"),
    "gap between": ({"a": f32([1], 0, 4), "b": f32([1], 8, 12)}, ONE + TWO + THREE, "'b' starts at data byte 8"),
    "bytes after the last": ({"a": f32([1], 0, 4)}, ONE + TWO, "4 bytes after its last tensor"),
    "fractional shape": ({"a": f32([1.0], 0, 4)}, ONE, "bad entry for 'a'"),
    "boolean offset": ({"a": f32([1], False, 4)}, ONE, "bad entry for 'a'"),
    "three offsets": ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4, 4]}}, ONE, "bad entry for 'a'"),
    "metadata not strings": ({"__metadata__": {"format": 1}, "a": f32([1], 0, 4)}, ONE, "__metadata__"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_what_safetensors_refuses_is_refused_naming_the_file(tmp_path, case, tiny_models):
    header, data, words = REFUSED[case]
    path = _write(tmp_path / "odd.safetensors", header, data)
    with pytest.raises(Exception) as truth:  # noqa: B017 - whatever safetensors raises: it refuses the file
        load_file(str(path))
    assert "safetensor" in type(truth.value).__name__.lower(), truth.value
    with pytest.raises(ModelLoadError) as err:
        read_safetensors_index(path, "controlnet")
    msg = str(err.value)
    assert msg.startswith(f"controlnet: {path} ") and words in msg, msg
    with pytest.raises(ModelLoadError, match="^controlnet: " + str(path)):
        check_sources(tiny_models["checkpoint"], path, LoadOptions(device="cpu", dtype="fp32"))


READ = {
    "header out of offset order": ({"b": f32([1], 4, 8), "a": f32([1], 0, 4)}, ONE + TWO),
    "empty tensors between and at one offset": (
        {"a": f32([1], 0, 4), "e1": f32([0], 4, 4), "e2": f32([2, 0], 4, 4), "b": f32([2], 4, 12)},
        ONE + TWO + THREE),
    "metadata null": ({"__metadata__": None, "a": f32([1], 0, 4)}, ONE),
}


@pytest.mark.parametrize("case", list(READ))
def test_what_safetensors_reads_is_read_with_its_values(tmp_path, case):
    header, data = READ[case]
    path = _write(tmp_path / "fine.safetensors", header, data)
    want = load_file(str(path))
    idx = read_safetensors_index(path, "checkpoint")
    got = LazyCheckpoint(idx)
    assert set(got.keys()) == set(want)
    for k, v in want.items():
        value = got[k]
        assert value.dtype == v.dtype and value.shape == v.shape and torch.equal(value, v), k
