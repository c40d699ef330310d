"""Our diffusers pipeline on ComfyUI's own loaded models: diffusers skeletons with ComfyUI's modules grafted in.

The UNet and ControlNet skeletons (``pipeline/local/models/skeleton.py``, on ``meta``) get ComfyUI's own leaf modules
(its ``comfy.ops`` Linear / Conv2d / GroupNorm / LayerNorm objects) in place of theirs, found through ComfyUI's own
LDM -> diffusers name map (``comfy.utils.unet_to_diffusers``). Nothing is copied, moved or cast: ComfyUI's LoRA
patches, its low-VRAM mode (weights cast per layer inside ``comfy.ops``), fp8 storage and its model moves all act
on the very modules the diffusers code calls. Sharing Parameters instead would silently lose LoRA: ComfyUI applies
a LoRA by *replacing* a module's Parameter. Facts and measurements: ``shared/COMFY_SHARED_WEIGHTS.md``.

Imported lazily, and only inside ComfyUI.
"""

from __future__ import annotations

from dataclasses import dataclass

from .comfy_hooks import log

_warned: set = set()
# ComfyUI's model classes by the names users know them by (the rest are named by their class)
_FAMILIES = {"BaseModel": "SD 1.x/2.x", "SD21UNCLIP": "SD 2.1 unCLIP", "SDXLRefiner": "SDXL refiner", "SD3": "SD3",
             "Flux": "Flux", "AuraFlow": "AuraFlow", "HunyuanDiT": "Hunyuan-DiT", "PixArt": "PixArt",
             "StableCascade_C": "Stable Cascade", "SVD_img2vid": "Stable Video Diffusion"}


class NotGraftable(ValueError):
    """An input that this path cannot run, with what to connect instead."""


# --- what the inputs must be ------------------------------------------------------------------------------------

def check_model(model):
    """ComfyUI's SDXL base-type ``MODEL`` (epsilon prediction), or a clear refusal."""
    import comfy.model_base as mb  # type: ignore

    base = getattr(model, "model", None)
    if base is None or not hasattr(model, "model_options"):
        raise NotGraftable("model: connect a MODEL output (e.g. Load Checkpoint's)")
    if not isinstance(base, mb.SDXL):
        family = _FAMILIES.get(type(base).__name__, type(base).__name__)
        raise NotGraftable(f"model: this MODEL is {family}, not SDXL. This node runs SDXL base-type checkpoints "
                           "only; use ComfyUI's KSampler for other model families")
    kind = getattr(base.model_type, "name", str(base.model_type))
    if kind != "EPS":
        raise NotGraftable(f"model: this SDXL checkpoint predicts {kind} (e.g. Playground v2.5 is EDM); only "
                           "epsilon-prediction SDXL checkpoints run on this path. Use ComfyUI's KSampler for it")
    return base


def check_controlnet(control_net):
    """A full SDXL ControlNet (``comfy.controlnet.ControlNet``), or a clear refusal naming what it is."""
    import comfy.controlnet as cn  # type: ignore

    if isinstance(control_net, cn.ControlLora):
        raise NotGraftable("control_net: this is a Control-LoRA; load a full SDXL ControlNet (e.g. "
                           "diffusers/controlnet-canny-sdxl-1.0) with Load ControlNet Model")
    if type(control_net) is not cn.ControlNet or getattr(control_net, "control_model", None) is None:
        raise NotGraftable(f"control_net: a {type(control_net).__name__} is not a full SDXL ControlNet; load one "
                           "(e.g. diffusers/controlnet-canny-sdxl-1.0) with Load ControlNet Model")
    model = control_net.control_model
    if getattr(model, "task_embedding", None) is not None:
        raise NotGraftable("control_net: this is a ControlNet Union; load a single-task SDXL Canny ControlNet "
                           "(e.g. diffusers/controlnet-canny-sdxl-1.0) with Load ControlNet Model")
    if not hasattr(model, "label_emb"):
        raise NotGraftable("control_net: this ControlNet has no SDXL size/text conditioning (an SD 1.x/2.x "
                           "ControlNet?); load an SDXL ControlNet")
    return model


def check_clip_vae(clip, vae) -> None:
    inner = getattr(clip, "cond_stage_model", None)
    if inner is None or not (hasattr(inner, "clip_l") and hasattr(inner, "clip_g")):
        raise NotGraftable("clip: connect the SDXL checkpoint's CLIP (CLIP-L + CLIP-G), e.g. from Load Checkpoint")
    if getattr(vae, "first_stage_model", None) is None or getattr(vae, "latent_channels", 4) != 4:
        raise NotGraftable("vae: connect an SDXL VAE (4 latent channels), e.g. the checkpoint's from Load Checkpoint")


