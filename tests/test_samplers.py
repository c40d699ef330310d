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
def files(pair_files):
    return pair_files


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
        # DDIM at eta 0 is Euler's step in another parametrisation: on SDXL's scheduler config (clip_sample off) it
        # differs from the default Euler only in its last step's end point, at the same (leading) timesteps
        assert np.abs(other - base).mean() > (0.05 if name == "ddim" else 0.5), name
    assert np.array_equal(_run(tiny_pipe, files), base)  # the shared pipeline gets its own scheduler back
    assert type(tiny_pipe.scheduler).__name__ == "EulerDiscreteScheduler"


@pytest.fixture(scope="module")
def acting_controlnet_pipe(tiny_models):
    """A tiny pipeline whose ControlNet acts: a fresh ControlNet's output convs are zero (a no-op by design)."""
    import torch

    from sdxl_controlnet_img2img.pipeline.local.models.loading import LoadOptions, build_pipeline

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
    assert list(optional) == ["fallback", "scheduler", "control_start", "control_end", "timesteps"]
    assert optional["scheduler"][1]["default"] == "default" and optional["control_end"][1]["default"] == 1.0
    assert optional["timesteps"][1]["default"] == ""  # the scheduler's own timesteps, as before the input existed


# ---- few-step LoRAs' schedules (their timesteps against the cards: test_few_step_schedules.py) ---------------------

FEW_STEP = {  # name -> the scheduler and call arguments as the LoRAs' model cards build them for diffusers
    "lcm": ("LCMScheduler", {}, {}),  # LCM-LoRA
    "tcd": ("TCDScheduler", {}, {"eta": 0.3}),  # TCD-LoRA
    "euler_trailing": ("EulerDiscreteScheduler", {"timestep_spacing": "trailing"}, {}),  # SDXL-Lightning
    "ddim_trailing": ("DDIMScheduler", {"timestep_spacing": "trailing"}, {}),  # Hyper-SD 2/4/8-step
    "tcd_eta1": ("TCDScheduler", {}, {"eta": 1.0}),  # Hyper-SD 1-step
}


def _documented_pipeline_image(tiny_models, files, name, steps, strength, guidance):
    """diffusers' own StableDiffusionXLControlNetImg2ImgPipeline with ``name``'s scheduler built the documented way,
    the same inputs (our prepared images) and seed, each count of UNet calls recorded."""
    import diffusers
    import torch
    from PIL import Image

    from sdxl_controlnet_img2img.pipeline.local.generate import make_generator

    cls, config, call = FEW_STEP[name]
    cn = diffusers.ControlNetModel.from_pretrained(tiny_models["controlnet"])
    pipe = diffusers.StableDiffusionXLControlNetImg2ImgPipeline.from_pretrained(tiny_models["checkpoint"], controlnet=cn)
    pipe.scheduler = getattr(diffusers, cls).from_config(pipe.scheduler.config, **config)
    batches = []
    pipe.unet.register_forward_pre_hook(lambda _m, args: batches.append(args[0].shape[0]))
    init = Image.open(files / "init.png").convert("RGB")
    control = Image.open(files / "control.png").convert("RGB")
    from sdxl_controlnet_img2img.pipeline.canny import canny_image

    out = pipe(prompt="a castle", negative_prompt="", image=init, control_image=canny_image(control), height=64,
               width=64, strength=strength, num_inference_steps=steps, guidance_scale=guidance,
               controlnet_conditioning_scale=0.5, generator=make_generator(11), output_type="np", **call).images
    return np.asarray(pipe.numpy_to_pil(out)[0], dtype=np.int16), batches


@pytest.mark.parametrize("name", list(FEW_STEP))
def test_few_step_schedules_equal_diffusers_built_the_documented_way(tiny_pipe, tiny_models, files, name):
    """At the _fast workflow's settings (4 steps, CFG 1, strength 0.95): our image is diffusers' own pixel for pixel,
    int(4 x 0.95) = 3 steps run, each with no unconditional pass (batch 1); and it differs from the default."""
    batches = []
    hook = tiny_pipe.unet.register_forward_pre_hook(lambda _m, args: batches.append(args[0].shape[0]))
    try:
        ours = _run(tiny_pipe, files, local_scheduler=name, num_inference_steps=4, strength=0.95, guidance_scale=1.0)
        default = _run(tiny_pipe, files, num_inference_steps=4, strength=0.95, guidance_scale=1.0)
    finally:
        hook.remove()
    theirs, their_batches = _documented_pipeline_image(tiny_models, files, name, 4, 0.95, 1.0)
    assert np.array_equal(ours, theirs), np.abs(ours - theirs).max()
    assert batches[:3] == [1, 1, 1] and len(batches) == 6 and their_batches == [1, 1, 1]
    assert np.abs(ours - default).mean() > 0.5


def test_guidance_above_one_runs_the_unconditional_pass(tiny_pipe, files):
    batches = []
    hook = tiny_pipe.unet.register_forward_pre_hook(lambda _m, args: batches.append(args[0].shape[0]))
    try:
        _run(tiny_pipe, files, local_scheduler="lcm", num_inference_steps=5, strength=0.95, guidance_scale=1.5)
    finally:
        hook.remove()
    assert batches == [2, 2, 2, 2]
