"""Run by tests/test_comfy_graft.py under ComfyUI's interpreter (``--cpu``), with ComfyUI imported from its checkout.

Builds tiny SDXL-shaped models twice from the same random weights: as diffusers models (our own path) and as
ComfyUI's own objects (``comfy.model_base.SDXL`` in a ``ModelPatcher``, ComfyUI's SDXL CLIP with its real tokenizer,
ComfyUI's VAE, a ControlNet through ComfyUI's own ControlNet loader). Then runs our sampler node on a pipeline from
``SDXLCNFromComfyModels`` and compares. Prints one ``PROBE {json}`` line; the test asserts on it.

usage: python comfy_graft_probe.py COMFYUI_DIR PACK_ROOT WORK_DIR
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

comfy_dir, pack_root, work = (Path(a) for a in sys.argv[1:4])
sys.path.insert(0, str(pack_root / "tests" / "helpers"))
from comfy_probe_start import start  # noqa: E402

pack = start(comfy_dir, pack_root)
import comfy.controlnet  # noqa: E402
import comfy.model_base  # noqa: E402
import comfy.model_detection  # noqa: E402
import comfy.model_management as mm  # noqa: E402
import comfy.sd  # noqa: E402
import comfy.supported_models  # noqa: E402
import comfy.utils  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from comfy.model_patcher import ModelPatcher  # noqa: E402

from sdxlcn_pack.pipeline.handle import PipelineHandle  # noqa: E402
from sdxlcn_pack.pipeline.local.tiny_models import (  # noqa: E402
    TINY_ADDITION_TIME_EMBED_DIM,
    TINY_UNET_LDM_CONFIG,
)

import comfy_tiny_sdxl as tiny_sdxl  # noqa: E402
import lora_factory  # noqa: E402
from comfy_tiny_sdxl import (  # noqa: E402
    SDXL_HINT_CHANNELS,
    comfy_clip,
    comfy_vae,
    diffusers_parts,
    make_controlnet_act,
)
from pictures import make_test_image  # noqa: E402

found: dict = {}
work.mkdir(parents=True, exist_ok=True)

# --- the diffusers side: the tiny models with ComfyUI's CLIP vocabulary and a VAE ComfyUI can build --------------
from diffusers import ControlNetModel, StableDiffusionXLControlNetImg2ImgPipeline  # noqa: E402

parts, controlnet, text = diffusers_parts(comfy_dir)
torch.manual_seed(7)
controlnet = ControlNetModel.from_config({**controlnet.config, "conditioning_embedding_out_channels": SDXL_HINT_CHANNELS})
make_controlnet_act(controlnet)
for m in (*parts.values(), controlnet):
    if isinstance(m, torch.nn.Module):
        m.eval()
diffusers_pipe = StableDiffusionXLControlNetImg2ImgPipeline(controlnet=controlnet, **parts)

# --- the same weights as ComfyUI's own objects --------------------------------------------------------------------
UNET = TINY_UNET_LDM_CONFIG


def comfy_sdxl_model(unet, storage=torch.float32, compute=None):
    return tiny_sdxl.comfy_sdxl_model(unet, UNET, TINY_ADDITION_TIME_EMBED_DIM, storage, compute)


def comfy_controlnet(cn):
    """ComfyUI's own diffusers-format ControlNet loader (its config detection only knows full-size SDXL: told)."""
    known = comfy.model_detection.unet_config_from_diffusers_unet
    comfy.model_detection.unet_config_from_diffusers_unet = lambda *_a, **_k: {**UNET, "num_heads": -1}
    try:
        return comfy.controlnet.load_controlnet_state_dict({k: v.clone() for k, v in cn.state_dict().items()})
    finally:
        comfy.model_detection.unet_config_from_diffusers_unet = known


model, clip, vae = comfy_sdxl_model(parts["unet"]), comfy_clip(parts, text), comfy_vae(parts)
control_net = comfy_controlnet(controlnet)