def comfy_only_patches(model) -> list[str]:
    """What ComfyUI would apply inside its own sampler and this path cannot (attention/block patches, wrappers,
    CFG functions, object patches): named for a warning. Weight patches (LoRA) are not here: they do apply."""
    found = []
    options = getattr(model, "model_options", {}) or {}
    transformer = options.get("transformer_options", {}) or {}
    for group in ("patches", "patches_replace"):
        found += [f"{name} ({group})" for name, value in (transformer.get(group) or {}).items() if value]
    found += [name for name in options if name.startswith("sampler_") or name.endswith("_wrapper")
              or name in ("model_function_wrapper", "denoise_mask_function")]
    found += [f"{name} (object patch)" for name in (getattr(model, "object_patches", {}) or {})]
    found += [f"{name} (wrapper)" for name, value in (getattr(model, "wrappers", {}) or {}).items() if value]
    return found


def warn_comfy_only_patches(model) -> None:
    names = comfy_only_patches(model)
    key = tuple(names)
    if names and key not in _warned:
        _warned.add(key)
        log.warning("SDXL ControlNet from ComfyUI models: these MODEL patches act only inside ComfyUI's own sampler "
                    "and are NOT applied here: %s (weight patches such as LoRA do apply)", ", ".join(names))


# --- the name maps ------------------------------------------------------------------------------------------------

def _res_block_depths(blocks) -> list[int]:
    """Transformer layers of each res block of an LDM ``input_blocks`` list (downsample blocks skipped)."""
    depths = []
    for block in list(blocks)[1:]:
        if type(block[0]).__name__ == "Downsample":
            continue
        st = [m for m in block if hasattr(m, "transformer_blocks")]
        depths.append(len(st[0].transformer_blocks) if st else 0)
    return depths


def controlnet_ldm_config(unet_config: dict, control_model) -> dict:
    """The UNet's LDM config with the ControlNet's own transformer depths, read from its modules: the smaller SDXL
    ControlNets have fewer (diffusers' -mid: attention only in the deepest level and the middle; -small: none, and
    a middle transformer of 0 layers). -1 for a middle block without a transformer."""
    config = dict(unet_config)
    config["transformer_depth"] = _res_block_depths(control_model.input_blocks)
    st = [m for m in control_model.middle_block if hasattr(m, "transformer_blocks")]
    config["transformer_depth_middle"] = len(st[0].transformer_blocks) if st else -1
    return config


def _hint_convs(control_model) -> list:
    import torch

    return [i for i, m in enumerate(control_model.input_hint_block) if isinstance(m, torch.nn.Conv2d)]


def hint_channels(control_model) -> list[int]:
    """diffusers' ``conditioning_embedding_out_channels`` of an LDM ControlNet's hint encoder."""
    block, convs = control_model.input_hint_block, _hint_convs(control_model)
    return [block[convs[0]].out_channels] + [block[i].out_channels for i in convs[2:-1:2]]


def controlnet_name_map(ldm_config: dict, control_model) -> dict:
    """diffusers ControlNet parameter name -> LDM (ComfyUI) name."""
    import comfy.utils  # type: ignore

    names = dict(comfy.utils.unet_to_diffusers(ldm_config))
    for i in range(len(control_model.zero_convs)):
        for s in ("weight", "bias"):
            names[f"controlnet_down_blocks.{i}.{s}"] = f"zero_convs.{i}.0.{s}"
    convs = _hint_convs(control_model)
    hint = ["controlnet_cond_embedding.conv_in"] + [f"controlnet_cond_embedding.blocks.{k}"
                                                    for k in range(len(convs) - 2)]
    hint.append("controlnet_cond_embedding.conv_out")
    for name, index in zip(hint, convs):
        for s in ("weight", "bias"):
            names[f"{name}.{s}"] = f"input_hint_block.{index}.{s}"
    for s in ("weight", "bias"):
        names[f"controlnet_mid_block.{s}"] = f"middle_block_out.0.{s}"
    return names


# --- grafting -----------------------------------------------------------------------------------------------------

