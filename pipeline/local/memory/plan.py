"""How much GPU memory a request needs, and which memory mode and VAE tiling follow from what is free.

Figures for SDXL base + the full SDXL ControlNet in a 16-bit dtype (fp16/bf16), from their parameter counts
(UNet 2.57 B, ControlNet 1.25 B, text encoders 0.12 B + 0.69 B, VAE 0.08 B): 9.4 GB = 8.8 GiB of weights, of
which UNet + ControlNet 7.1 GiB. The working memory per megapixel is an **estimate** (diffusers' and ComfyUI's published
figures for SDXL with SDPA attention, rounded up): the UNet + ControlNet pass with classifier-free guidance about
1 GiB, a VAE decode about 1.5 GiB in 16 bits and 3 GiB when the SDXL VAE is upcast to fp32 (its ``force_upcast``).
The functions take the sizes of the loaded models, so other fine-tunes and dtypes are measured, not assumed.

What ``auto`` picks (1024x1024, SDXL VAE upcast, a card with nothing else loaded; free = total minus ~0.5 GiB):

==========  ======================  ===================================================================
card        memory mode             why
==========  ======================  ===================================================================
8 GB        sequential_cpu_offload  UNet + ControlNet (7.1 GiB) + 1 GiB working memory do not fit
12 GB       model_cpu_offload       the largest stage fits (8.1 GiB), all models + working memory (11.8 GiB) do not
16 GB       none                    all models + the VAE decode's working memory fit (11.8 GiB)
24 GB       none                    as 16 GB, with room for ComfyUI's own models beside ours
==========  ======================  ===================================================================
"""

from __future__ import annotations

GIB = 1024**3
MEGAPIXEL = 1024 * 1024
# estimated working memory per megapixel (see the module docstring)
DENOISE_BYTES_PER_MP = 1.0 * GIB
VAE_DECODE_BYTES_PER_MP = {2: 1.5 * GIB, 4: 3.0 * GIB}  # by bytes per element of the VAE's compute dtype
HEADROOM_BYTES = int(0.5 * GIB)  # what drivers, the CUDA context and fragmentation take on top
STAGES = ("unet", "controlnet")  # what runs together in the denoising loop
# SDXL base + the full SDXL ControlNet in 16 bits (the parameter counts above), for the figures users read
SDXL_16BIT_BYTES = {"unet": 2 * 2.567e9, "controlnet": 2 * 1.251e9, "text_encoder": 2 * 0.123e9,
                    "text_encoder_2": 2 * 0.695e9, "vae": 2 * 0.084e9}


def component_bytes(pipe) -> dict[str, int]:
    """Bytes of each model of a loaded pipeline (parameters and buffers)."""
    out = {}
    for name in ("unet", "controlnet", "vae", "text_encoder", "text_encoder_2"):
        model = getattr(pipe, name, None)
        if model is None:
            continue
        model = getattr(model, "_orig_mod", model)  # torch.compile's wrapper
        out[name] = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    return out


def denoise_bytes(width: int, height: int) -> int:
    """Estimated working memory of the UNet + ControlNet pass (with CFG) at ``width`` x ``height``."""
    return int(width * height / MEGAPIXEL * DENOISE_BYTES_PER_MP)


def vae_decode_bytes(width: int, height: int, vae_bytes_per_element: int = 4) -> int:
    """Estimated working memory of one VAE decode at ``width`` x ``height``."""
    per_mp = VAE_DECODE_BYTES_PER_MP.get(vae_bytes_per_element, VAE_DECODE_BYTES_PER_MP[4])
    return int(width * height / MEGAPIXEL * per_mp)


def working_bytes(width: int, height: int, vae_bytes_per_element: int = 4) -> int:
    """Estimated peak working memory of one image at ``width`` x ``height``: the larger of denoising and decoding."""
    return max(denoise_bytes(width, height), vae_decode_bytes(width, height, vae_bytes_per_element))


def choose_memory_mode(free_bytes: int, sizes: dict[str, int], width: int = 1024, height: int = 1024,
                       vae_bytes_per_element: int = 4) -> tuple[str, str]:
    """(memory mode, the reason in words) for a GPU with ``free_bytes`` free and models of ``sizes`` bytes."""
    gib = lambda b: f"{b / GIB:.1f} GiB"  # noqa: E731
    total = sum(sizes.values())
    stage = sum(sizes.get(n, 0) for n in STAGES)
    work = working_bytes(width, height, vae_bytes_per_element)
    denoise = denoise_bytes(width, height)
    usable = free_bytes - HEADROOM_BYTES
    if total + work <= usable:
        return "none", (f"all models ({gib(total)}) and the working memory at {width}x{height} ({gib(work)}) fit "
                        f"in the {gib(free_bytes)} free")
    if stage + denoise <= usable:
        return "model_cpu_offload", (f"all models ({gib(total)}) + working memory ({gib(work)}) do not fit in the "
                                     f"{gib(free_bytes)} free, the UNet + ControlNet stage ({gib(stage + denoise)}) does")
    return "sequential_cpu_offload", (f"not even the UNet + ControlNet stage ({gib(stage + denoise)}) fits in the "
                                      f"{gib(free_bytes)} free: layers are streamed to the GPU one by one (slow)")


def needs_vae_tiling(free_bytes: int, width: int, height: int, vae_bytes_per_element: int = 4) -> bool:
    """Whether the VAE's decode at this size would not fit in ``free_bytes`` (then decode in tiles)."""
    return vae_decode_bytes(width, height, vae_bytes_per_element) + HEADROOM_BYTES > free_bytes


def mode_needs_bytes(mode: str, width: int = 1024, height: int = 1024, sizes: dict | None = None,
                     vae_bytes_per_element: int = 4) -> int:
    """Estimated GPU memory a memory mode needs (what ``choose_memory_mode`` compares, headroom aside): ``none`` all
    models + the larger working memory; ``model_cpu_offload`` the UNet + ControlNet stage (diffusers keeps the
    ControlNet, outside its offload sequence, on the GPU beside the UNet) + the denoising memory;
    ``sequential_cpu_offload`` about the working memory alone (layers are streamed)."""
    sizes = SDXL_16BIT_BYTES if sizes is None else sizes
    work = working_bytes(width, height, vae_bytes_per_element)
    if mode == "none":
        return int(sum(sizes.values()) + work)
    if mode == "model_cpu_offload":
        return int(sum(sizes.get(n, 0) for n in STAGES) + denoise_bytes(width, height))
    if mode == "sequential_cpu_offload":
        return work
    raise ValueError(f"memory mode {mode!r} has no fixed need (auto is chosen from these)")


# The one place the user-facing figures come from (choices.py's help lines for --help and the loader's tooltip; the
# README quotes them):
# SDXL + the full ControlNet in 16 bits at 1024x1024 with the fp32-upcast VAE decode, rounded to whole GiB.
NEEDS_AT_1024 = {mode: f"~{mode_needs_bytes(mode) / GIB:.0f} GiB"
                 for mode in ("none", "model_cpu_offload", "sequential_cpu_offload")}
