"""A diffusers SDXL ControlNet img2img pipeline whose UNet and ControlNet are empty skeletons on the ``meta`` device.

Built for weights that live elsewhere (a host application's loaded models): the caller puts the real leaf modules
into the skeletons (``graft_leaves``) and does the text encoding and the VAE work itself (``generate``'s
``codec``). Nothing here reads a weight or allocates one: at full SDXL size the skeletons take about 0.1 s.

The shapes come from an LDM-style ("SGM", the original Stability layout) UNet config, the form in which SDXL's
own configs and ComfyUI describe a UNet, turned into diffusers' names on top of the bundled SDXL configs (so every
other setting is SDXL base 1.0's). The skeleton models report a *compute* device and dtype set by the caller,
because the weights grafted into them may be stored in another dtype (fp8 storage computed in fp16, say) or kept
on the CPU and moved per layer (a low-VRAM mode): diffusers reads ``unet.dtype``, ``controlnet.dtype`` and the
pipeline's ``_execution_device`` to decide where and in what dtype to compute.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from ...errors import ModelLoadError
from .sdxl_config import CONTROLNET_SDXL_CONFIG, SDXL_BASE_CONFIG

_classes: dict = {}


class SkeletonError(ModelLoadError):
    """The model cannot be described as an SDXL UNet / ControlNet."""


def _per_level(values: list, counts: list, what: str) -> list:
    """One value per UNet level from an LDM per-res-block list (diffusers has one value per level)."""
    out, i = [], 0
    for n in counts:
        level = list(values[i:i + n])
        if len(set(level)) != 1:
            raise SkeletonError(f"the UNet's {what} differs inside one level ({level}): not an SDXL-style UNet")
        out.append(level[0])
        i += n
    return out


def _res_blocks(ldm: dict) -> list[int]:
    res = ldm["num_res_blocks"]
    return [res] * len(ldm["channel_mult"]) if isinstance(res, int) else list(res)


def level_depths(ldm: dict) -> list[int]:
    """Transformer layers per UNet level (diffusers' ``transformer_layers_per_block``, 0 for a level without
    attention) of an LDM config's per-res-block ``transformer_depth``."""
    return _per_level(list(ldm["transformer_depth"]), _res_blocks(ldm), "transformer depth")


def _layers_per_block(depths: list[int]) -> list[int]:
    """diffusers' ``transformer_layers_per_block``: a level without attention still says 1 (it builds none)."""
    return [max(d, 1) for d in depths]


