"""Every error that names an input is a FieldError carrying the input as ``.field`` and what is wrong as ``.detail``
(issue 32 item 5): callers read them instead of taking the message apart, and the messages read as before."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from sdxl_controlnet_img2img.pipeline.errors import (
    FieldError,
    ImageInputError,
    ModelInputError,
    ModelLoadError,
    RequestError,
)
from sdxl_controlnet_img2img.pipeline.fal.client import check_request_id
from sdxl_controlnet_img2img.pipeline.fal.errors import FalError, FalValidationError
from sdxl_controlnet_img2img.pipeline.images import decode_image
from sdxl_controlnet_img2img.pipeline.local.models import pickles
from sdxl_controlnet_img2img.pipeline.local.memory.devices import check_device, parse_dtype
from sdxl_controlnet_img2img.pipeline.local.models.loading import LoadOptions
from sdxl_controlnet_img2img.pipeline.local.lora.adapters import check_lora_file
from sdxl_controlnet_img2img.pipeline.local.lora.sources import LoraError, resolve_source
from sdxl_controlnet_img2img.pipeline.local.request_models.locate import MissingModelError, find_safety_checker
from sdxl_controlnet_img2img.pipeline.local.models.checks import read_safetensors_index
from sdxl_controlnet_img2img.pipeline.request import GenerationRequest

ROOT = Path(__file__).resolve().parent.parent


def _raised(call):
    with pytest.raises(FieldError) as info:
        call()
    return info.value


def test_each_field_error_names_its_input_and_says_what_is_wrong(tmp_path, image_files):
    img = str(image_files(64, 64, 1))
    cases = [
        (RequestError, "strength", lambda: GenerationRequest.from_dict(
            {"prompt": "a cat", "image_url": img, "control_image_url": img, "strength": 3})),
        (ImageInputError, "image_url", lambda: decode_image("image_url", b"not an image", "the file")),
        (FalValidationError, "request_id", lambda: check_request_id("")),
        (MissingModelError, "enable_safety_checker", lambda: find_safety_checker([tmp_path])),
    ]
    for cls, field, call in cases:
        exc = _raised(call)
        assert type(exc) is cls and exc.field == field, (cls, exc)
        assert exc.detail and str(exc) == f"{field}: {exc.detail}", (cls, str(exc))
    assert _raised(lambda: check_request_id("")).detail == "is empty; give the id of a submitted fal request"


def test_a_lora_error_names_the_lora_and_points_at_loras():
    exc = _raised(lambda: resolve_source("no-such-lora.safetensors", []))
    assert isinstance(exc, LoraError) and exc.field == "loras" and exc.lora == "no-such-lora.safetensors"
    assert str(exc) == f"LoRA 'no-such-lora.safetensors': {exc.detail}"


def test_fal_validation_keeps_the_request_id_and_its_kinds():
    exc = FalValidationError("loras[0].path", "fal rejected this value: not a URL", "rid-1")
    assert isinstance(exc, FalError) and isinstance(exc, ValueError) and exc.request_id == "rid-1"
    assert (exc.field, exc.detail, str(exc)) == ("loras[0].path", "fal rejected this value: not a URL",
                                                 "loras[0].path: fal rejected this value: not a URL")
    assert FalValidationError("prompt", "is empty").request_id is None


def test_model_options_and_files_name_their_input(tmp_path):
    web_page = tmp_path / "model.safetensors"
    web_page.write_bytes(b"<!doctype html><html><body>Sign in to download</body></html>")
    cases = [
        ("device", lambda: check_device("banana"), "'banana' is not a device name; use auto, cuda, cuda:N, xpu, mps "
                                                    "or cpu"),
        ("dtype", lambda: parse_dtype("fp8"), "'fp8' is not one of auto, fp16, bf16, fp32"),
        ("memory_mode", lambda: LoadOptions(device="cpu", memory_mode="lots").resolved(),
         "'lots' is not one of auto, none, model_cpu_offload, sequential_cpu_offload"),
        ("memory_mode", lambda: LoadOptions(device="cpu", memory_mode="model_cpu_offload").resolved(),
         "model_cpu_offload moves weights between the CPU and a GPU, but the device is 'cpu'. Use memory_mode none "
         "on the CPU."),
        ("checkpoint", lambda: read_safetensors_index(web_page, "checkpoint"), None),
    ]
    for field, call, detail in cases:
        exc = _raised(call)
        assert isinstance(exc, ModelInputError) and isinstance(exc, ModelLoadError) and exc.field == field
        assert str(exc) == f"{field}: {exc.detail}" and (detail is None or exc.detail == detail), str(exc)
    assert str(web_page) in _raised(lambda: read_safetensors_index(web_page, "checkpoint")).detail


def test_a_lora_error_says_what_the_file_check_said_without_its_label(tmp_path, monkeypatch):
    web_page = tmp_path / "style.safetensors"
    web_page.write_bytes(b"<!doctype html><html><body>Sign in to download</body></html>")
    inner = _raised(lambda: read_safetensors_index(web_page, "LoRA"))
    exc = _raised(lambda: check_lora_file(web_page, "style"))
    assert isinstance(exc, LoraError) and str(exc) == f"LoRA 'style': {inner.detail}"

    pickle = tmp_path / "style.pt"
    pickle.write_bytes(b"not read")
    monkeypatch.setattr(pickles, "torch_version", lambda: (2, 5))  # a torch whose weights_only loader is unsafe
    refusal = _raised(lambda: pickles.refuse_unsafe_torch("style"))
    assert isinstance(refusal, ValueError) and refusal.field == "style"
    assert refusal.detail.startswith("pickle files are refused on torch 2.5: its weights_only loader is not safe")
    exc = _raised(lambda: check_lora_file(pickle, "style", allow_pickle=True))
    assert str(exc) == f"LoRA 'style': {refusal.detail}"


def test_no_other_class_copies_the_field_error_init():
    """Only FieldError sets ``self.field``: a new error naming an input derives from it."""
    found = []
    for path in sorted((ROOT / "pipeline").rglob("*.py")) + sorted((ROOT / "nodes").rglob("*.py")):
        for cls in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(cls, ast.ClassDef) or cls.name == "FieldError":
                continue
            for node in ast.walk(cls):
                if (isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) and node.attr == "field"
                        and isinstance(node.value, ast.Name) and node.value.id == "self"):
                    found.append(f"{path.relative_to(ROOT)}:{cls.name}")
    assert found == []
