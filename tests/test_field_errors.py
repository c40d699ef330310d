"""Every error that names an input is a FieldError carrying the input as ``.field`` and what is wrong as ``.detail``
(issue 32 item 5): callers read them instead of taking the message apart, and the messages read as before."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from sdxl_controlnet_img2img.pipeline.errors import FieldError, ImageInputError, RequestError
from sdxl_controlnet_img2img.pipeline.fal.client import check_request_id
from sdxl_controlnet_img2img.pipeline.fal.errors import FalError, FalValidationError
from sdxl_controlnet_img2img.pipeline.images import decode_image
from sdxl_controlnet_img2img.pipeline.local.lora_sources import LoraError, resolve_source
from sdxl_controlnet_img2img.pipeline.local.model_hooks import MissingModelError, find_safety_checker
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
