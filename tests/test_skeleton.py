"""The skeleton pipeline (``pipeline/local/models/skeleton.py``) and ``generate``'s codec, without ComfyUI: a UNet and a
ControlNet described in LDM terms become diffusers skeletons on ``meta`` that hold no memory; with the leaves of
real modules grafted in and the text/VAE work done by a codec, a request gives the very pixels of the plain
pipeline."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sdxl_controlnet_img2img.pipeline.errors import RequestError
from sdxl_controlnet_img2img.pipeline.local.generate import generate
from sdxl_controlnet_img2img.pipeline.local.models.sdxl_config import SDXL_BASE_CONFIG
from sdxl_controlnet_img2img.pipeline.local.models.skeleton import (
    SkeletonError,
    build_skeleton,
    controlnet_config_from_unet,
    graft_leaves,
    leaf_modules,
    still_empty,
    unet_config_from_ldm,
)
from sdxl_controlnet_img2img.pipeline.local.tiny_models import (
    TINY_ADDITION_TIME_EMBED_DIM,
    TINY_UNET_LDM_CONFIG,
    tiny_components,
)
from sdxl_controlnet_img2img.pipeline.request import GenerationRequest

from pictures import make_test_image

# SDXL base 1.0's UNet as the original (SGM) config and ComfyUI describe it
SDXL_LDM = {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
            "legacy": False, "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4,
            "model_channels": 320, "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10],
            "channel_mult": [1, 2, 4], "transformer_depth_middle": 10, "use_linear_in_transformer": True,
            "context_dim": 2048, "num_head_channels": 64, "num_heads": -1,
            "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10]}


def test_sdxl_ldm_config_gives_sdxl_base_unet_config():
    bundled = json.loads((SDXL_BASE_CONFIG / "unet" / "config.json").read_text())
    config = unet_config_from_ldm(SDXL_LDM, 256)
    for key in ("block_out_channels", "layers_per_block", "down_block_types", "up_block_types",
                "transformer_layers_per_block", "attention_head_dim", "cross_attention_dim",
                "projection_class_embeddings_input_dim", "addition_time_embed_dim", "use_linear_projection"):
        assert config[key] == bundled[key], key


def test_full_size_skeleton_holds_no_memory():
    unet_config = unet_config_from_ldm(SDXL_LDM, 256)
    skeleton = build_skeleton(unet_config, controlnet_config_from_unet(unet_config, [16, 32, 96, 256]))
    params = [*skeleton.unet.parameters(), *skeleton.controlnet.parameters(), *skeleton.pipe.vae.parameters()]
    assert sum(p.numel() for p in skeleton.unet.parameters()) == 2_567_463_684  # SDXL's UNet, as a shape only
    assert params and all(p.device.type == "meta" for p in params)
    assert skeleton.pipe.text_encoder is None and skeleton.pipe.tokenizer is None


@pytest.mark.parametrize("change, words", [
    ({"num_head_channels": 48}, "do not divide"),
    ({"num_head_channels": -1, "num_heads": -1}, "neither"),
    ({"transformer_depth": [0, 1, 2, 2]}, "differs inside one level"),
    ({"transformer_depth_middle": 5}, "middle block"),
])
def test_ldm_configs_diffusers_cannot_build_are_refused(change, words):
    with pytest.raises(SkeletonError, match=words):
        unet_config_from_ldm({**TINY_UNET_LDM_CONFIG, **change}, TINY_ADDITION_TIME_EMBED_DIM)


# diffusers' smaller SDXL ControlNets, as their hub configs describe them on top of the full one
HUB_SHAPES = {
    "mid": ({"down_block_types": ["DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"],
             "transformer_layers_per_block": [0, 0, 1]}, [0, 0, 1], 1),
    "small": ({"down_block_types": ["DownBlock2D"] * 3, "transformer_layers_per_block": [0, 0, 0]}, [0, 0, 0], 0),
}


@pytest.mark.parametrize("kind", sorted(HUB_SHAPES))
def test_smaller_controlnet_skeletons_have_the_hub_models_tensors(kind):
    """-mid: attention only in the deepest level and the middle (1 layer); -small: none, its middle attention block
    has 0 layers (only its norm and projections). Built from the depths read off a ControlNet, the skeleton has
    exactly the tensors of the hub model's config."""
    from diffusers import ControlNetModel

    from sdxl_controlnet_img2img.pipeline.local.models.sdxl_config import CONTROLNET_SDXL_CONFIG

    hub_change, depths, middle = HUB_SHAPES[kind]
    unet_config = unet_config_from_ldm(SDXL_LDM, 256)
    config = controlnet_config_from_unet(unet_config, [16, 32, 96, 256], depths, middle)
    skeleton = build_skeleton(unet_config, config)
    hub = json.loads((CONTROLNET_SDXL_CONFIG / "config.json").read_text())
    with torch.device("meta"):
        reference = ControlNetModel.from_config({**hub, **hub_change})
    shapes = lambda m: {k: tuple(v.shape) for k, v in m.state_dict().items()}  # noqa: E731
    assert shapes(skeleton.controlnet) == shapes(reference)
    assert config["down_block_types"] == hub_change["down_block_types"]


