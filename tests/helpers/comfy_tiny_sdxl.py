"""Tiny SDXL-shaped models as diffusers models and, from the same weights, as ComfyUI's own objects: for the probes
that run under ComfyUI's interpreter (``comfy_graft_probe.py``, ``comfy_graft_small_probe.py``), after
``comfy_probe_start.start`` has imported ComfyUI.

The diffusers side is ``tiny_components`` with ComfyUI's CLIP vocabulary (so both sides tokenize alike) and a VAE
that ComfyUI can build (32 groups); the ComfyUI side is ``comfy.model_base.SDXL`` in a ``ModelPatcher``, ComfyUI's
SDXL CLIP with its real tokenizer and ComfyUI's VAE.
"""

from __future__ import annotations

from pathlib import Path

import comfy.model_management as mm
import comfy.sd
import comfy.sdxl_clip
import comfy.supported_models
import comfy.supported_models_base
import comfy.utils
import torch
from comfy.ldm.modules.diffusionmodules.openaimodel import Timestep
from comfy.model_patcher import ModelPatcher

# ComfyUI's ControlNet class has SDXL's hint encoder (16, 32, 96, 256 channels) built in
SDXL_HINT_CHANNELS = [16, 32, 96, 256]


def diffusers_parts(comfy_dir: Path, seed: int = 3):
    """(parts, controlnet, text config): the tiny pipeline's components with ComfyUI's CLIP vocabulary and a VAE
    ComfyUI can build, and the tiny ControlNet of ``tiny_components``."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from sdxlcn_pack.pipeline.local.tiny_models import tiny_components

    parts, controlnet = tiny_components(seed=seed)
    text = parts["text_encoder"].config.to_dict()
    text.update(vocab_size=49408, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    torch.manual_seed(5)
    parts["text_encoder"] = CLIPTextModel(CLIPTextConfig(**text))
    parts["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig(**text))
    vocab = comfy_dir / "comfy" / "sd1_tokenizer"
    parts["tokenizer"] = CLIPTokenizer(str(vocab / "vocab.json"), str(vocab / "merges.txt"), model_max_length=77)
    parts["tokenizer_2"] = CLIPTokenizer(str(vocab / "vocab.json"), str(vocab / "merges.txt"), model_max_length=77,
                                         pad_token="!")
    torch.manual_seed(6)
    # ComfyUI's VAE normalises in 32 groups; the posterior's spread is made negligible (log-variance at its -30
    # clamp) so that ComfyUI's VAE (the posterior mean) and diffusers' (a sample) encode alike
    parts["vae"] = AutoencoderKL(block_out_channels=[32, 32, 64, 64], layers_per_block=1, norm_num_groups=32,
                                 down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                                 latent_channels=4, sample_size=32, scaling_factor=0.13025)
    with torch.no_grad():
        parts["vae"].quant_conv.weight[4:] = 0
        parts["vae"].quant_conv.bias[4:] = -40.0
    return parts, controlnet, text


def make_controlnet_act(controlnet) -> None:
    """A fresh ControlNet's output convs start at zero (a no-op): give them weights so it changes the image."""
    with torch.no_grad():
        for conv in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]:
            conv.weight.normal_(0, 0.3)


def comfy_sdxl_model(unet, ldm: dict, time_dim: int, storage=torch.float32, compute=None):
    """ComfyUI's SDXL model class on ``unet``'s weights (``ldm``: its LDM config; ``time_dim``: the width of each
    size embedding); ``storage``/``compute`` as --fp8_e4m3fn-unet makes them."""
    config = comfy.supported_models.SDXL(dict(ldm))
    config.unet_config["num_head_channels"] = ldm["num_head_channels"]  # its defaults say SDXL's 64
    config.set_inference_dtype(storage, compute)
    base = config.get_model({}, device="cpu")
    base.embedder = Timestep(time_dim)  # this tiny SDXL's size embeddings (SDXL's: 256)
    names = comfy.utils.unet_to_diffusers(ldm)
    sd = unet.state_dict()
    base.diffusion_model.load_state_dict({names[k]: v.clone() for k, v in sd.items()}, strict=True)
    return ModelPatcher(base, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())


def comfy_clip(parts, text: dict):
    small = {k: text[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers",
                                  "projection_dim", "hidden_act", "vocab_size")}
    target = comfy.supported_models_base.ClipTarget(comfy.sdxl_clip.SDXLTokenizer, comfy.sdxl_clip.SDXLClipModel)
    # fp32 like the diffusers side (ComfyUI keeps text encoders in fp16 even on the CPU; --fp32-text-enc does this)
    clip = comfy.sd.CLIP(target=target, model_options={"dtype": torch.float32, "clip_l_model_config": dict(small),
                                                        "clip_g_model_config": dict(small)})
    inner = clip.cond_stage_model
    # transformers 5 names CLIP-L's tensors without its "text_model." (ComfyUI's names have it); CLIP-L's projection
    # is unused by SDXL (its pooled output comes from CLIP-G)
    inner.clip_l.load_sd({f"text_model.{k}": v.clone() for k, v in parts["text_encoder"].state_dict().items()})
    inner.clip_g.load_sd({k: v.clone() for k, v in parts["text_encoder_2"].state_dict().items()})
    return clip


def comfy_vae(parts):
    ddconfig = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 32,
                "ch_mult": [1, 1, 2, 2], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}
    sd = {k: v.clone() for k, v in parts["vae"].state_dict().items()}
    return comfy.sd.VAE(sd=sd, config={"params": {"ddconfig": ddconfig, "embed_dim": 4}})
