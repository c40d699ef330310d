"""``SDXLCNLoader``: SDXL base + Canny ControlNet -> a cached diffusers pipeline (``SDXLCN_PIPELINE``)."""

from __future__ import annotations

from ..pipeline.handle import PipelineHandle
from ..pipeline.local.memory.choices import DEFAULT, DTYPES, DTYPES_TABLE, MEMORY_MODES, dtype_help, memory_mode_help
from .comfy_hooks import CATEGORY, log
from .model_folders import checkpoint_choices, controlnet_choices, resolve, vae_choices

DEVICES = ["auto", "cuda", "xpu", "mps", "cpu"]
ATTENTION = ["sdpa", "classic"]
# what ComfyUI adds to the choices' own help lines (choices.py)
DTYPE_NOTES = {"auto": "inside ComfyUI, what ComfyUI runs its own SDXL in (its --force-fp16/--bf16-unet/--fp32 flags apply)"}
MEMORY_NOTES = {"auto": "inside ComfyUI it follows --lowvram/--novram, else the card's total memory",
                "none": "managed by ComfyUI like its own models"}


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
                "dtype": (list(DTYPES), {"default": DEFAULT, "tooltip": dtype_help(DTYPE_NOTES)}),
                "memory_mode": (list(MEMORY_MODES), {"default": DEFAULT, "tooltip": memory_mode_help(MEMORY_NOTES)}),
                "vae_tiling": ("BOOLEAN", {"default": False, "tooltip": "Decode in tiles: less memory for large images, slightly slower."}),
            },
            "optional": {
                "device": (DEVICES, {"default": "auto", "tooltip": "Where to run. auto: ComfyUI's device (its --cpu, --directml, XPU... apply); another choice runs there, outside ComfyUI's memory management."}),
                "vae": (vae_choices(), {"default": "none", "tooltip": "Optional replacement VAE, e.g. sdxl-vae-fp16-fix, so fp16 decoding needs no upcast."}),
                "compile": ("BOOLEAN", {"default": False, "tooltip": "torch.compile the UNet and ControlNet (CUDA): slow first run, faster after."}),
                "attention": (ATTENTION, {"default": "sdpa", "tooltip": "sdpa: PyTorch scaled-dot-product attention (fast). classic: plain attention."}),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, device="auto"):
        """Before the graph runs: the device is usable here. ComfyUI pins what this returns to every argument it
        takes, and checks the lists of the inputs it does not take itself (execution.py, validate_inputs): so it takes
        only ``device``, and a missing checkpoint, ControlNet or VAE is refused by ComfyUI's own list check, once,
        on its own input, all of them in the same answer. What the files hold is checked in ``load`` before any
        weights are read."""
        from ..pipeline.errors import FieldError
        from ..pipeline.local.memory.devices import check_device

        if device in (None, "", "auto"):
            return True
        try:
            check_device(device)
        except FieldError as exc:  # ComfyUI names the input itself ("device - ..."): not said twice
            return exc.detail
        return True

    def load(self, checkpoint, controlnet, dtype="auto", memory_mode="auto", vae_tiling=False,
             device="auto", vae="none", compile=False, attention="sdpa"):
        from ..pipeline.local.models.loading import LoadOptions, PipelineRef, check_sources
        from . import comfy_memory

        base_path = resolve("checkpoint", checkpoint)
        cn_path = resolve("controlnet", controlnet)
        vae_path = None if vae in (None, "", "none") else resolve("vae", vae)
        comfy = comfy_memory.device_and_dtype()  # None outside ComfyUI
        after_load = None
        if comfy is not None and device in ("auto", comfy[0]):
            # ComfyUI's device and precision; ComfyUI places the weights (comfy_memory.adopt)
            device, auto_dtype = comfy
            dtype = auto_dtype if dtype == "auto" else dtype
            after_load = lambda pipe: comfy_memory.adopt(pipe, memory_mode)  # noqa: E731
        options = LoadOptions(
            device=None if device == "auto" else device,
            dtype=None if dtype == "auto" else dtype,
            memory_mode=memory_mode,
            vae_tiling=bool(vae_tiling),
            vae=vae_path,
            compile=bool(compile),
            attention=attention,
            host_placement=after_load is not None,
        )
        # the kind of model in each file (from headers only), so a wrong or swapped file is refused before a long load
        check_sources(base_path, cn_path, options)
        log.info("SDXLCNLoader: loading %s + %s %s", checkpoint, controlnet, in_words(options, vae))
        # the value passed on holds no weights: old values in ComfyUI's cache keep nothing alive
        ref = PipelineRef(base_path, cn_path, options, after_load=after_load)
        ref.get()  # load now, so errors and load time show on this node
        return (PipelineHandle(ref=ref, source={"checkpoint": checkpoint, "controlnet": controlnet,
                                                "dtype": str(dtype), "memory_mode": memory_mode}),)


def in_words(options, vae: str = "none") -> str:
    """How the pipeline loads, for the log line, in the node's words: the device, the precision and the memory mode,
    then only the inputs set away from their defaults (``vae`` by its name in the menu)."""
    o = options.resolved()
    dtype = str(o.dtype).removeprefix("torch.")
    dtype = next((d.name for d in DTYPES_TABLE if d.torch_name == dtype), dtype)
    words = [f"on {o.device}", dtype, f"memory mode {o.memory_mode}"]
    if o.vae_tiling:
        words.append("VAE tiling")
    if vae not in (None, "", "none"):
        words.append(f"VAE {vae}")
    if o.compile:
        words.append("torch.compile")
    if o.attention != ATTENTION[0]:
        words.append(f"{o.attention} attention")
    return ", ".join(words)
