"""Run by tests/test_comfy_graft.py under ComfyUI's interpreter (``--cpu``): the smaller SDXL ControlNets on the
ComfyUI-models path.

diffusers' ``controlnet-canny-sdxl-1.0-mid`` has attention only in its deepest level and its middle block (one
transformer layer each), ``-small`` none at all (its middle block keeps an attention block of 0 layers: just the
projections). Tiny ControlNets of these two shapes, on a tiny three-level SDXL (the levels of SDXL: none, 2 and 2
layers here), are saved in diffusers' layout and loaded by ComfyUI's own ``comfy.controlnet.load_controlnet``. Its
config detection knows these layouts only at SDXL's sizes, so it is asked about a view of the file with SDXL's sizes
(the same keys) and its answer gets the tiny sizes back. Then ``SDXLCNFromComfyModels`` builds our pipeline on them,
and our sampler must give the image our diffusers path gives on the same weights (the ControlNet loaded from the same
folder by diffusers). Prints one ``PROBE {json}`` line.

usage: python comfy_graft_small_probe.py COMFYUI_DIR PACK_ROOT WORK_DIR
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

comfy_dir, pack_root, work = (Path(a) for a in sys.argv[1:4])
sys.path.insert(0, str(pack_root / "tests" / "helpers"))
from comfy_probe_start import start  # noqa: E402

pack = start(comfy_dir, pack_root)
import comfy.controlnet  # noqa: E402
import comfy.model_detection  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from diffusers import ControlNetModel, StableDiffusionXLControlNetImg2ImgPipeline, UNet2DConditionModel  # noqa: E402

from sdxlcn_pack.pipeline.handle import PipelineHandle  # noqa: E402
from sdxlcn_pack.pipeline.local.tiny_models import TINY_ADDITION_TIME_EMBED_DIM  # noqa: E402

from comfy_tiny_sdxl import (  # noqa: E402
    SDXL_HINT_CHANNELS,
    comfy_clip,
    comfy_sdxl_model,
    comfy_vae,
    diffusers_parts,
    make_controlnet_act,
)
from pictures import make_test_image  # noqa: E402

found: dict = {}
work.mkdir(parents=True, exist_ok=True)

# a three-level tiny SDXL UNet (SDXL: 320/640/1280 channels, 0/2/10 layers; here 32/64/128 and 0/2/2)
UNET = {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
        "legacy": False, "num_classes": "sequential", "adm_in_channels": 80, "in_channels": 4, "model_channels": 32,
        "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 2, 2], "channel_mult": [1, 2, 4],
        "transformer_depth_middle": 2, "use_linear_in_transformer": True, "context_dim": 64, "num_head_channels": 16,
        "transformer_depth_output": [0, 0, 0, 2, 2, 2, 2, 2, 2], "use_temporal_attention": False,
        "use_temporal_resblock": False}
SHARED = dict(block_out_channels=(32, 64, 128), layers_per_block=2, in_channels=4, attention_head_dim=(2, 4, 8),
              use_linear_projection=True, addition_embed_type="text_time",
              addition_time_embed_dim=TINY_ADDITION_TIME_EMBED_DIM, projection_class_embeddings_input_dim=80,
              cross_attention_dim=64)
# the two hub ControlNets' own down blocks and transformer layers (the deepest number is also the middle block's)
SHAPES = {
    "mid": dict(down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
                transformer_layers_per_block=(0, 0, 1)),
    "small": dict(down_block_types=("DownBlock2D", "DownBlock2D", "DownBlock2D"),
                  transformer_layers_per_block=(0, 0, 0)),
}
# what ComfyUI 0.8.0's detection calls them (model_detection.py: SDXL_mid_cnet, SDXL_small_cnet)
COMFY_DEPTHS = {"mid": ([0, 0, 0, 0, 1, 1], 1), "small": ([0, 0, 0, 0, 0, 0], 0)}

parts, _, text = diffusers_parts(comfy_dir)
torch.manual_seed(8)
parts["unet"] = UNet2DConditionModel(sample_size=32, out_channels=4,
                                     down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                                     up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                                     transformer_layers_per_block=(1, 2, 2), **SHARED)
for m in parts.values():
    if isinstance(m, torch.nn.Module):
        m.eval()
model = comfy_sdxl_model(parts["unet"], UNET, TINY_ADDITION_TIME_EMBED_DIM)
clip, vae = comfy_clip(parts, text), comfy_vae(parts)


def detect_at_sdxl_size(real):
    """ComfyUI's own detection, asked about the file's keys with SDXL's sizes; the answer gets the tiny sizes."""

    def detect(state_dict, dtype=None):
        view = dict(state_dict)
        view["conv_in.weight"] = torch.empty(320, 4, 3, 3, device="meta")
        view["add_embedding.linear_1.weight"] = torch.empty(1280, 2816, device="meta")
        for key in [k for k in view if k.endswith("attn2.to_k.weight")]:
            view[key] = torch.empty(640, 2048, device="meta")
        config = real(view, dtype)
        if config is None:
            return None
        detected.append((list(config["transformer_depth"]), config["transformer_depth_middle"]))
        return {**config, "model_channels": UNET["model_channels"], "adm_in_channels": UNET["adm_in_channels"],
                "context_dim": UNET["context_dim"], "num_head_channels": UNET["num_head_channels"]}

    return detect


