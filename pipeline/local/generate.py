"""One request in, images out: SDXL ControlNet img2img with diffusers, fal's defaults passed explicitly."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Protocol

from ..canny import canny_image
from ..errors import RequestError
from ..images import load_image
from ..request import GenerationRequest
from ..result import GenerationResult
from ..sizes import cover_resize, parse_image_size, target_size, upscale_warning
from .memory.compile import compiled_call
from .schedulers import custom_timesteps, scheduler_call_kwargs, use_scheduler
from .vae_decode import LatentsKeeper, auto_vae_tiling, checked_latents, to_pil_checked

# on_step(step, total, latents): called after every denoising step; raise to cancel.
StepCallback = Callable[[int, int, object], None]


class SafetyChecker(Protocol):
    def __call__(self, images: list) -> tuple[list, list[bool]]:
        """Return (images with flagged ones replaced, one flag per image)."""


class PromptExpander(Protocol):
    def __call__(self, prompt: str, seed: int) -> str: ...


class Codec(Protocol):
    """Text encoding and the VAE done outside diffusers, by a host application's own loaded models (the pipeline
    then has skeleton text encoders and VAE: see ``skeleton.py``)."""

    def encode_text(self, text: str):
        """(embeddings ``[1, tokens, 2048]``, pooled ``[1, 1280]``) on the pipeline's device, in its dtype."""

    def encode_image(self, image):
        """The latents of a PIL image, scaled as the UNet takes them (VAE latents x its scaling factor)."""

    def before_denoise(self, width: int, height: int) -> None:
        """Make the UNet and ControlNet ready to run (the host loads them, evicting what it must)."""

    def decode(self, latents) -> list:
        """PIL images of UNet-scale latents."""


@dataclass
class PreparedInputs:
    init_image: object  # PIL RGB at (width, height)
    control_image: object  # PIL RGB at (width, height): the Canny map when apply_canny
    width: int
    height: int
    warnings: tuple[str, ...] = ()  # one line each, for the caller to show (an input scaled up a lot)


def prepare_inputs(request: GenerationRequest,
                   names: tuple[str, str] = ("image_url", "control_image_url")) -> PreparedInputs:
    """Load both images, bring them to the target size (cover + centre-crop), run Canny on the control image.
    ``names``: the init and control image as the caller's user knows them (fal's fields; a node's inputs)."""
    init_name, control_name = names
    control = load_image(request.control_image_url, control_name)
    init = load_image(request.image_url, init_name)
    width, height = target_size(parse_image_size(request.image_size), control.size)
    warnings = tuple(w for w in (upscale_warning(init_name, init.size, (width, height)),
                                 upscale_warning(control_name, control.size, (width, height))) if w)
    control = cover_resize(control, (width, height))
    init = cover_resize(init, (width, height))
    if request.apply_canny:
        control = canny_image(control)
    return PreparedInputs(init, control, width, height, warnings)


def make_generator(seed: int):
    """A CPU generator (CPU generators give the same noise on every device)."""
    import torch

    return torch.Generator("cpu").manual_seed(seed)


def pipeline_call_kwargs(request: GenerationRequest, inputs: PreparedInputs, prompt: str, index: int = 0) -> dict:
    """The keyword arguments of the diffusers call for image ``index`` of the request.

    Every parameter is explicit, so diffusers' own defaults never apply. Each image is its own
    call with seed ``seed + index``: batched calls differ from single ones in the last float bits,
    and then image *i* could not be regenerated alone.
    """
    return {
        "prompt": prompt,
        "negative_prompt": request.negative_prompt,
        "image": inputs.init_image,
        "control_image": inputs.control_image,
        "height": inputs.height,
        "width": inputs.width,
        "strength": float(request.strength),
        "num_inference_steps": int(request.num_inference_steps),
        "guidance_scale": float(request.guidance_scale),
        "controlnet_conditioning_scale": float(request.controlnet_conditioning_scale),
        "control_guidance_start": float(request.local_control_start),
        "control_guidance_end": float(request.local_control_end),
        "num_images_per_prompt": 1,
        "generator": make_generator(request.image_seed(index)),
        "output_type": "np",  # checked for NaN/inf, then made PIL images as diffusers would (vae_decode.py)
        **scheduler_call_kwargs(request.local_scheduler),
    }