def unet_config_from_ldm(ldm: dict, addition_time_embed_dim: int) -> dict:
    """The diffusers ``UNet2DConditionModel`` config of an SDXL-style LDM UNet config.

    ``ldm`` has the LDM keys (``model_channels``, ``channel_mult``, ``num_res_blocks``, ``transformer_depth``,
    ``transformer_depth_middle``, ``transformer_depth_output``, ``context_dim``, ``adm_in_channels``,
    ``num_head_channels`` or ``num_heads``, ``in_channels``, ``out_channels``, ``use_linear_in_transformer``).
    ``addition_time_embed_dim`` is the width of each of the six size/crop embeddings (SDXL: 256)."""
    try:
        res = _res_blocks(ldm)
        channels = [ldm["model_channels"] * m for m in ldm["channel_mult"]]
        depth = level_depths(ldm)
        out_depth = _per_level(list(ldm["transformer_depth_output"]), [r + 1 for r in res], "output transformer depth")
        if out_depth != depth:
            raise SkeletonError(f"the UNet's output transformer depths {out_depth} differ from its input ones {depth}")
        head_channels, heads = ldm.get("num_head_channels", -1), ldm.get("num_heads", -1)
        if head_channels and head_channels > 0:
            if any(c % head_channels for c in channels):
                raise SkeletonError(f"the UNet's {head_channels} channels per attention head do not divide its "
                                    f"{channels} channels")
            attention_heads = [c // head_channels for c in channels]
        elif heads and heads > 0:
            attention_heads = [heads] * len(channels)
        else:
            raise SkeletonError("the UNet config gives neither num_head_channels nor num_heads")
        config = {
            "in_channels": ldm["in_channels"],
            "out_channels": ldm["out_channels"],
            "block_out_channels": channels,
            "layers_per_block": res[0],
            "down_block_types": ["CrossAttnDownBlock2D" if d else "DownBlock2D" for d in depth],
            "up_block_types": ["CrossAttnUpBlock2D" if d else "UpBlock2D" for d in reversed(depth)],
            "transformer_layers_per_block": _layers_per_block(depth),
            "attention_head_dim": attention_heads,
            "cross_attention_dim": ldm["context_dim"],
            "projection_class_embeddings_input_dim": ldm["adm_in_channels"],
            "addition_time_embed_dim": addition_time_embed_dim,
            "use_linear_projection": bool(ldm.get("use_linear_in_transformer", True)),
        }
        middle = ldm.get("transformer_depth_middle", depth[-1])
    except (KeyError, TypeError) as exc:
        raise SkeletonError(f"the UNet config lacks what an SDXL UNet has ({exc})") from exc
    if len(set(res)) != 1:
        raise SkeletonError(f"the UNet has {res} res blocks per level: diffusers' UNet needs one number")
    if middle != config["transformer_layers_per_block"][-1]:
        raise SkeletonError(f"the UNet's middle block has {middle} transformer layers, its deepest level "
                            f"{config['transformer_layers_per_block'][-1]}: not an SDXL-style UNet")
    base = json.loads((SDXL_BASE_CONFIG / "unet" / "config.json").read_text(encoding="utf-8"))
    return {**base, **config}


def controlnet_config_from_unet(unet_config: dict, conditioning_channels: list[int],
                                depths: list[int] | None = None, middle: int | None = None) -> dict:
    """The diffusers ``ControlNetModel`` config mirroring ``unet_config``'s down path, with the given hint-encoder
    channels (SDXL: 16, 32, 96, 256).

    ``depths`` (transformer layers per level, 0 for a level without attention) and ``middle`` (its middle block's)
    describe a ControlNet whose attention differs from its UNet's: diffusers' ``controlnet-canny-sdxl-1.0-mid`` has
    attention only in its deepest level and middle block (1 layer each), ``-small`` has none but an empty middle
    transformer (its projections, 0 layers). Its down block types then follow its own depths."""
    base = json.loads((CONTROLNET_SDXL_CONFIG / "config.json").read_text(encoding="utf-8"))
    shared = ("in_channels", "block_out_channels", "layers_per_block", "down_block_types", "attention_head_dim",
              "cross_attention_dim", "projection_class_embeddings_input_dim", "addition_time_embed_dim",
              "use_linear_projection", "transformer_layers_per_block")
    config = {**base, **{k: unet_config[k] for k in shared}}
    config["conditioning_embedding_out_channels"] = list(conditioning_channels)
    if depths is None:
        return config
    depths = list(depths)
    middle = depths[-1] if middle is None else middle
    if len(depths) != len(unet_config["block_out_channels"]):
        raise SkeletonError(f"the ControlNet has {len(depths)} levels, its UNet {len(unet_config['block_out_channels'])}")
    if middle < 0:
        raise SkeletonError("the ControlNet's middle block has no attention block: diffusers' SDXL ControlNet "
                            "cannot describe it")
    if depths[-1] and middle != depths[-1]:
        raise SkeletonError(f"the ControlNet's middle block has {middle} transformer layers, its deepest level "
                            f"{depths[-1]}: diffusers' ControlNet has one number for both")
    layers = _layers_per_block(depths)
    layers[-1] = middle  # diffusers' middle block takes the deepest level's number; 0 builds only its projections
    config["down_block_types"] = ["CrossAttnDownBlock2D" if d else "DownBlock2D" for d in depths]
    config["transformer_layers_per_block"] = layers
    return config


def _skeleton_classes():
    """Subclasses that report the compute device / dtype the caller sets (diffusers' own read the parameters)."""
    if _classes:
        return _classes
    import torch
    from diffusers import ControlNetModel, StableDiffusionXLControlNetImg2ImgPipeline, UNet2DConditionModel

    class ComputeDtype:
        compute_dtype = None

        @property
        def dtype(self):
            return self.compute_dtype if self.compute_dtype is not None else super().dtype

    class SkeletonUNet(ComputeDtype, UNet2DConditionModel):
        pass

    class SkeletonControlNet(ComputeDtype, ControlNetModel):
        """Computes in its own dtype and answers in its caller's, as a host's ControlNet does when its dtype
        differs from the UNet's."""

        def forward(self, sample, timestep, encoder_hidden_states, controlnet_cond, *args, **kwargs):
            dtype = self.dtype
            cast = lambda t: t.to(dtype) if torch.is_tensor(t) and t.is_floating_point() else t  # noqa: E731
            added = kwargs.get("added_cond_kwargs")
            if added:
                kwargs["added_cond_kwargs"] = {k: cast(v) for k, v in added.items()}
            out = super().forward(cast(sample), timestep, cast(encoder_hidden_states), cast(controlnet_cond),
                                  *args, **kwargs)
            if sample.dtype == dtype:
                return out
            down, mid = (out.down_block_res_samples, out.mid_block_res_sample) if hasattr(out, "mid_block_res_sample") \
                else out
            down = tuple(d.to(sample.dtype) for d in down)
            mid = mid.to(sample.dtype)
            return (down, mid) if isinstance(out, tuple) else type(out)(down_block_res_samples=down,
                                                                        mid_block_res_sample=mid)

    class SkeletonPipeline(StableDiffusionXLControlNetImg2ImgPipeline):
        """Computes on the device the caller sets (the VAE here is a config-only skeleton on ``meta``)."""

        compute_device = None
        codec = None  # the generate.Codec that encodes and decodes for it, set by the caller

        @property
        def _execution_device(self):
            return self.compute_device if self.compute_device is not None else super()._execution_device

    _classes.update(unet=SkeletonUNet, controlnet=SkeletonControlNet, pipeline=SkeletonPipeline)
    return _classes


@dataclass
class Skeleton:
    pipe: object  # the SkeletonPipeline
    unet: object
    controlnet: object

    def set_compute(self, device, unet_dtype, controlnet_dtype=None) -> None:
        """Where and in what dtype the grafted models compute."""
        import torch

        self.pipe.compute_device = torch.device(device)
        self.unet.compute_dtype = unet_dtype
        self.controlnet.compute_dtype = controlnet_dtype or unet_dtype


def build_skeleton(unet_config: dict, controlnet_config: dict, vae_config: dict | None = None) -> Skeleton:
    """The pipeline with UNet, ControlNet and VAE on ``meta`` (no memory), no text encoders or tokenizers (the
    caller passes prompt embeddings), and SDXL's Euler scheduler."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler

    classes = _skeleton_classes()
    if vae_config is None:
        vae_config = AutoencoderKL.load_config(SDXL_BASE_CONFIG / "vae")
    with torch.device("meta"):
        unet = classes["unet"].from_config(unet_config)
        controlnet = classes["controlnet"].from_config(controlnet_config)
        vae = AutoencoderKL.from_config(vae_config)
    scheduler = EulerDiscreteScheduler.from_pretrained(SDXL_BASE_CONFIG, subfolder="scheduler")
    pipe = classes["pipeline"](vae=vae, text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None,
                               unet=unet, controlnet=controlnet, scheduler=scheduler)
    for model in (unet, controlnet, vae):
        model.eval().requires_grad_(False)
    return Skeleton(pipe, unet, controlnet)


def leaf_modules(model) -> dict:
    """``{dotted name: module}`` of the modules that hold parameters themselves (what gets grafted)."""
    return {name: m for name, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))}


def graft_leaves(model, leaves: dict) -> None:
    """Put each ``{dotted name: module}`` into ``model`` in place of its skeleton leaf."""
    for name, module in leaves.items():
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, module)  # a Module attribute, or a ModuleList/Sequential entry ("0", "1", ...)


def still_empty(model) -> list[str]:
    """Names of the parameters and buffers still on ``meta`` (leaves nobody grafted)."""
    return [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.device.type == "meta"]