Builder = pack.NODE_CLASS_MAPPINGS["SDXLCNFromComfyModels"]
Sampler = pack.NODE_CLASS_MAPPINGS["SDXLCNImg2Img"]
LoraNode = pack.NODE_CLASS_MAPPINGS["SDXLCNLoraLoader"]
init, control = make_test_image(64, 64, seed=1), make_test_image(64, 64, seed=2)
to_image = lambda pil: torch.from_numpy(np.asarray(pil, dtype=np.float32) / 255.0)[None]  # noqa: E731
WIDGETS = dict(prompt="a photo of a red castle", negative_prompt="blurry", image_size="custom", width=64, height=64,
               num_inference_steps=4, guidance_scale=7.5, strength=0.95, controlnet_conditioning_scale=0.5, seed=7,
               num_images=2, enable_safety_checker=False, expand_prompt=False)


def ours_on_comfy(handle):
    images = Sampler().sample(handle, to_image(init), to_image(control), apply_canny=True, **WIDGETS)[0]
    return images.numpy()


def ours_on_diffusers(loras=()):
    return Sampler().sample(PipelineHandle(pipe=diffusers_pipe, loras=tuple(loras)), to_image(init),
                            to_image(control), apply_canny=True, **WIDGETS)[0].numpy()


def max_pixel_diff(a, b):
    return int(np.abs(np.round(a * 255) - np.round(b * 255)).max())


# 1. no copies: every parameter of the grafted UNet / ControlNet is one of ComfyUI's tensors
handle = Builder().build(model, clip, vae, control_net)[0]
pipe = handle.get_pipe()
theirs = {p.data_ptr() for p in (*model.model.diffusion_model.parameters(),
                                 *control_net.control_model.parameters())}
mine = [p.data_ptr() for p in (*pipe.unet.parameters(), *pipe.controlnet.parameters())]
found["grafted_tensors"] = len(mine)
found["no_own_storage"] = len(mine) > 0 and set(mine) <= theirs
found["vae_skeleton_empty"] = all(p.device.type == "meta" for p in pipe.vae.parameters())

# 2. the image equals our own diffusers path on the same weights
base = ours_on_comfy(handle)
ref = ours_on_diffusers()
found["shape"] = list(base.shape)
found["vs_diffusers_max_diff"] = max_pixel_diff(base, ref)
found["vs_diffusers_mean_diff"] = float(np.abs(base - ref).mean() * 255)

# 3. a LoRA from ComfyUI's LoRA loader changes it exactly as it changes ComfyUI's weights: the same image as our
#    diffusers path with the weights ComfyUI patched; and close to the same LoRA file on our own LoRA path (peft
#    adds the low-rank product at run time instead of merging it: float rounding apart)
lora_file = work / "tiny_lora.safetensors"
lora_factory.write(lora_factory.kohya_state_dict(diffusers_pipe, te=False, amp=0.3), lora_file)
original_proj_in = model.model.diffusion_model.input_blocks[4][1].proj_in.weight.detach().clone()
lora_model, _ = comfy.sd.load_lora_for_models(model, clip, comfy.utils.load_torch_file(str(lora_file)), 1.0, 0.0)
lora_handle = Builder().build(lora_model, clip, vae, control_net)[0]
with_lora = ours_on_comfy(lora_handle)
found["lora_changes_it"] = max_pixel_diff(with_lora, base)
mm.load_models_gpu([lora_model])
patched = {k: v.detach().clone() for k, v in lora_handle.get_pipe().unet.state_dict().items()}
original = {k: v.clone() for k, v in diffusers_pipe.unet.state_dict().items()}
diffusers_pipe.unet.load_state_dict(patched)
found["lora_vs_comfy_weights_max_diff"] = max_pixel_diff(with_lora, ours_on_diffusers())
diffusers_pipe.unet.load_state_dict(original)
from sdxlcn_pack.pipeline.request import LoraSpec  # noqa: E402

ref_lora = ours_on_diffusers((LoraSpec(str(lora_file), 1.0),))
found["lora_vs_our_lora_mean_diff"] = float(np.abs(with_lora - ref_lora).mean() * 255)
found["base_again_after_lora"] = max_pixel_diff(ours_on_comfy(handle), base)

# 3b. ComfyUI's low-VRAM mode (forced here: a CPU-only ComfyUI always loads fully): its layers keep the original
#     weights, cast them per call and add the LoRA inside their own forward; the grafted pipeline follows that
mm.unload_all_models()
lora_model.load("cpu", lowvram_model_memory=1)  # every layer in low-VRAM mode
lowvram_pipe = lora_handle.get_pipe()
found["lowvram_layers"] = sum(bool(getattr(m, "comfy_cast_weights", False)) for m in lowvram_pipe.unet.modules())
found["lowvram_weights_unpatched"] = bool(torch.equal(
    lowvram_pipe.unet.get_submodule("down_blocks.1.attentions.0.proj_in").weight, original_proj_in))
