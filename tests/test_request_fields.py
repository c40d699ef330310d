"""The request's one field table, against fal's published input schema of
``fal-ai/fast-sdxl-controlnet-canny/image-to-image`` (https://fal.ai/models/fal-ai/fast-sdxl-controlnet-canny/llms.txt
and the endpoint's API page): what the user meets in each place built from it (the node widgets, the CLI help, the
validation, the arguments sent to fal) says fal's defaults and ranges."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sdxl_controlnet_img2img.nodes.sampler import SDXLCNImg2Img
from sdxl_controlnet_img2img.nodes.fal_node import SDXLCNFalImg2Img
from sdxl_controlnet_img2img.pipeline.errors import RequestError
from sdxl_controlnet_img2img.pipeline.request import FIELDS, GenerationRequest

# fal's schema, copied from its docs page (the outside truth): name -> (default, low, high)
FAL_NUMBERS = {
    "controlnet_conditioning_scale": (0.5, 0.0, 1.0),
    "num_inference_steps": (25, 1, 50),
    "guidance_scale": (7.5, 0.0, 20.0),
    "strength": (0.95, 0.0, 1.0),  # fal: (0, 1]
    "num_images": (1, 1, 8),
}
FAL_FIELDS = {"prompt", "image_url", "control_image_url", "negative_prompt", "controlnet_conditioning_scale",
              "image_size", "num_inference_steps", "guidance_scale", "strength", "seed", "num_images", "loras",
              "enable_safety_checker", "expand_prompt", "sync_mode"}
BASE = {"prompt": "a cat", "image_url": "a.png", "control_image_url": "b.png"}


def test_the_request_class_holds_exactly_the_tables_fields_in_order():
    assert [f.name for f in dataclasses.fields(GenerationRequest)] == [f.name for f in FIELDS]


def test_fal_receives_exactly_fals_fields():
    args = GenerationRequest.from_dict({**BASE, "seed": 3, "image_size": "square", "apply_canny": False,
                                        "local_scheduler": "ddim"}).to_fal_arguments()
    assert set(args) == FAL_FIELDS
    # absent seed and image_size stay absent, as fal's schema leaves them optional
    assert not {"seed", "image_size"} & set(GenerationRequest.from_dict(BASE).to_fal_arguments())


@pytest.mark.parametrize("node", [SDXLCNImg2Img, SDXLCNFalImg2Img])
def test_node_widgets_show_fals_defaults_and_ranges(node):
    required = node.INPUT_TYPES()["required"]
    for name, (default, low, high) in FAL_NUMBERS.items():
        opts = required[name][1]
        assert opts["default"] == default, name
        assert opts["max"] == high, name
        assert opts["min"] == (0.01 if name == "strength" else low), name  # strength 0 runs no step
    assert required["enable_safety_checker"][1]["default"] is False  # opt-in on fal
    assert required["expand_prompt"][1]["default"] is False


@pytest.mark.parametrize("name", list(FAL_NUMBERS))
def test_validation_takes_fals_range_and_refuses_past_it(name):
    default, low, high = FAL_NUMBERS[name]
    GenerationRequest.from_dict({**BASE, name: high})
    if name != "strength":
        GenerationRequest.from_dict({**BASE, name: low, **({"strength": 1.0} if name == "num_inference_steps" else {})})
    for bad in (high + 1, low - 1) if isinstance(high, int) else (high + 0.5, low - 0.5):
        with pytest.raises(RequestError) as err:
            GenerationRequest.from_dict({**BASE, name: bad})
        assert err.value.args and name in str(err.value)
    assert getattr(GenerationRequest.from_dict(BASE), name) == default


def test_generate_help_lists_every_field_with_fals_defaults(tmp_path):
    tests = Path(__file__).resolve().parent
    out = subprocess.run([sys.executable, "-c", "from sdxl_controlnet_img2img.pipeline.cli import main; main()",
                          "generate", "--help"], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(tests), "COLUMNS": "200"}, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    lines = {line.split(":")[0].strip().split(" ")[0]: line for line in out.stdout.splitlines() if ": " in line}
    for name in FAL_FIELDS:
        assert name in lines, name
    for name, (default, low, high) in FAL_NUMBERS.items():
        assert f"default {default}" in lines[name] and f"{high:g}]" in lines[name], lines[name]
    assert "required" in lines["prompt"] and "(local only)" in lines["apply_canny"]
