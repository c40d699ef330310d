"""``SDXLCNFromComfyModels``: our pipeline on ComfyUI's own loaded models (no second copy of SDXL in memory)."""

from __future__ import annotations

from ..pipeline.handle import PipelineHandle
from .comfy_hooks import CATEGORY

SOURCE = "ComfyUI models"  # PipelineHandle.source["from"] of a pipeline made by this node


class SDXLCNFromComfyModels:
    DESCRIPTION = ("Makes an SDXL ControlNet pipeline from ComfyUI's own loaded models (Load Checkpoint, Load LoRA, "
                   "Load ControlNet Model): no second copy of the weights, ComfyUI's LoRA stack and memory modes "
                   "apply. The sampler then runs fal's request with diffusers on these models.")
    CATEGORY = f"{CATEGORY}/loaders"  # beside the pipeline loader: every node sits in a group under one root
    RETURN_TYPES = ("SDXLCN_PIPELINE",)
    RETURN_NAMES = ("pipeline",)
    OUTPUT_TOOLTIPS = ("For 'SDXL ControlNet Img2Img'. LoRAs: apply them to MODEL/CLIP with ComfyUI's LoRA loader "
                       "(the pack's LoRA node does not take this pipeline).",)
    FUNCTION = "build"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "An SDXL MODEL (epsilon prediction), e.g. from Load Checkpoint, with "
                                               "any LoRA loaders in between."}),
                "clip": ("CLIP", {"tooltip": "The same checkpoint's CLIP. Prompts are encoded by ComfyUI, so its "
                                             "prompt syntax applies: (word:1.2) weights and prompts over 77 tokens."}),
                "vae": ("VAE", {"tooltip": "An SDXL VAE; ComfyUI's VAE encodes the init image (its latent mean) and "
                                           "decodes the result."}),
                "control_net": ("CONTROL_NET", {"tooltip": "A full SDXL ControlNet from Load ControlNet Model (not a "
                                                           "Control-LoRA or a Union ControlNet)."}),
            },
        }

    def build(self, model, clip, vae, control_net):
        from .comfy_graft import NotGraftable, build_grafted_pipeline

        try:
            pipe = build_grafted_pipeline(model, clip, vae, control_net)
        except NotGraftable as exc:
            raise ValueError(str(exc)) from None
        return (PipelineHandle(pipe=pipe, source={"from": SOURCE}),)
