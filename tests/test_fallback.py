"""The local sampler's opt-in ``fallback``: when local generation cannot run, the same requests go to fal."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent / "helpers"))
import fal_server  # noqa: E402

fal_server.configure_environment()

from fal_server import fal, fal_test_server, user_dir  # noqa: E402,F401

from sdxl_controlnet_img2img.nodes.sampler import SDXLCNImg2Img  # noqa: E402
from sdxl_controlnet_img2img.pipeline.handle import PipelineHandle  # noqa: E402
from sdxl_controlnet_img2img.pipeline.request import LoraSpec  # noqa: E402


@pytest.fixture(scope="module")
def unusable_gpu_pipe(tiny_models):
    """A real pipeline set up for model CPU offload onto CUDA, on a machine whose torch has no CUDA:
    it loads fine and fails when sampling starts, as on a box whose GPU is gone or unusable."""
    if torch.cuda.is_available():
        pytest.skip("this machine has a usable CUDA GPU")
    from diffusers import ControlNetModel, StableDiffusionXLControlNetImg2ImgPipeline

    cn = ControlNetModel.from_pretrained(tiny_models["controlnet"])
    pipe = StableDiffusionXLControlNetImg2ImgPipeline.from_pretrained(tiny_models["checkpoint"], controlnet=cn)
    pipe.enable_model_cpu_offload(device="cuda")
    return pipe


def _args(handle, **changes):
    spec = SDXLCNImg2Img.INPUT_TYPES()["required"]
    args = {k: v[1]["default"] for k, v in spec.items() if len(v) > 1 and "default" in v[1]}
    rng = np.random.default_rng(0)
    image = torch.from_numpy(rng.integers(0, 256, (2, 64, 72, 3)).astype(np.float32) / 255.0)
    args.update(pipeline=handle, image=image, control_image=image[:1], prompt="a house", seed=9,
                enable_safety_checker=False, num_inference_steps=4)
    args.update(changes)
    return args


def test_without_fallback_the_local_error_stands(unusable_gpu_pipe, fal):
    with pytest.raises(AssertionError, match="CUDA"):
        SDXLCNImg2Img().sample(**_args(PipelineHandle(unusable_gpu_pipe)))
    assert fal.jobs == {}


def test_fallback_runs_the_same_requests_on_fal(unusable_gpu_pipe, fal, user_dir, caplog):
    args = _args(PipelineHandle(unusable_gpu_pipe), fallback="fal", num_images=2)
    with caplog.at_level("WARNING"):
        images, seed, flags, prompt = SDXLCNImg2Img().sample(**args)
    assert images.shape == (4, 64, 72, 3) and seed == 9 and json.loads(flags) == [False] * 4 and prompt == "a house"
    assert sorted(j.args["seed"] for j in fal.jobs.values()) == [9, 11]  # seed + k * num_images, as locally
    assert all(j.args["num_inference_steps"] == 4 and j.args["num_images"] == 2 for j in fal.jobs.values())
    # the test server returns the inverted init image: the fal results really are what came back
    assert torch.allclose(images[0], 1.0 - args["image"][0], atol=1 / 255 + 1e-6)
    assert "falling back to fal" in caplog.text and "no usable GPU" in caplog.text


def test_fallback_refuses_local_lora_files(unusable_gpu_pipe, fal, user_dir, tmp_path):
    import lora_factory

    path = tmp_path / "style.safetensors"
    lora_factory.write(lora_factory.kohya_state_dict(unusable_gpu_pipe), path)
    handle = PipelineHandle(unusable_gpu_pipe).with_lora(LoraSpec(str(path), 0.8))
    with pytest.raises(RuntimeError, match="cannot use local LoRA files"):
        SDXLCNImg2Img().sample(**_args(handle, fallback="fal"))
    assert fal.jobs == {}


def test_bad_requests_never_fall_back(unusable_gpu_pipe, fal, user_dir):
    with pytest.raises(ValueError, match="^prompt: is empty"):
        SDXLCNImg2Img().sample(**_args(PipelineHandle(unusable_gpu_pipe), fallback="fal", prompt=""))
    assert fal.jobs == {}


def test_a_fallback_keeps_the_requests_that_finished_locally(tiny_pipe, fal, user_dir):
    """Request 2 of 2 runs out of memory (raised inside the real UNet's forward, as CUDA raises it): request 1's
    local image is kept and only request 2 goes to fal (one job, its own seed), nothing paid for twice."""
    calls = {"n": 0}

    def oom_on_second_request(_module, _args):
        calls["n"] += 1
        if calls["n"] > 3:  # int(4 steps x 0.95) = 3 UNet calls per request
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")

    args = _args(PipelineHandle(tiny_pipe), fallback="fal")
    local_alone, *_ = SDXLCNImg2Img().sample(**_args(PipelineHandle(tiny_pipe), image=args["image"][:1]))
    handle = tiny_pipe.unet.register_forward_pre_hook(oom_on_second_request)
    try:
        images, seed, flags, _ = SDXLCNImg2Img().sample(**args)
    finally:
        handle.remove()
    assert images.shape == (2, 64, 72, 3) and json.loads(flags) == [False, False]
    assert [j.args["seed"] for j in fal.jobs.values()] == [10]  # only request 2 (seed + 1) went to fal
    assert torch.equal(images[0], local_alone[0])  # the local image of request 1, kept
    assert torch.allclose(images[1], 1.0 - args["image"][1], atol=1 / 255 + 1e-6)  # fal's answer for request 2


def test_fallback_is_refused_on_comfyuis_own_models_before_anything_runs(tiny_pipe, fal, user_dir):
    from sdxl_controlnet_img2img.nodes.from_comfy_node import SOURCE

    handle = PipelineHandle(tiny_pipe, source={"from": SOURCE})
    calls = []
    hook = tiny_pipe.unet.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(ValueError, match="^fallback: 'fal' cannot stand in .* checkpoint and LoRAs"):
            SDXLCNImg2Img().sample(**_args(handle, fallback="fal"))
    finally:
        hook.remove()
    assert calls == [] and fal.jobs == {}
