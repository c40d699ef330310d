"""The node classes called as ComfyUI calls them, without ComfyUI."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from sdxl_controlnet_img2img import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, WEB_DIRECTORY
from sdxl_controlnet_img2img.pipeline.local.generate import generate
from sdxl_controlnet_img2img.pipeline.handle import PipelineHandle
from sdxl_controlnet_img2img.pipeline.request import GenerationRequest

from .conftest import make_test_image


def _image_batch(*pils):
    return torch.from_numpy(np.stack([np.asarray(p, dtype=np.float32) / 255.0 for p in pils]))


def _call(node_cls, **kwargs):
    """Call a node the way ComfyUI's executor does: instantiate, call FUNCTION, unwrap {'ui','result'}."""
    out = getattr(node_cls(), node_cls.FUNCTION)(**kwargs)
    if isinstance(out, dict):
        out = out["result"]
    assert isinstance(out, tuple) and len(out) == len(node_cls.RETURN_TYPES)
    return out


def _widget_defaults(node_cls):
    spec = node_cls.INPUT_TYPES()
    values = {}
    for section in ("required", "optional"):
        for name, (typ, *opts) in spec.get(section, {}).items():
            opts = opts[0] if opts else {}
            if isinstance(typ, list):
                values[name] = opts.get("default", typ[0] if typ else None)
            elif "default" in opts:
                values[name] = opts["default"]
    return values


def test_public_node_contract():
    expected = {
        "SDXLCNLoader": "Load SDXL ControlNet Pipeline",
        "SDXLCNCanny": "Canny Edges (OpenCV)",
        "SDXLCNImg2Img": "SDXL ControlNet Img2Img",
        "SDXLCNLoraLoader": "SDXL ControlNet LoRA",
        "SDXLCNFalImg2Img": "SDXL ControlNet Img2Img (fal)",
    }
    assert set(NODE_CLASS_MAPPINGS) == set(expected)
    for name, display in expected.items():
        assert NODE_DISPLAY_NAME_MAPPINGS[name] == display
        cls = NODE_CLASS_MAPPINGS[name]
        assert callable(getattr(cls, cls.FUNCTION)) and cls.CATEGORY.startswith("SDXL ControlNet")
        for section_name, section in cls.INPUT_TYPES().items():
            if section_name == "hidden":
                continue
            for input_name, (typ, *opts) in section.items():
                assert opts and opts[0].get("tooltip"), f"{name}.{input_name} has no tooltip"
    assert WEB_DIRECTORY == "./web"


def test_sampler_widgets_use_fals_names_and_defaults():
    d = _widget_defaults(NODE_CLASS_MAPPINGS["SDXLCNImg2Img"])
    assert d["controlnet_conditioning_scale"] == 0.5 and d["num_inference_steps"] == 25
    assert d["guidance_scale"] == 7.5 and d["strength"] == 0.95 and d["num_images"] == 1
    assert d["negative_prompt"] == "" and d["image_size"] == "none" and d["apply_canny"] is True
    choices = NODE_CLASS_MAPPINGS["SDXLCNImg2Img"].INPUT_TYPES()["required"]["image_size"][0]
    assert choices == ["none", "square_hd", "square", "portrait_4_3", "portrait_16_9", "landscape_4_3",
                       "landscape_16_9", "custom"]


def test_canny_node_equals_cv2_canny():
    import cv2

    pil = make_test_image(96, 64, seed=3)
    # round-trip through 8-bit, as LoadImage produces it
    batch = _image_batch(pil, make_test_image(96, 64, seed=4))
    (edges,) = _call(NODE_CLASS_MAPPINGS["SDXLCNCanny"], image=batch, low_threshold=100, high_threshold=200)
    assert edges.shape == (2, 64, 96, 3) and edges.dtype == torch.float32
    assert set(torch.unique(edges).tolist()) <= {0.0, 1.0}
    expected = cv2.Canny(np.asarray(pil), 100, 200)
    assert np.array_equal((edges[0, :, :, 0].numpy() * 255).astype(np.uint8), expected)
    assert np.array_equal(edges[0, :, :, 0], edges[0, :, :, 2])
    (l2,) = _call(NODE_CLASS_MAPPINGS["SDXLCNCanny"], image=batch, low_threshold=50, high_threshold=120, l2_gradient=True)
    assert np.array_equal((l2[0, :, :, 0].numpy() * 255).astype(np.uint8), cv2.Canny(np.asarray(pil), 50, 120, L2gradient=True))