@dataclass
class EncodedRequest:
    """What every image of a request shares, computed once: the prompt embeddings and the init image's latent
    distribution (under CPU offload each encode streams the text encoders or the VAE through the GPU)."""

    embeds: dict  # prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds
    latent_dist: object  # the VAE's DiagonalGaussianDistribution of the init image (None from a codec)
    dtype: object  # the dtype the pipeline computes latents in (the prompt embeddings')
    latents: object = None  # a codec's latents of the init image, UNet-scaled (the posterior's mean)


def encode_request(pipe, request: GenerationRequest, inputs: PreparedInputs, prompt: str) -> EncodedRequest:
    """Encode the prompts and the init image once, exactly as the diffusers call would for each image."""
    import torch

    device = pipe._execution_device
    cfg = float(request.guidance_scale) > 1 and pipe.unet.config.time_cond_proj_dim is None
    with torch.no_grad():
        embeds = dict(zip(
            ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds"),
            pipe.encode_prompt(prompt, None, device, 1, cfg, request.negative_prompt, None)))
        dtype = embeds["prompt_embeds"].dtype
        image = pipe.image_processor.preprocess(inputs.init_image, height=inputs.height, width=inputs.width)
        image = image.to(dtype=torch.float32).to(device=device, dtype=dtype)
        vae = pipe.vae
        upcast = bool(vae.config.force_upcast)
        if upcast:  # as the pipeline does: the SDXL VAE overflows in fp16
            image = image.float()
            vae.to(dtype=torch.float32)
        try:
            dist = vae.encode(image).latent_dist
        finally:
            if upcast:
                vae.to(dtype)
    return EncodedRequest(embeds, dist, dtype)


