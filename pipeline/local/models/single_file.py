"""An SDXL base single file (original SGM layout) made into the pipeline, one component at a time.

diffusers' ``from_single_file`` on the pipeline reads the whole file into memory in its stored dtype and then
converts each component, casting it to the load dtype: for a moment both copies are resident (1.6x the file's size
at full SDXL size in bf16). Here each component's converter reads only its own tensors, through a
:class:`~.lazy_checkpoint.LazyCheckpoint` that casts each tensor as it is read, so what is resident is the models
built so far plus the one being converted. The converters, configs and classes are diffusers' own (public
``from_single_file`` on each model, its CLIP converter for the text encoders).

A pickle checkpoint (read whole, with ``weights_only``) has its tensors in memory already: it goes through the
same assembly from its state dict.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

from .lazy_checkpoint import checkpoint_tensors
from .load_lock import no_random_init
from .checks import TE1_PREFIX, TE2_PREFIX, UNET_PREFIX, TensorIndex

VAE_PREFIX = "first_stage_model."


def _part(idx: TensorIndex, dtype, prefix: str):
    return checkpoint_tensors(idx, dtype, keep=lambda k: k.startswith(prefix))


def load_text_encoder_2(idx: TensorIndex, config_dir: Path, dtype):
    """The OpenCLIP bigG encoder, converted from only its own keys (so diffusers cannot mistake the first CLIP
    encoder for it when both have the same width, as in tiny test models)."""
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
    from transformers import CLIPTextModelWithProjection

    with no_random_init():
        return create_diffusers_clip_model_from_ldm(
            CLIPTextModelWithProjection, _part(idx, dtype, TE2_PREFIX), subfolder="text_encoder_2",
            config=str(config_dir), torch_dtype=dtype, local_files_only=True)


def build_from_single_file(idx: TensorIndex, config_dir: Path, dtype, **given):
    """``StableDiffusionXLControlNetImg2ImgPipeline`` from the single file ``idx`` describes and the SDXL config
    folder ``config_dir``; ``given`` components (the ControlNet, a user VAE) are used as they are."""
    import diffusers
    from diffusers import AutoencoderKL, StableDiffusionXLControlNetImg2ImgPipeline, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
    from transformers import CLIPTextModel, CLIPTokenizer

    parts = dict(given)
    common = dict(config=str(config_dir), local_files_only=True, torch_dtype=dtype)
    with no_random_init():
        if "unet" not in parts:
            parts["unet"] = UNet2DConditionModel.from_single_file(_part(idx, dtype, UNET_PREFIX), subfolder="unet",
                                                                  **common)
        if "vae" not in parts:
            parts["vae"] = AutoencoderKL.from_single_file(_part(idx, dtype, VAE_PREFIX), subfolder="vae", **common)
        if "text_encoder" not in parts:
            parts["text_encoder"] = create_diffusers_clip_model_from_ldm(
                CLIPTextModel, _part(idx, dtype, TE1_PREFIX), subfolder="text_encoder", **common)
    if "text_encoder_2" not in parts:
        parts["text_encoder_2"] = load_text_encoder_2(idx, config_dir, dtype)
    for name in ("tokenizer", "tokenizer_2"):
        parts.setdefault(name, CLIPTokenizer.from_pretrained(str(config_dir), subfolder=name))
    index = json.loads((config_dir / "model_index.json").read_text(encoding="utf-8"))
    if "scheduler" not in parts:
        scheduler_cls = getattr(diffusers, index["scheduler"][1])
        parts["scheduler"] = scheduler_cls.from_pretrained(str(config_dir), subfolder="scheduler")
    accepted = inspect.signature(StableDiffusionXLControlNetImg2ImgPipeline.__init__).parameters
    options = {k: v for k, v in index.items() if k in accepted and not k.startswith("_") and not isinstance(v, list)}
    return StableDiffusionXLControlNetImg2ImgPipeline(**parts, **options)
