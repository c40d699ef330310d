"""A diffusers folder (SDXL base and ControlNet) is read as the single file is: models built empty and filled from
each one weights file (pipeline/local/diffusers_folder.py). The models are diffusers' and transformers' own
``from_pretrained`` models tensor for tensor; a folder laid out otherwise (sharded weights) still loads, through
``from_pretrained``."""

from __future__ import annotations

import shutil

import pytest
import torch


def same_weights(a, b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    assert not a.training and not b.training


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_folder_models_are_from_pretrained_s(tiny_models, dtype):
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from sdxl_controlnet_img2img.pipeline.local.diffusers_folder import folder_models
    from sdxl_controlnet_img2img.pipeline.local.loading import LoadOptions, load_controlnet

    base = tiny_models["checkpoint"]
    got = folder_models(base, dtype, "checkpoint")
    assert set(got) == {"unet", "vae", "text_encoder", "text_encoder_2"}  # all four read as the single file is
    classes = {"unet": UNet2DConditionModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModel,
               "text_encoder_2": CLIPTextModelWithProjection}
    for name, cls in classes.items():
        same_weights(got[name], cls.from_pretrained(base, subfolder=name, torch_dtype=dtype))
    cn = load_controlnet(tiny_models["controlnet"], LoadOptions(device="cpu", dtype=dtype))
    same_weights(cn, ControlNetModel.from_pretrained(tiny_models["controlnet"], torch_dtype=dtype))


def test_a_folder_with_sharded_weights_loads_through_from_pretrained(tiny_models, tmp_path):
    from diffusers import UNet2DConditionModel

    from sdxl_controlnet_img2img.pipeline.local.diffusers_folder import folder_models
    from sdxl_controlnet_img2img.pipeline.local.loading import LoadOptions, build_pipeline

    base = tmp_path / "base"
    shutil.copytree(tiny_models["checkpoint"], base)
    want = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
    shutil.rmtree(base / "unet")
    want.save_pretrained(base / "unet", max_shard_size="200KB")  # shards and an index, as large UNets are stored
    assert (base / "unet" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    assert set(folder_models(base, torch.float32, "checkpoint")) == {"vae", "text_encoder", "text_encoder_2"}
    pipe = build_pipeline(base, tiny_models["controlnet"], LoadOptions(device="cpu", dtype="fp32"))
    same_weights(pipe.unet, want)
