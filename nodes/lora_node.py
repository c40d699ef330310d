"""``SDXLCNLoraLoader``: add a LoRA (file from ComfyUI's ``loras`` folder + strength) to an ``SDXLCN_PIPELINE``.

Chainable: each node returns a new pipeline value whose LoRA list has one more entry; the shared
pipeline object is not changed, so graph branches with different LoRAs stay independent. The LoRA
file is read here once (errors show on this node) and kept as an adapter; the sampler activates
the value's LoRA set just before sampling.
"""

from __future__ import annotations

import os

from ..pipeline.request import LoraSpec
from .comfy_hooks import CATEGORY, folder_paths


def _lora_names() -> list[str]:
    fp = folder_paths()
    if fp is None:
        return []
    try:
        return list(fp.get_filename_list("loras"))
    except Exception:  # noqa: BLE001 - a broken folder config must not hide the node
        return []


def _full_path(lora_name: str) -> str:
    fp = folder_paths()
    if fp is not None:
        path = fp.get_full_path("loras", lora_name)
        if path:
            return path
    if os.path.isfile(lora_name):  # outside ComfyUI (tests, scripts): a path
        return os.path.abspath(lora_name)
    from ..pipeline.local.lora import LoraError

    raise LoraError(lora_name, "not found in ComfyUI's loras folder; put the file in models/loras and refresh")


class SDXLCNLoraLoader:
    DESCRIPTION = ("Adds a LoRA (kohya/A1111 or diffusers SDXL LoRA) at a strength to the pipeline. "
                   "Chain several; switching LoRAs or strengths between runs does not reload the model.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("SDXLCN_PIPELINE",)
    RETURN_NAMES = ("pipeline",)
    OUTPUT_TOOLTIPS = ("The same pipeline with this LoRA added to its LoRA list.",)
    FUNCTION = "add_lora"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "pipeline": ("SDXLCN_PIPELINE", {"tooltip": "From Load SDXL ControlNet Pipeline or another LoRA node."}),
                "lora_name": (_lora_names(), {"tooltip": "A LoRA file from models/loras (SDXL LoRAs only)."}),
                "strength": ("FLOAT", {"default": 1.0, "min": -4.0, "max": 4.0, "step": 0.05,
                                       "tooltip": "LoRA scale (fal's loras[].scale): 0 turns it off, 1 is full strength."}),
            },
            "optional": {
                "allow_pickle": ("BOOLEAN", {"default": False, "tooltip": (
                    "Accept a .pt/.bin/.ckpt LoRA (pickle files can run code when read; they are then read with "
                    "torch.load(weights_only=True)). Off: only .safetensors LoRAs.")}),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, lora_name, allow_pickle=False):
        """Before the graph runs (so before the pipeline loads): the file is there and its header is a LoRA's."""
        from ..pipeline.local.lora import LoraError, check_lora_file

        try:
            check_lora_file(_full_path(lora_name), lora_name, bool(allow_pickle))
        except LoraError as exc:
            return str(exc)
        return True

    def add_lora(self, pipeline, lora_name, strength=1.0, allow_pickle=False):
        from ..pipeline.local.lora_fused import preload

        from .from_comfy_node import SOURCE

        if pipeline.source.get("from") == SOURCE:
            raise ValueError("pipeline: this pipeline runs on ComfyUI's own models; add LoRAs with ComfyUI's 'Load "
                             "LoRA' between Load Checkpoint and 'SDXL ControlNet Pipeline from ComfyUI Models' "
                             "(its strength_model and strength_clip), not with this node")
        path = _full_path(lora_name)
        preload(pipeline.get_pipe(), path, allow_pickle=bool(allow_pickle))  # read once now, so a bad file fails here
        return (pipeline.with_lora(LoraSpec(path, float(strength))),)
