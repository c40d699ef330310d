"""The local-only controls: a scheduler choice and when the ControlNet acts. Their defaults give today's picture,
pixel for pixel; fal (and the fallback) refuse non-default values instead of dropping them."""

from __future__ import annotations

import numpy as np
import pytest

from sdxl_controlnet_img2img.pipeline.errors import RequestError
from sdxl_controlnet_img2img.pipeline.local.generate import generate
from sdxl_controlnet_img2img.pipeline.local.schedulers import SCHEDULER_RECIPES
from sdxl_controlnet_img2img.pipeline.request import DEFAULT_SCHEDULER, SCHEDULERS, GenerationRequest


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from pictures import make_test_image

    d = tmp_path_factory.mktemp("sampler-inputs")
    make_test_image(64, 64, 1).save(d / "init.png")
    make_test_image(64, 64, 2).save(d / "control.png")
    return d


def _run(pipe, files, **fields):
    req = GenerationRequest.from_dict({"prompt": "a castle", "image_url": str(files / "init.png"),
                                       "control_image_url": str(files / "control.png"), "seed": 11,
                                       "num_inference_steps": 6, "strength": 0.9, **fields})
    return np.asarray(generate(pipe, req).images[0], dtype=np.int16)


def test_every_scheduler_runs_and_changes_the_picture_and_default_comes_back(tiny_pipe, files):
    assert set(SCHEDULERS) == {DEFAULT_SCHEDULER, *SCHEDULER_RECIPES}
    base = _run(tiny_pipe, files)
    for name in SCHEDULERS[1:]:
        other = _run(tiny_pipe, files, local_scheduler=name)
        assert np.abs(other - base).mean() > 0.5, name
    assert np.array_equal(_run(tiny_pipe, files), base)  # the shared pipeline gets its own scheduler back
    assert type(tiny_pipe.scheduler).__name__ == "EulerDiscreteScheduler"


@pytest.fixture(scope="module")
def acting_controlnet_pipe(tiny_models):
    """A tiny pipeline whose ControlNet acts: a fresh ControlNet's output convs are zero (a no-op by design)."""
    import torch

    from sdxl_controlnet_img2img.pipeline.local.loading import LoadOptions, build_pipeline

    pipe = build_pipeline(tiny_models["checkpoint"], tiny_models["controlnet"], LoadOptions(device="cpu"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for conv in [*pipe.controlnet.controlnet_down_blocks, pipe.controlnet.controlnet_mid_block]:
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * 0.5)
    return pipe


def test_control_end_changes_the_picture_and_the_defaults_do_not(acting_controlnet_pipe, files):
    pipe = acting_controlnet_pipe
    base = _run(pipe, files)
    assert np.array_equal(_run(pipe, files, local_control_start=0.0, local_control_end=1.0), base)
    assert np.abs(_run(pipe, files, local_control_end=0.5) - base).mean() > 0.5
    assert np.abs(_run(pipe, files, local_control_start=0.5) - base).mean() > 0.5


def test_bad_values_are_refused_naming_the_field():
    base = {"prompt": "x", "image_url": "a.png", "control_image_url": "b.png"}
    with pytest.raises(RequestError, match=r"local_control_start: 0.8 is after local_control_end 0.3"):
        GenerationRequest.from_dict({**base, "local_control_start": 0.8, "local_control_end": 0.3})
    with pytest.raises(RequestError, match=r"local_scheduler: 'karras' is not one of default, euler_ancestral"):
        GenerationRequest.from_dict({**base, "local_scheduler": "karras"})
    with pytest.raises(RequestError, match=r"local_control_end: must be in \[0.0, 1.0\]"):
        GenerationRequest.from_dict({**base, "local_control_end": 1.5})


@pytest.mark.parametrize("field, value", [("local_scheduler", "ddim"), ("local_control_end", 0.5),
                                          ("apply_canny", False)])
def test_fal_refuses_what_it_cannot_honour(field, value):
    from sdxl_controlnet_img2img.pipeline.fal.errors import FalValidationError
    from sdxl_controlnet_img2img.pipeline.fal.files import fal_arguments

    req = GenerationRequest.from_dict({"prompt": "x", "image_url": "a.png", "control_image_url": "b.png",
                                       field: value})
    with pytest.raises(FalValidationError, match=rf"{field}: .*local-only"):
        fal_arguments(req)
    assert "local_scheduler" not in fal_arguments(GenerationRequest.from_dict(
        {"prompt": "x", "image_url": "a.png", "control_image_url": "b.png"}))


def test_the_sampler_node_takes_them_as_optional_inputs_after_the_older_ones(tiny_pipe):
    from sdxl_controlnet_img2img import NODE_CLASS_MAPPINGS

    optional = NODE_CLASS_MAPPINGS["SDXLCNImg2Img"].INPUT_TYPES()["optional"]
    assert list(optional) == ["fallback", "scheduler", "control_start", "control_end"]
    assert optional["scheduler"][1]["default"] == "default" and optional["control_end"][1]["default"] == 1.0
