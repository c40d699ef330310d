"""A VAE decode that overflows (NaN/inf, as the stock SDXL VAE does in fp16) is decoded again in fp32 instead of
coming back as a black image."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from sdxl_controlnet_img2img.pipeline.local.generate import generate
from sdxl_controlnet_img2img.pipeline.local.models.loading import LoadOptions, build_pipeline
from sdxl_controlnet_img2img.pipeline.request import GenerationRequest


@pytest.fixture(scope="module")
def bf16_pipe(tiny_models):
    return build_pipeline(tiny_models["checkpoint"], tiny_models["controlnet"], LoadOptions(device="cpu", dtype="bf16"))


def _request(image_files):
    return GenerationRequest.from_dict({"prompt": "a house", "image_url": str(image_files(64, 64, 1)),
                                        "control_image_url": str(image_files(64, 64, 2)), "seed": 5,
                                        "num_inference_steps": 4})


def test_a_decode_that_overflows_is_done_again_in_fp32(bf16_pipe, image_files, caplog):
    req = _request(image_files)
    normal = np.asarray(generate(bf16_pipe, req).images[0], dtype=np.float32)

    def overflow_below_fp32(_module, _inputs, output):  # what fp16 overflow does to the stock SDXL VAE
        return output * float("nan") if output.dtype != torch.float32 else output

    hook = bf16_pipe.vae.decoder.register_forward_hook(overflow_below_fp32)
    try:
        with caplog.at_level(logging.WARNING):
            rescued = np.asarray(generate(bf16_pipe, req).images[0], dtype=np.float32)
    finally:
        hook.remove()
    assert "decoding again in fp32" in caplog.text
    assert rescued.std() > 10  # a picture, not a black image
    assert np.abs(rescued - normal).mean() < 3.0  # the same picture, decoded in fp32 instead of bf16
    assert bf16_pipe.vae.dtype == torch.bfloat16  # the VAE is back in its own dtype


def test_fp16_safety_is_judged_from_the_weights(tiny_models):
    from diffusers import AutoencoderKL

    from sdxl_controlnet_img2img.pipeline.local.vae_decode import fp16_safe

    vae = AutoencoderKL.from_pretrained(tiny_models["checkpoint"], subfolder="vae")
    assert fp16_safe(vae)
    with torch.no_grad():  # a decoder whose activations leave fp16's range, as the stock SDXL VAE's do
        vae.decoder.conv_in.weight.mul_(1e5)
    assert not fp16_safe(vae)
    assert vae.dtype == torch.float32


def test_a_vae_for_another_latent_space_is_refused(tmp_path):
    from safetensors.torch import save_file

    from sdxl_controlnet_img2img.pipeline.errors import ModelLoadError
    from sdxl_controlnet_img2img.pipeline.local.models.loading import load_vae

    f = tmp_path / "flux_ae.safetensors"
    save_file({"decoder.conv_in.weight": torch.zeros(8, 16, 3, 3), "encoder.conv_in.weight": torch.zeros(8, 3, 3, 3)}, f)
    with pytest.raises(ModelLoadError, match=r"vae: .*flux_ae.safetensors decodes 16-channel latents.*SDXL's have 4"):
        load_vae(str(f), LoadOptions(device="cpu"))