keep_loaded, lowvram_pipe.codec.before_denoise = lowvram_pipe.codec.before_denoise, lambda *_a: None
found["lowvram_vs_full_load_max_diff"] = max_pixel_diff(ours_on_comfy(lora_handle), with_lora)
lowvram_pipe.codec.before_denoise = keep_loaded
lora_model.unpatch_model()

# 4. fp8 storage computed in fp32 (ComfyUI's --fp8_e4m3fn-unet: its layers cast per call): the grafted pipeline
#    runs, and gives our diffusers path's image on the same (fp8-rounded) weights
from sdxlcn_pack.pipeline.local.lora.adapters import unload_all  # noqa: E402

unload_all(diffusers_pipe)
diffusers_pipe.unload_lora_weights()  # the plain layers again (PEFT's wrappers gone)
fp8_model = comfy_sdxl_model(parts["unet"], torch.float8_e4m3fn, torch.float32)
fp8_handle = Builder().build(fp8_model, clip, vae, control_net)[0]
found["fp8_storage"] = str(next(fp8_handle.get_pipe().unet.parameters()).dtype)
found["fp8_compute"] = str(fp8_handle.get_pipe().unet.dtype)
with_fp8 = ours_on_comfy(fp8_handle)
rounded = {k: v.float() for k, v in fp8_handle.get_pipe().unet.state_dict().items()}
diffusers_pipe.unet.load_state_dict(rounded)
found["fp8_vs_diffusers_max_diff"] = max_pixel_diff(with_fp8, ours_on_diffusers())
found["fp8_changes_it"] = max_pixel_diff(with_fp8, base)
diffusers_pipe.unet.load_state_dict(original)

# 5. refusals, each naming the input
def refusal(**swap):
    args = {**dict(model=model, clip=clip, vae=vae, control_net=control_net), **swap}
    try:
        Builder().build(**args)
    except ValueError as exc:
        return str(exc)
    return None


sd15 = comfy.supported_models.SD15({**UNET, "num_classes": None, "adm_in_channels": None,
                                    "use_linear_in_transformer": False})
found["refuses_sd15"] = refusal(model=ModelPatcher(sd15.get_model({}, device="cpu"), load_device="cpu",
                                                   offload_device="cpu"))
found["refuses_control_lora"] = refusal(control_net=comfy.controlnet.ControlLora({"lora_controlnet": torch.zeros(1)}))
edm = model.clone()  # Playground v2.5's kind: an SDXL model class predicting EDM
edm.model = comfy.model_base.SDXL(model.model.model_config, model_type=comfy.model_base.ModelType.EDM, device="cpu")
found["refuses_edm"] = refusal(model=edm)
union_model = copy.copy(control_net.control_model)  # ControlNet Union has a task embedding
union_model.task_embedding = torch.nn.Parameter(torch.zeros(1, 1))
union = comfy.controlnet.ControlNet(union_model, load_device="cpu")
found["refuses_union"] = refusal(control_net=union)


class CustomLinear(torch.nn.Module):  # what a quantized format's layer looks like: not a torch.nn.Linear
    def __init__(self, linear):
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias


block = model.model.diffusion_model.input_blocks[4][1].transformer_blocks[0].attn1
plain_to_q, block.to_q = block.to_q, CustomLinear(block.to_q)  # for this check only
found["refuses_quantized"] = refusal()
block.to_q = plain_to_q
try:
    LoraNode().add_lora(handle, "x.safetensors")
    found["lora_node_refuses"] = None
except ValueError as exc:
    found["lora_node_refuses"] = str(exc)

# 6. patches that live inside ComfyUI's sampler are named
patched = model.clone()
patched.set_model_attn2_patch(lambda q, k, v, extra_options: (q, k, v))
from sdxlcn_pack.nodes.comfy_graft import comfy_only_patches  # noqa: E402

found["named_patches"] = comfy_only_patches(patched)
print("PROBE " + json.dumps(found))
