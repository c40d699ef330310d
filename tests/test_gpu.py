"""On a CUDA GPU (skipped elsewhere): full-size random-weight SDXL + ControlNet at 1024x1024 through the loader's
placement and generate(): a finite picture in bf16 and in fp16, and peak memory within the README's figure for
memory mode none (~12 GiB at 1024x1024)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _full_size_pipeline(dtype):
    from diffusers import (AutoencoderKL, ControlNetModel, EulerDiscreteScheduler,
                           StableDiffusionXLControlNetImg2ImgPipeline, UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from sdxl_controlnet_img2img.pipeline.local.models.loading import LoadOptions
    from sdxl_controlnet_img2img.pipeline.local.memory.placement import place
    from sdxl_controlnet_img2img.pipeline.local.models.sdxl_config import CONTROLNET_SDXL_CONFIG, sdxl_config_dir

    cfg = sdxl_config_dir()
    torch.manual_seed(0)
    with torch.device("cpu"):
        parts = {
            "unet": UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(cfg / "unet")),
            "vae": AutoencoderKL.from_config(AutoencoderKL.load_config(cfg / "vae")),
            "text_encoder": CLIPTextModel(CLIPTextConfig.from_pretrained(cfg / "text_encoder")),
            "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(cfg / "text_encoder_2")),
            "controlnet": ControlNetModel.from_config(ControlNetModel.load_config(CONTROLNET_SDXL_CONFIG)),
        }
    for m in parts.values():
        m.to(dtype)
    pipe = StableDiffusionXLControlNetImg2ImgPipeline(
        **parts, tokenizer=CLIPTokenizer.from_pretrained(cfg / "tokenizer"),
        tokenizer_2=CLIPTokenizer.from_pretrained(cfg / "tokenizer_2"),
        scheduler=EulerDiscreteScheduler.from_config(EulerDiscreteScheduler.load_config(cfg / "scheduler")))
    place(pipe, LoadOptions(device="cuda", dtype=dtype, memory_mode="none").resolved())
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_full_size_1024_is_finite_and_within_the_memory_figure(dtype, caplog):
    from PIL import Image

    from sdxl_controlnet_img2img.pipeline.local.generate import generate
    from sdxl_controlnet_img2img.pipeline.request import GenerationRequest

    pipe = _full_size_pipeline(dtype)
    torch.cuda.reset_peak_memory_stats()
    img = Image.new("RGB", (1024, 1024), (110, 130, 190))
    req = GenerationRequest.from_dict({"prompt": "an ice fortress", "image_url": img, "control_image_url": img,
                                       "seed": 42, "num_inference_steps": 4, "strength": 1.0,
                                       "image_size": "square_hd"})
    out = np.asarray(generate(pipe, req).images[0], dtype=np.float32)
    peak = torch.cuda.max_memory_allocated() / 2**30
    assert out.shape == (1024, 1024, 3) and out.std() > 1.0  # a picture, not a black (NaN) one
    assert peak < 12.5, f"peak {peak:.1f} GiB"
    print(f"\n{dtype}: peak {peak:.2f} GiB, NaN fallback used: {'decoding again in fp32' in caplog.text}")
