"""``SDXLCNLoader``: SDXL base + Canny ControlNet -> a cached diffusers pipeline (``SDXLCN_PIPELINE``)."""

from __future__ import annotations

from ..pipeline.handle import PipelineHandle
from ..pipeline.local.devices import MEMORY_MODES
from .comfy_hooks import CATEGORY, free_comfy_memory, log
from .model_folders import checkpoint_choices, controlnet_choices, resolve, vae_choices

DTYPES = ["auto", "fp16", "bf16", "fp32"]
DEVICES = ["auto", "cuda", "mps", "cpu"]
ATTENTION = ["sdpa", "classic"]


class SDXLCNLoader:
    DESCRIPTION = ("Loads SDXL (a single .safetensors from models/checkpoints or a diffusers folder from "
                   "models/diffusers) with an SDXL Canny ControlNet (file or folder in models/controlnet). "
                   "The pipeline is cached: re-running with the same choices does not reload.")
    CATEGORY = f"{CATEGORY}/loaders"
    RETURN_TYPES = ("SDXLCN_PIPELINE",)
    RETURN_NAMES = ("pipeline",)
    OUTPUT_TOOLTIPS = ("The loaded pipeline, for LoRA nodes and the sampler.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "checkpoint": (checkpoint_choices(), {"tooltip": "SDXL base: a single file (models/checkpoints) or a diffusers folder (models/diffusers)."}),
                "controlnet": (controlnet_choices(), {"tooltip": "SDXL Canny ControlNet: a file or diffusers folder in models/controlnet."}),
                "dtype": (DTYPES, {"default": "auto", "tooltip": "Weights precision. auto: bf16/fp16 on CUDA, fp16 on Apple MPS, fp32 on CPU."}),
                "memory_mode": (list(MEMORY_MODES), {"default": "none", "tooltip": "none: all on the GPU (fastest, ~10 GB at fp16). "
                                               "model_cpu_offload: one model on the GPU at a time (8 GB cards). "
                                               "sequential_cpu_offload: smallest memory, much slower."}),
                "vae_tiling": ("BOOLEAN", {"default": False, "tooltip": "Decode in tiles: less memory for large images, slightly slower."}),
            },
            "optional": {
                "device": (DEVICES, {"default": "auto", "tooltip": "Where to run. auto picks CUDA, then MPS, then CPU."}),
                "vae": (vae_choices(), {"default": "none", "tooltip": "Optional replacement VAE, e.g. sdxl-vae-fp16-fix, so fp16 decoding needs no upcast."}),
                "compile": ("BOOLEAN", {"default": False, "tooltip": "torch.compile the UNet and ControlNet (CUDA): slow first run, faster after."}),
                "attention": (ATTENTION, {"default": "sdpa", "tooltip": "sdpa: PyTorch scaled-dot-product attention (fast). classic: plain attention."}),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, checkpoint, controlnet, device="auto", vae="none"):
        """Before the graph runs: the files are there and their headers are an SDXL base and an SDXL ControlNet,
        and the device is usable, so a bad choice is refused without a long load."""
        from ..pipeline.errors import SDXLCNError
        from ..pipeline.local.loading import LoadOptions, check_sources

        try:
            vae_path = None if vae in (None, "", "none") else resolve("vae", vae)
            check_sources(resolve("checkpoint", checkpoint), resolve("controlnet", controlnet),
                          LoadOptions(device=None if device == "auto" else device, vae=vae_path))
        except (SDXLCNError, FileNotFoundError) as exc:
            return str(exc)
        return True

    def load(self, checkpoint, controlnet, dtype="auto", memory_mode="none", vae_tiling=False,
             device="auto", vae="none", compile=False, attention="sdpa"):
        from ..pipeline.local.loading import LoadOptions, PipelineRef

        base_path = resolve("checkpoint", checkpoint)
        cn_path = resolve("controlnet", controlnet)
        vae_path = None if vae in (None, "", "none") else resolve("vae", vae)
        options = LoadOptions(
            device=None if device == "auto" else device,
            dtype=None if dtype == "auto" else dtype,
            memory_mode=memory_mode,
            vae_tiling=bool(vae_tiling),
            vae=vae_path,
            compile=bool(compile),
            attention=attention,
        )
        log.info("SDXLCNLoader: %s + %s (%s)", checkpoint, controlnet, options)
        # the value passed on holds no weights: old values in ComfyUI's cache keep nothing alive
        ref = PipelineRef(base_path, cn_path, options, before_load=free_comfy_memory)
        ref.get()  # load now, so errors and load time show on this node
        return (PipelineHandle(ref=ref, source={"checkpoint": checkpoint, "controlnet": controlnet,
                                                "dtype": dtype, "memory_mode": memory_mode}),)
