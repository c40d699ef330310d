"""Text encoding, VAE and model loading by ComfyUI for a pipeline on ComfyUI's own models (``generate``'s codec).

Prompts go through ComfyUI's ``CLIP`` (its tokenizer, prompt-weighting syntax and long-prompt chunking apply, and
a LoRA loaded on the CLIP too); images through ComfyUI's ``VAE`` (its own memory handling and tiled fallback).
Before each denoise ComfyUI loads the UNet and ControlNet with our working-memory estimate, so its memory modes,
eviction and "Unload models" govern them exactly as for its own samplers. Imported lazily, inside ComfyUI only.
"""

from __future__ import annotations


class ComfyCodec:
    def __init__(self, models, skeleton):
        self.models = models  # comfy_graft.ComfyModels
        self.skeleton = skeleton
        self.latent_format = models.model.model.latent_format

    @property
    def device(self):
        return self.skeleton.pipe.compute_device

    @property
    def dtype(self):
        return self.skeleton.unet.dtype

    def encode_text(self, text: str):
        import torch

        clip = self.models.clip
        with torch.no_grad():
            cond, pooled = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)
        width = self.skeleton.unet.config.cross_attention_dim
        if cond.shape[-1] != width:
            raise ValueError(f"clip: its embeddings are {cond.shape[-1]} wide, this SDXL UNet takes {width}: connect "
                             "the CLIP of the same checkpoint as the MODEL")
        return cond.to(self.device, self.dtype), pooled.to(self.device, self.dtype)

    def encode_image(self, image):
        import numpy as np
        import torch

        pixels = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0)[None]
        with torch.no_grad():
            latents = self.models.vae.encode(pixels)
        return self.latent_format.process_in(latents.float()).to(self.device, self.dtype)

    def before_denoise(self, width: int, height: int) -> None:
        import comfy.model_management as mm  # type: ignore

        from ..pipeline.local.memory.plan import denoise_bytes

        mm.load_models_gpu(self.models.patchers(), memory_required=denoise_bytes(width, height))

    def decode(self, latents) -> list:
        import numpy as np
        import torch
        from PIL import Image

        with torch.no_grad():
            images = self.models.vae.decode(self.latent_format.process_out(latents.float()))
        images = images.reshape(-1, *images.shape[-3:]).float().cpu().numpy()
        return [Image.fromarray((np.clip(i, 0, 1) * 255).round().astype("uint8")) for i in images]
