"""The VAE decode's two safety nets: tiling switched on where a whole decode would not fit, and a decode that
came out NaN/inf (the stock SDXL VAE overflows in fp16) done again in fp32 instead of returning a black image."""

from __future__ import annotations

import contextlib
import logging

from .memory.devices import free_memory_bytes
from .memory.plan import needs_vae_tiling

log = logging.getLogger("sdxl_controlnet_img2img")


def vae_compute_bytes(pipe) -> int:
    """Bytes per element the VAE decodes in: 4 when diffusers upcasts an fp16 VAE (``force_upcast``)."""
    import torch

    vae = pipe.vae
    if vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
        return 4
    return vae.dtype.itemsize


@contextlib.contextmanager
def auto_vae_tiling(pipe, width: int, height: int):
    """Decode in tiles for this call when the device reports too little free memory for a whole decode
    (never on the CPU; a pipeline with tiling already on is left as it is)."""
    vae = pipe.vae
    device = str(getattr(pipe, "_execution_device", "cpu"))
    switch = False
    if not getattr(vae, "use_tiling", False) and device.startswith(("cuda", "xpu")):
        free = free_memory_bytes(device)
        switch = free is not None and needs_vae_tiling(free, width, height, vae_compute_bytes(pipe))
        if switch:
            log.info("VAE tiling on for %dx%d: a whole decode would not fit in the %.1f GiB free", width, height,
                     free / 1024**3)
            vae.enable_tiling()
    try:
        yield
    finally:
        if switch:
            vae.disable_tiling()


class LatentsKeeper:
    """A ``callback_on_step_end`` that keeps the latents of the last step (what the VAE decodes), then calls
    ``inner`` (the progress/cancel callback) if any."""

    def __init__(self, inner=None):
        self.inner = inner
        self.latents = None

    def __call__(self, pipe, step_index, timestep, callback_kwargs):
        self.latents = callback_kwargs.get("latents")
        if self.inner is not None:
            return self.inner(pipe, step_index, timestep, callback_kwargs)
        return callback_kwargs


def to_pil_checked(pipe, images, latents) -> list:
    """``images`` (the pipeline's ``np`` output, 0..1) as PIL images; when any value is NaN/inf, the final
    ``latents`` are decoded again with the VAE in fp32 (logged), so the result is never a silent black image."""
    import numpy as np

    if not np.isfinite(images).all():
        if latents is None:
            raise RuntimeError("the VAE decode gave NaN/inf values and the final latents were not kept")
        log.warning("the VAE decode gave NaN/inf values (an fp16 overflow of the SDXL VAE); decoding again in fp32. "
                    "An fp16-safe VAE (e.g. sdxl-vae-fp16-fix, the loader's 'vae' input) avoids the second decode.")
        images = decode_fp32(pipe, latents)
        if not np.isfinite(images).all():
            raise RuntimeError("the VAE decode gave NaN/inf values even in fp32: the latents themselves are not "
                               "finite (try another dtype, e.g. fp32 or bf16, on the loader)")
    return pipe.numpy_to_pil(images)


FP16_SAFE_PEAK = 2.0**13  # fp16 overflows at 65504; 8x headroom for products and sums of such activations


def fp16_safe(vae, probe: int = 16) -> bool:
    """Whether ``vae`` can decode in fp16 without overflowing, judged from its weights: the decoder runs (in fp32)
    on a fixed probe latent and its largest activation must stay below :data:`FP16_SAFE_PEAK`. The stock SDXL
    VAE's decoder has activations in the tens of thousands (hence its ``force_upcast``); fp16-fix VAEs were
    retrained to keep them small. Whatever this says, a decode that still overflows is redone in fp32."""
    import torch

    peak = 0.0

    def record(_module, _inputs, output):
        nonlocal peak
        if torch.is_tensor(output) and output.is_floating_point():
            peak = max(peak, float(output.detach().abs().amax()))

    dtype = vae.dtype
    handles = [m.register_forward_hook(record) for m in vae.decoder.modules()]
    try:
        vae.to(dtype=torch.float32)
        g = torch.Generator().manual_seed(0)
        z = torch.randn(1, vae.config.latent_channels, probe, probe, generator=g) / vae.config.scaling_factor
        with torch.no_grad():
            vae.decode(z.to(next(vae.parameters()).device), return_dict=False)
    finally:
        for h in handles:
            h.remove()
        vae.to(dtype=dtype)
    return peak < FP16_SAFE_PEAK


def decode_fp32(pipe, latents):
    """Decode ``latents`` as the pipeline does, with the VAE in fp32 for this call; returns ``np`` images.

    The latents go to the pipeline's execution device, where the VAE runs: not where its weights are kept, which
    after a model-offload run is the CPU and under sequential offload ``meta`` (accelerate's hooks bring the
    weights in for the call, cast to the fp32 the parameters now say)."""
    import torch

    vae = pipe.vae
    dtype = vae.dtype
    vae.to(dtype=torch.float32)
    try:
        with torch.no_grad():
            lat = latents.to(device=pipe._execution_device, dtype=torch.float32)
            mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
            if mean is not None and std is not None:
                mean = torch.tensor(mean).view(1, -1, 1, 1).to(lat)
                std = torch.tensor(std).view(1, -1, 1, 1).to(lat)
                lat = lat * std / vae.config.scaling_factor + mean
            else:
                lat = lat / vae.config.scaling_factor
            image = vae.decode(lat, return_dict=False)[0]
        return pipe.image_processor.postprocess(image, output_type="np")
    finally:
        vae.to(dtype=dtype)


def checked_latents(latents):
    """``latents`` when every value is finite; otherwise a clear error (a decode would give a black image)."""
    import torch

    if not torch.isfinite(latents).all():
        raise RuntimeError("the denoised latents have NaN/inf values (an overflow in the model's dtype): load the "
                           "checkpoint in another precision (e.g. ComfyUI's --bf16-unet or --fp32-unet)")
    return latents