class Warnings(logging.Handler):
    def emit(self, record):
        if "controlnet keys" in record.getMessage() or "leftover keys" in record.getMessage():
            load_warnings.append(record.getMessage()[:300])


Sampler = pack.NODE_CLASS_MAPPINGS["SDXLCNImg2Img"]
Builder = pack.NODE_CLASS_MAPPINGS["SDXLCNFromComfyModels"]
init, control = make_test_image(64, 64, seed=1), make_test_image(64, 64, seed=2)
to_image = lambda pil: torch.from_numpy(np.asarray(pil, dtype=np.float32) / 255.0)[None]  # noqa: E731
WIDGETS = dict(prompt="a photo of a red castle", negative_prompt="blurry", image_size="custom", width=64, height=64,
               num_inference_steps=4, guidance_scale=7.5, strength=0.95, controlnet_conditioning_scale=0.5, seed=7,
               num_images=2, enable_safety_checker=False, expand_prompt=False)


def sample(handle):
    return Sampler().sample(handle, to_image(init), to_image(control), apply_canny=True, **WIDGETS)[0].numpy()


def max_pixel_diff(a, b):
    return int(np.abs(np.round(a * 255) - np.round(b * 255)).max())


logging.getLogger().addHandler(Warnings())
for i, (kind, shape) in enumerate(SHAPES.items()):
    torch.manual_seed(20 + i)
    cn = ControlNetModel(conditioning_embedding_out_channels=SDXL_HINT_CHANNELS, **shape, **SHARED)
    make_controlnet_act(cn)
    folder = work / f"controlnet-{kind}"
    cn.save_pretrained(folder)  # diffusers' layout: config.json + diffusion_pytorch_model.safetensors
    detected, load_warnings = [], []
    real = comfy.model_detection.unet_config_from_diffusers_unet
    comfy.model_detection.unet_config_from_diffusers_unet = detect_at_sdxl_size(real)
    try:
        control_net = comfy.controlnet.load_controlnet(str(folder / "diffusion_pytorch_model.safetensors"))
    finally:
        comfy.model_detection.unet_config_from_diffusers_unet = real
    result = {"comfy_detected": detected[0] if detected else None, "load_warnings": load_warnings,
              "cn_params": sum(p.numel() for p in cn.parameters())}
    found[kind] = result
    try:
        handle = Builder().build(model, clip, vae, control_net)[0]
    except ValueError as exc:  # the old code's refusal
        result["refused"] = str(exc)
        continue
    pipe = handle.get_pipe()
    theirs = {p.data_ptr() for p in control_net.control_model.parameters()}
    mine = [p.data_ptr() for p in pipe.controlnet.parameters()]
    result["grafted_cn_tensors"] = len(mine)
    result["cn_no_own_storage"] = len(mine) > 0 and set(mine) <= theirs
    result["skeleton_down_block_types"] = list(pipe.controlnet.config.down_block_types)
    ours = sample(handle)
    on_diffusers = StableDiffusionXLControlNetImg2ImgPipeline(
        controlnet=ControlNetModel.from_pretrained(folder).eval(), **parts)
    ref = sample(PipelineHandle(pipe=on_diffusers))
    result["shape"] = list(ours.shape)
    result["vs_diffusers_max_diff"] = max_pixel_diff(ours, ref)
    result["vs_diffusers_mean_diff"] = float(np.abs(ours - ref).mean() * 255)
    without = Sampler().sample(PipelineHandle(pipe=on_diffusers), to_image(init), to_image(control), apply_canny=True,
                               **{**WIDGETS, "controlnet_conditioning_scale": 0.0})[0].numpy()
    result["controlnet_changes_it"] = max_pixel_diff(ref, without)  # the ControlNet does act on the image
found["comfy_depths_expected"] = COMFY_DEPTHS
print("PROBE " + json.dumps(found))