def test_canny_node_resolution_and_threshold_errors():
    cls = NODE_CLASS_MAPPINGS["SDXLCNCanny"]
    batch = _image_batch(make_test_image(96, 64, seed=5))
    (edges,) = _call(cls, image=batch, low_threshold=100, high_threshold=200, resolution=128)
    assert edges.shape == (1, 128, 192, 3)
    assert "low_threshold (200) is above high_threshold (100)" in cls.VALIDATE_INPUTS(low_threshold=200, high_threshold=100)
    with pytest.raises(ValueError, match="low_threshold"):
        _call(cls, image=batch, low_threshold=200, high_threshold=100)


def _sampler_args(handle, image, control, **kw):
    args = _widget_defaults(NODE_CLASS_MAPPINGS["SDXLCNImg2Img"])
    args.update(pipeline=handle, image=image, control_image=control, prompt="ice fortress",
                enable_safety_checker=False, num_inference_steps=4, seed=11)
    args.update(kw)
    return args


def test_sampler_node_equals_library(tiny_pipe):
    init, ctl = make_test_image(64, 64, 1), make_test_image(64, 64, 2)
    handle = PipelineHandle(tiny_pipe)
    images, seed, flags, prompt = _call(NODE_CLASS_MAPPINGS["SDXLCNImg2Img"],
                                        **_sampler_args(handle, _image_batch(init), _image_batch(ctl)))
    assert images.shape == (1, 64, 64, 3) and seed == 11 and json.loads(flags) == [False]
    assert prompt == "ice fortress"
    lib = generate(tiny_pipe, GenerationRequest.from_dict({
        "prompt": "ice fortress", "image_url": init, "control_image_url": ctl, "seed": 11,
        "num_inference_steps": 4, "enable_safety_checker": False}))
    assert np.array_equal(np.round(images[0].numpy() * 255).astype(np.uint8), np.asarray(lib.images[0]))


def test_sampler_batch_gives_b_times_num_images_with_distinct_seeds(tiny_pipe):
    inits = _image_batch(make_test_image(64, 64, 1), make_test_image(64, 64, 3))
    ctl = _image_batch(make_test_image(64, 64, 2))
    handle = PipelineHandle(tiny_pipe)
    images, seed, flags, _ = _call(NODE_CLASS_MAPPINGS["SDXLCNImg2Img"],
                                   **_sampler_args(handle, inits, ctl, num_images=2, num_inference_steps=3, seed=20))
    assert images.shape[0] == 4 and json.loads(flags) == [False] * 4
    # result 3 = init 1, image 1 -> seed 20 + 1*2 + 1
    alone = generate(tiny_pipe, GenerationRequest.from_dict({
        "prompt": "ice fortress", "image_url": make_test_image(64, 64, 3), "control_image_url": make_test_image(64, 64, 2),
        "seed": 23, "num_inference_steps": 3, "enable_safety_checker": False}))
    assert np.array_equal(np.round(images[3].numpy() * 255).astype(np.uint8), np.asarray(alone.images[0]))


def test_sampler_errors_name_the_input(tiny_pipe):
    handle = PipelineHandle(tiny_pipe)
    inits = _image_batch(make_test_image(64, 64, 1), make_test_image(64, 64, 3), make_test_image(64, 64, 4))
    ctl = _image_batch(make_test_image(64, 64, 2), make_test_image(64, 64, 5))
    with pytest.raises(ValueError, match="control_image: a batch of 2 does not match the 3 init images"):
        _call(NODE_CLASS_MAPPINGS["SDXLCNImg2Img"], **_sampler_args(handle, inits, ctl))
    with pytest.raises(ValueError, match="^prompt: is required"):
        _call(NODE_CLASS_MAPPINGS["SDXLCNImg2Img"], **_sampler_args(handle, inits[:1], ctl[:1], prompt=" "))


def test_pack_imports_cheaply_and_without_diffusers():
    code = (
        "import sys; sys.modules['diffusers'] = None\n"
        "import sdxl_controlnet_img2img as p\n"
        "assert 'SDXLCNImg2Img' in p.NODE_CLASS_MAPPINGS\n"
        "heavy = [m for m in ('torch', 'diffusers', 'transformers', 'cv2') if sys.modules.get(m) is not None]\n"
        "print(heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