@pytest.mark.parametrize("depths, middle, words", [
    ([0, 2, 10], 4, "middle block has 4 transformer layers, its deepest level 10"),
    ([0, 0, 0], -1, "no attention block"),
    ([0, 2], 2, "2 levels"),
])
def test_controlnet_depths_diffusers_cannot_build_are_refused(depths, middle, words):
    with pytest.raises(SkeletonError, match=words):
        controlnet_config_from_unet(unet_config_from_ldm(SDXL_LDM, 256), [16, 32, 96, 256], depths, middle)


class PipelineCodec:
    """A codec doing the text and VAE work with a plain pipeline's own models (as a host application would with
    its own): prompts through ``encode_prompt``, images through the VAE's posterior mean."""

    def __init__(self, pipe):
        self.pipe, self.loads = pipe, 0

    def encode_text(self, text):
        embeds, _, pooled, _ = self.pipe.encode_prompt(text, None, "cpu", 1, False)
        return embeds, pooled

    def encode_image(self, image):
        pixels = self.pipe.image_processor.preprocess(image)
        return self.pipe.vae.encode(pixels).latent_dist.mean * self.pipe.vae.config.scaling_factor

    def before_denoise(self, width, height):
        self.loads += 1

    def decode(self, latents):
        with torch.no_grad():
            image = self.pipe.vae.decode(latents / self.pipe.vae.config.scaling_factor).sample
        return self.pipe.image_processor.postprocess(image, output_type="pil")


@pytest.fixture(scope="module")
def plain_and_grafted():
    from diffusers import StableDiffusionXLControlNetImg2ImgPipeline

    parts, controlnet = tiny_components(seed=11)
    with torch.no_grad():  # a posterior without spread, so the mean (codec) and a sample (plain path) agree
        parts["vae"].quant_conv.weight[4:] = 0
        parts["vae"].quant_conv.bias[4:] = -40.0
    plain = StableDiffusionXLControlNetImg2ImgPipeline(controlnet=controlnet, **parts)
    unet_config = unet_config_from_ldm(TINY_UNET_LDM_CONFIG, TINY_ADDITION_TIME_EMBED_DIM)
    cn_config = controlnet_config_from_unet(unet_config, controlnet.config.conditioning_embedding_out_channels)
    skeleton = build_skeleton(unet_config, cn_config, vae_config=parts["vae"].config)
    for mine, theirs in ((skeleton.unet, plain.unet), (skeleton.controlnet, controlnet)):
        leaves = leaf_modules(mine)
        graft_leaves(mine, {name: theirs.get_submodule(name) for name in leaves})
        assert not still_empty(mine)
    skeleton.set_compute("cpu", torch.float32)
    skeleton.pipe.codec = PipelineCodec(plain)
    return plain, skeleton.pipe


def _request(**extra):
    return GenerationRequest.from_dict({
        "prompt": "a photo of a red castle", "negative_prompt": "blurry", "image_url": make_test_image(64, 64, 1),
        "control_image_url": make_test_image(64, 64, 2), "image_size": {"width": 64, "height": 64},
        "num_inference_steps": 4, "seed": 5, "num_images": 2, **extra})


def test_grafted_pipeline_with_codec_gives_the_plain_pipelines_pixels(plain_and_grafted):
    plain, grafted = plain_and_grafted
    theirs = generate(plain, _request())
    ours = generate(grafted, _request())
    assert ours.seed == theirs.seed == 5 and len(ours.images) == 2
    for a, b in zip(ours.images, theirs.images):
        diff = np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int))
        assert diff.max() <= 1 and diff.mean() < 0.01  # a sample vs the mean of a posterior of spread e^-20
    assert grafted.codec.loads == 2  # the host loads its models before each image's denoise
    assert {p.data_ptr() for p in grafted.unet.parameters()} <= {p.data_ptr() for p in plain.unet.parameters()}


def test_codec_pipeline_refuses_request_loras(plain_and_grafted):
    _, grafted = plain_and_grafted
    with pytest.raises(RequestError, match="^loras: .*LoRA loader"):
        generate(grafted, _request(loras=[{"path": "x.safetensors", "scale": 1.0}]))


@pytest.mark.parametrize("scheduler", ["lcm", "tcd", "euler_trailing", "ddim_trailing", "tcd_eta1"])
def test_codec_pipeline_honours_the_few_step_schedules(plain_and_grafted, scheduler):
    """The ComfyUI-models path (a codec pipeline) runs the few-step LoRAs' schedules as the diffusers path does: the
    plain pipeline's pixels with that scheduler at the _fast settings, 3 steps run, no unconditional pass."""
    plain, grafted = plain_and_grafted
    fast = {"local_scheduler": scheduler, "num_inference_steps": 4, "strength": 0.95, "guidance_scale": 1.0,
            "num_images": 1}
    batches = []
    hook = grafted.unet.register_forward_pre_hook(lambda _m, args: batches.append(args[0].shape[0]))
    try:
        ours = generate(grafted, _request(**fast)).images[0]
    finally:
        hook.remove()
    theirs = generate(plain, _request(**fast)).images[0]
    default = generate(plain, _request(**{**fast, "local_scheduler": "default"})).images[0]
    diff = np.abs(np.asarray(ours, dtype=int) - np.asarray(theirs, dtype=int))
    assert diff.max() <= 1 and diff.mean() < 0.01
    assert batches == [1, 1, 1]
    assert np.abs(np.asarray(theirs, dtype=int) - np.asarray(default, dtype=int)).mean() > 0.5
