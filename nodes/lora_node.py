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


PICKLE_ENV = "SDXLCN_ALLOW_PICKLE"


def server_allows_pickle() -> bool:
    """Whoever starts ComfyUI opts in to pickle LoRAs (``SDXLCN_ALLOW_PICKLE=1`` in its environment); no workflow
    can, since a shared workflow would otherwise make the server unpickle a file."""
    return os.environ.get(PICKLE_ENV) == "1"


def _allow_pickle(lora_name: str, path: str, widget: bool) -> bool:
    """Whether this LoRA may be read as a pickle: the node's ``allow_pickle`` and the server's opt-in together. A
    pickle asked for without the server's opt-in is refused here, with what to do."""
    from ..pipeline.local.lora.adapters import LoraError, is_safetensors

    if is_safetensors(path) or not widget:
        return False  # safetensors need no opt-in; without the widget the library refuses a pickle itself
    if not server_allows_pickle():
        raise LoraError(lora_name, f"is a pickle file; allow_pickle on this node is not enough: pickle LoRAs are read "
                                   f"only when ComfyUI was started with {PICKLE_ENV}=1 in its environment (a "
                                   "server-side choice no workflow can make). Better: use a .safetensors version")
    return True


def _full_path(lora_name: str) -> str:
    fp = folder_paths()
    if fp is not None:
        path = fp.get_full_path("loras", lora_name)
        if path:
            return path
    elif os.path.isfile(lora_name):  # outside ComfyUI (tests, scripts): a path; inside, only the loras folders
        return os.path.abspath(lora_name)
    from ..pipeline.local.lora.adapters import LoraError

    raise LoraError(lora_name, "not found in ComfyUI's loras folder; put the file in models/loras and refresh")


class SDXLCNLoraLoader:
    DESCRIPTION = ("Adds a LoRA (kohya/A1111 or diffusers SDXL LoRA) at a strength to the pipeline. "
                   "Chain several; switching LoRAs or strengths between runs does not reload the model.")
    CATEGORY = f"{CATEGORY}/loaders"  # beside the pipeline loader: every node sits in a group under one root
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
                    "Accept a .pt/.bin/.ckpt LoRA, only if ComfyUI was also started with SDXLCN_ALLOW_PICKLE=1 (pickle "
                    "files can run code when read: the server decides, not a workflow; read with "
                    "torch.load(weights_only=True), torch 2.6 or newer). Off: only .safetensors LoRAs.")}),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, lora_name):
        """Before the graph runs (so before the pipeline loads): the file is there and its header is a LoRA's. It
        takes only ``lora_name``, as ComfyUI pins what it returns to every argument it takes. A pickle is refused
        here unless the server opted in; with the opt-in it is read, or refused for this node's ``allow_pickle``, when
        the node runs."""
        from ..pipeline.local.lora.adapters import LoraError, check_lora_file, is_safetensors

        try:
            path = _full_path(lora_name)
            if is_safetensors(path) or not server_allows_pickle():
                check_lora_file(path, lora_name)
        except LoraError as exc:
            return str(exc)
        return True

    def add_lora(self, pipeline, lora_name, strength=1.0, allow_pickle=False):
        from ..pipeline.local.lora.fused import preload

        from .from_comfy_node import SOURCE

        if pipeline.source.get("from") == SOURCE:
            raise ValueError("pipeline: this pipeline runs on ComfyUI's own models; add LoRAs with ComfyUI's 'Load "
                             "LoRA' between Load Checkpoint and 'SDXL ControlNet Pipeline from ComfyUI Models' "
                             "(its strength_model and strength_clip), not with this node")
        path = _full_path(lora_name)
        pickle_ok = _allow_pickle(lora_name, path, bool(allow_pickle))
        preload(pipeline.get_pipe(), path, allow_pickle=pickle_ok)  # read once now, so a bad file fails here
        return (pipeline.with_lora(LoraSpec(path, float(strength))),)
