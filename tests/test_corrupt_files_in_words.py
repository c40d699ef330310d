"""A model or LoRA file that is not what its name says is reported in the user's words: what the file is (a web page,
a Git LFS pointer, a cut-off download, damaged bytes) and what to do, never the library's words ("header too large",
"Error while deserializing header") or the garbage number its first bytes make ("claims 2338328219631577204 bytes").
Each file is written here byte by byte, and safetensors' own reader refuses every one of them."""

from __future__ import annotations

import json
import re
import struct

import pytest
import safetensors

from sdxl_controlnet_img2img.pipeline.cli import main
from sdxl_controlnet_img2img.pipeline.local.lora.adapters import LoraError, check_lora_file

FILES = {
    # what a browser saves from a Hugging Face /blob/ page
    "web page": (b"<!DOCTYPE html>\n<html><head><title>pixel-art-xl.safetensors</title></head><body></body></html>\n",
                 "it is a web page (HTML), not the model"),
    # what `git clone` without Git LFS leaves in place of the weights
    "lfs pointer": (b"version https://git-lfs.github.com/spec/v1\noid sha256:" + b"0" * 64 + b"\nsize 6938040682\n",
                    "it is a Git LFS pointer"),
    "damaged": (bytes(range(256)) * 8, "its first bytes are not the start of one"),
    "cut off": (struct.pack("<Q", 5000) + b'{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}',
                "its header alone would need 4.9 KB but the whole file is 68 B, so it was cut off"),  # 5008 B = 4.9 KB
    "bad header": (struct.pack("<Q", 10) + b"{not json}", "the list of its tensors at the start of the file is not "
                                                          "readable text"),
}
LIBRARY_WORDS = ("header too large", "HeaderTooLarge", "deserializ", "claims", "Expecting", "char ", "line 1 column")


def _write(tmp_path, kind):
    data, _words = FILES[kind]
    path = tmp_path / f"{kind.replace(' ', '_')}.safetensors"
    path.write_bytes(data)
    with pytest.raises(Exception):  # safetensors' own reader refuses it  # noqa: B017
        with safetensors.safe_open(str(path), framework="pt") as f:
            list(f.keys())
    return path


def _in_words(message, path, words):
    assert path.name in message and words in message, message
    assert not any(w in message for w in LIBRARY_WORDS), message
    assert not re.search(r"\d{10,}", message.replace(str(path), "")), message  # no byte count made of garbage


@pytest.mark.parametrize("kind", list(FILES))
def test_a_bad_lora_file_is_said_in_words(tmp_path, kind):
    path = _write(tmp_path, kind)
    with pytest.raises(LoraError) as err:
        check_lora_file(path, path.name)
    _in_words(str(err.value), path, FILES[kind][1])


@pytest.mark.parametrize("kind", list(FILES))
def test_a_bad_checkpoint_file_is_said_in_words(tmp_path, tiny_models, image_files, capsys, kind):
    path = _write(tmp_path, kind)
    req = tmp_path / "req.json"
    req.write_text(json.dumps({"prompt": "a cat", "image_url": str(image_files(64, 64, 1)),
                               "control_image_url": str(image_files(64, 64, 2))}))
    rc = main(["generate", "--request", str(req), "--checkpoint", str(path), "--controlnet",
               str(tiny_models["controlnet"]), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    _in_words(err, path, FILES[kind][1])
