"""Valid safetensors files whose tensors are not aligned, written by hand.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON, then the data; the header's
``data_offsets`` count from the data's start, so with ``8 + N`` not a multiple of 4 every fp32 tensor sits at an
address that is not a multiple of 4 (and with it odd, every 16-bit one too). The format lets the JSON end in spaces;
safetensors' own writer pads it to 8 bytes, others need not. Each file written here is read back with
``safetensors.torch.load_file`` (the outside truth: such files are valid) before a test uses it.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch
from safetensors.torch import load_file, save


def _split(raw: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def pad_header(raw: bytes, residue: int) -> bytes:
    """``raw`` (a safetensors file's bytes) with its JSON header padded by spaces so that the data starts at a file
    offset of ``residue`` modulo 8."""
    header, data = _split(raw)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * ((residue - 8 - len(head)) % 8)
    return struct.pack("<Q", len(head)) + head + data


def data_start(path) -> int:
    """The file offset of a safetensors file's first data byte."""
    with open(path, "rb") as f:
        return 8 + struct.unpack("<Q", f.read(8))[0]


def write_padded(path, tensors: dict, residue: int = 1, metadata: dict | None = None) -> Path:
    """``tensors`` saved at ``path`` with the data starting at ``residue`` modulo 8; checked to read back equal
    through safetensors itself and to hold at least one tensor not aligned to its element size."""
    path, raw = Path(path), pad_header(save(tensors, metadata=metadata), residue)
    part = path.with_name(path.name + ".part")  # a new file: tensors read from ``path`` may still map its pages
    part.write_bytes(raw)
    os.replace(part, path)
    back = load_file(str(path))
    assert back.keys() == tensors.keys(), path
    differ = [k for k in tensors if not torch.equal(back[k], tensors[k])]
    assert not differ, f"{path}: safetensors reads other values for {differ[:5]}"
    header, _ = _split(path.read_bytes())
    sizes = {k: tensors[k].element_size() for k in tensors}
    assert any((data_start(path) + v["data_offsets"][0]) % sizes[k] for k, v in header.items()
               if k != "__metadata__" and sizes[k] > 1 and tensors[k].numel()), f"{path}: every tensor is aligned"
    return path


def repad(path, residue: int = 1, dtype=None) -> Path:
    """Rewrite the safetensors file ``path`` in place with its data at ``residue`` modulo 8, its floating tensors
    stored in ``dtype`` (None: as they are), its metadata kept."""
    path = Path(path)
    header, _ = _split(path.read_bytes())
    tensors = load_file(str(path))
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    return write_padded(path, tensors, residue, header.get("__metadata__"))