def graft(skeleton_model, comfy_model, names: dict, what: str) -> int:
    """Put ``comfy_model``'s leaf modules into ``skeleton_model`` (names: diffusers param -> LDM param).
    Returns how many leaves were grafted; refuses a leaf that is missing, of another kind or another shape."""
    import torch

    from ..pipeline.local.models.skeleton import graft_leaves, leaf_modules, still_empty

    leaves = {}
    for name, leaf in leaf_modules(skeleton_model).items():
        param = "weight" if getattr(leaf, "weight", None) is not None else "bias"
        target = names.get(f"{name}.{param}")
        target = target.rsplit(".", 1)[0] if target else None  # the layer's name (without .weight)
        try:
            theirs = comfy_model.get_submodule(target) if target else None
        except AttributeError:
            theirs = None
        if theirs is None:
            raise NotGraftable(f"{what}: has no layer for diffusers' {name}: not a standard SDXL {what} layout")
        base = next(c for c in type(leaf).__mro__ if c.__module__.startswith("torch.nn"))
        if not isinstance(theirs, base):
            raise NotGraftable(f"{what}: layer {target} is a {type(theirs).__name__}, not a {base.__name__} "
                               "(quantized or custom layers cannot run in diffusers); load the checkpoint without "
                               "quantization or use ComfyUI's own samplers")
        mine, theirs_w = getattr(leaf, param), getattr(theirs, param, None)
        if theirs_w is None or tuple(mine.shape) != tuple(theirs_w.shape):
            shape = None if theirs_w is None else tuple(theirs_w.shape)
            raise NotGraftable(f"{what}: layer {target} has shape {shape}, an SDXL {what} has {tuple(mine.shape)} "
                               f"at {name}: not a standard SDXL {what}")
        leaves[name] = theirs
    with torch.no_grad():
        graft_leaves(skeleton_model, leaves)
    empty = still_empty(skeleton_model)
    if empty:
        raise NotGraftable(f"{what}: {len(empty)} tensors found no ComfyUI counterpart (first: {empty[0]})")
    return len(leaves)


@dataclass
class ComfyModels:
    """What a pipeline on ComfyUI's models runs with: the MODEL (the clone whose LoRA set applies), the
    ControlNet and their patchers (what ComfyUI loads before each denoise)."""

    model: object
    clip: object
    vae: object
    control_net: object

    def patchers(self) -> list:
        return [self.model, self.control_net.control_model_wrapped]


def build_grafted_pipeline(model, clip, vae, control_net):
    """The skeleton pipeline with ComfyUI's UNet and ControlNet modules grafted in and a codec that encodes with
    ComfyUI's CLIP and VAE and loads the models through ComfyUI before each denoise."""
    import time

    import comfy.utils  # type: ignore

    from ..pipeline.local.models.skeleton import (
        SkeletonError,
        build_skeleton,
        controlnet_config_from_unet,
        level_depths,
        unet_config_from_ldm,
    )
    from .comfy_codec import ComfyCodec

    t = time.perf_counter()
    base = check_model(model)
    control_model = check_controlnet(control_net)
    check_clip_vae(clip, vae)
    ldm = dict(base.model_config.unet_config)
    time_dim = int(getattr(getattr(base, "embedder", None), "dim", 256))
    unet_config = unet_config_from_ldm(ldm, time_dim)
    cn_ldm = controlnet_ldm_config(ldm, control_model)
    try:
        cn_config = controlnet_config_from_unet(unet_config, hint_channels(control_model), level_depths(cn_ldm),
                                                cn_ldm["transformer_depth_middle"])
    except SkeletonError as exc:
        raise NotGraftable(f"control_net: {exc}; load a full SDXL ControlNet") from None
    skeleton = build_skeleton(unet_config, cn_config)
    n_unet = graft(skeleton.unet, base.diffusion_model, comfy.utils.unet_to_diffusers(ldm), "model")
    n_cn = graft(skeleton.controlnet, control_model, controlnet_name_map(cn_ldm, control_model), "control_net")
    models = ComfyModels(model, clip, vae, control_net)
    unet_dtype = base.manual_cast_dtype or base.get_dtype()
    cn_dtype = control_net.manual_cast_dtype or control_model.dtype
    skeleton.set_compute(model.load_device, unet_dtype, cn_dtype)
    skeleton.pipe.codec = ComfyCodec(models, skeleton)
    log.info("SDXL ControlNet from ComfyUI models: %d UNet and %d ControlNet layers grafted in %.2f s (no copies); "
             "computing on %s in %s", n_unet, n_cn, time.perf_counter() - t, model.load_device, unet_dtype)
    warn_comfy_only_patches(model)
    return skeleton.pipe