def encode_with_codec(codec: Codec, request: GenerationRequest, inputs: PreparedInputs, prompt: str) -> EncodedRequest:
    """The prompts and the init image encoded by ``codec``, in the form the diffusers call takes them. The negative
    prompt is encoded even when empty, as diffusers does for a string (it zeroes only a missing one), and the two
    embeddings are brought to one length by repetition, as a host sampler does for prompts over 77 tokens."""
    import math

    import torch

    with torch.no_grad():
        positive, pooled = codec.encode_text(prompt)
        negative, negative_pooled = codec.encode_text(request.negative_prompt)
        length = math.lcm(positive.shape[1], negative.shape[1])
        positive = positive.repeat(1, length // positive.shape[1], 1)
        negative = negative.repeat(1, length // negative.shape[1], 1)
        latents = codec.encode_image(inputs.init_image)
    embeds = {"prompt_embeds": positive, "negative_prompt_embeds": negative, "pooled_prompt_embeds": pooled,
              "negative_pooled_prompt_embeds": negative_pooled}
    return EncodedRequest(embeds, None, positive.dtype, latents=latents)


def codec_latents(encoded: EncodedRequest, generator):
    """The codec's image latents for one call. The generator first draws what diffusers' posterior sample would
    draw, so the noise added next is the very noise the plain diffusers call adds for this seed (a host VAE gives
    the posterior's mean, which for SDXL's VAE is within its tiny spread of a sample)."""
    import torch

    torch.randn(encoded.latents.shape, generator=generator, dtype=torch.float32)
    return encoded.latents.to(encoded.dtype)


def image_latents(pipe, encoded: EncodedRequest, generator):
    """Image latents for one call, sampled with that call's generator as diffusers' ``prepare_latents`` samples
    them (so the generator then gives the same noise): pixel for pixel what the call would compute itself."""
    import torch

    with torch.no_grad():
        latents = encoded.latent_dist.sample(generator).to(encoded.dtype)
        config = pipe.vae.config
        mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
        if mean is not None and std is not None:
            mean = torch.tensor(mean).view(1, 4, 1, 1).to(latents)
            std = torch.tensor(std).view(1, 4, 1, 1).to(latents)
            return (latents - mean) * config.scaling_factor / std
        return config.scaling_factor * latents


def _step_callback(on_step: StepCallback, offset: int, total: int):
    def _callback(_pipe, step_index, _timestep, callback_kwargs):
        on_step(offset + step_index + 1, total, callback_kwargs.get("latents"))
        return callback_kwargs

    return _callback


def _denoise_each(pipe, request, prepared, prompt, on_step, encoded, codec=None) -> list:
    """One diffusers call per image (seed + index), on shared encodings when given; the images as PIL."""
    per_image = request.steps_to_run
    total = per_image * request.num_images
    images, latents = [], []
    for index in range(request.num_images):
        kwargs = pipeline_call_kwargs(request, prepared, prompt, index)
        if codec is not None:  # the host's encodings; the host's VAE decodes once all images are denoised
            kwargs.update(encoded.embeds, prompt=None, negative_prompt=None, output_type="latent",
                          image=codec_latents(encoded, kwargs["generator"]))
            codec.before_denoise(prepared.width, prepared.height)
        elif encoded is not None:  # the shared encodings instead of the prompt and the init image
            kwargs.update(encoded.embeds, prompt=None, negative_prompt=None,
                          image=image_latents(pipe, encoded, kwargs["generator"]))
        keeper = LatentsKeeper(_step_callback(on_step, index * per_image, total) if on_step is not None else None)
        kwargs["callback_on_step_end"] = keeper
        kwargs["callback_on_step_end_tensor_inputs"] = ["latents"]
        with compiled_call(pipe):
            out = pipe(**kwargs).images
        if codec is not None:
            latents.append(checked_latents(out))
        else:
            images.extend(to_pil_checked(pipe, out, keeper.latents))
    for item in latents:
        images.extend(codec.decode(item))
    return images


def generate(
    pipe,
    request: GenerationRequest,
    *,
    on_step: StepCallback | None = None,
    safety_checker: SafetyChecker | None = None,
    prompt_expander: PromptExpander | None = None,
    prepared: PreparedInputs | None = None,
    codec: Codec | None = None,
) -> GenerationResult:
    """Run ``request`` on a loaded ``StableDiffusionXLControlNetImg2ImgPipeline``.

    A request without a seed gets a random one, returned in the result. Image ``i`` uses
    seed ``seed + i``. ``on_step`` is called after each denoising step (raise from it to cancel).
    With a ``codec`` (a host application's text encoders and VAE), ``pipe`` is a skeleton pipeline whose UNet and
    ControlNet hold the host's modules: LoRAs are then the host's business, not the request's.
    """
    request = request.with_seed()
    codec = codec if codec is not None else getattr(pipe, "codec", None)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    if request.enable_safety_checker and safety_checker is None:
        raise RequestError(
            "enable_safety_checker",
            "is on but no safety checker model is loaded; put the Stable Diffusion safety checker in "
            "models/safety_checker (see README, 'Safety checker'), or set enable_safety_checker to false",
        )
    if request.expand_prompt and prompt_expander is None:
        raise RequestError(
            "expand_prompt",
            "is on but no prompt-expansion model is loaded; put one in models/prompt_expansion "
            "(see README, 'Prompt expansion'), or set expand_prompt to false",
        )
    if codec is not None and request.loras:
        raise RequestError("loras", "this pipeline runs on a host application's own models: apply LoRAs to those "
                                    "models (in ComfyUI: its LoRA loader on the MODEL and CLIP before they reach it)")
    use_scheduler(pipe, request.local_scheduler, request.local_timesteps)  # refuses timesteps it cannot take
    if prepared is None:
        prepared = prepare_inputs(request)
    timings["prepare"] = time.perf_counter() - t0

    prompt = request.prompt
    expanded = None
    if request.expand_prompt:
        t = time.perf_counter()
        expanded = prompt_expander(prompt, request.seed)
        prompt = expanded
        timings["expand_prompt"] = time.perf_counter() - t

    # The request's LoRA set becomes the pipe's active set just before sampling (files already kept
    # as adapters are not read again; an empty set switches every adapter off).
    if codec is None:
        t = time.perf_counter()
        from .lora.fused import activate_any

        activate_any(pipe, request.loras)
        timings["lora"] = time.perf_counter() - t

    t = time.perf_counter()
    with custom_timesteps(pipe.scheduler, request.local_timesteps):
        if codec is None:
            with auto_vae_tiling(pipe, prepared.width, prepared.height):
                encoded = encode_request(pipe, request, prepared, prompt) if request.num_images > 1 else None
                images = _denoise_each(pipe, request, prepared, prompt, on_step, encoded)
        else:
            images = _denoise_each(pipe, request, prepared, prompt, on_step,
                                   encode_with_codec(codec, request, prepared, prompt), codec)
    timings["inference"] = time.perf_counter() - t

    flags = [False] * len(images)
    if request.enable_safety_checker:
        t = time.perf_counter()
        images, flags = safety_checker(images)
        timings["safety_checker"] = time.perf_counter() - t

    return GenerationResult(
        images=list(images),
        seed=request.seed,
        has_nsfw_concepts=[bool(f) for f in flags],
        width=prepared.width,
        height=prepared.height,
        prompt=prompt,
        expanded_prompt=expanded,
        timings=timings,
    )
