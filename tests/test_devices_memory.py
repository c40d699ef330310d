"""Device, precision and memory decisions, with the device's properties given at the narrowest point (a capability
tuple, a free-memory figure); nothing here needs a GPU."""

from __future__ import annotations

import pytest
import torch

from sdxl_controlnet_img2img.pipeline.local.memory.devices import dtype_for
from sdxl_controlnet_img2img.pipeline.local.memory.plan import (
    GIB,
    choose_memory_mode,
    component_bytes,
    needs_vae_tiling,
)

# SDXL base + full SDXL ControlNet in 16 bits, by parameter count
SDXL_SIZES = {"unet": 2_567_463_684 * 2, "controlnet": 1_251_197_828 * 2, "text_encoder": 123_060_480 * 2,
              "text_encoder_2": 694_659_840 * 2, "vae": 83_653_863 * 2}


@pytest.mark.parametrize("device, capability, xpu_bf16, expected", [
    ("cuda", (6, 1), False, torch.float16),   # GTX 10xx
    ("cuda", (7, 0), False, torch.float16),   # V100: bf16 only emulated
    ("cuda", (7, 5), False, torch.float16),   # T4, RTX 20xx, GTX 16xx
    ("cuda", (8, 0), False, torch.bfloat16),  # A100
    ("cuda", (8, 6), False, torch.bfloat16),  # RTX 30xx
    ("cuda", (9, 0), False, torch.bfloat16),  # H100
    ("xpu", None, True, torch.bfloat16),      # Arc with bf16
    ("xpu", None, False, torch.float16),
    ("mps", None, False, torch.float16),
    ("cpu", None, False, torch.float32),
])
def test_default_precision_per_device(device, capability, xpu_bf16, expected):
    assert dtype_for(device, capability, xpu_bf16) is expected


@pytest.mark.parametrize("card_gb, expected", [(8, "sequential_cpu_offload"), (12, "model_cpu_offload"),
                                               (16, "none"), (24, "none")])
def test_auto_memory_mode_on_the_cards_users_own(card_gb, expected):
    free = int(card_gb * 1e9) - int(0.5 * GIB)  # what the driver and desktop leave
    mode, why = choose_memory_mode(free, SDXL_SIZES)
    assert mode == expected, why
    assert "GiB" in why


def test_auto_memory_mode_counts_the_size_asked_for():
    free = 16 * 10**9
    assert choose_memory_mode(free, SDXL_SIZES, 1024, 1024)[0] == "none"
    assert choose_memory_mode(free, SDXL_SIZES, 2048, 2048)[0] == "model_cpu_offload"


def test_vae_tiling_switches_on_where_the_decode_would_not_fit():
    assert not needs_vae_tiling(8 * GIB, 1024, 1024)
    assert needs_vae_tiling(2 * GIB, 1024, 1024)
    assert needs_vae_tiling(8 * GIB, 2048, 2048)
    assert not needs_vae_tiling(8 * GIB, 2048, 2048, vae_bytes_per_element=2)  # a 16-bit VAE needs half


def test_component_sizes_are_measured_from_the_models(tiny_pipe):
    sizes = component_bytes(tiny_pipe)
    assert set(sizes) == {"unet", "controlnet", "vae", "text_encoder", "text_encoder_2"}
    assert sizes["unet"] == sum(p.numel() * 4 for p in tiny_pipe.unet.parameters()) + \
        sum(b.numel() * b.element_size() for b in tiny_pipe.unet.buffers())


def test_auto_on_the_cpu_places_like_none(tiny_models):
    from sdxl_controlnet_img2img.pipeline.local.models.loading import build_pipeline, LoadOptions
    from sdxl_controlnet_img2img.pipeline.local.memory.placement import memory_mode_of

    pipe = build_pipeline(tiny_models["checkpoint"], tiny_models["controlnet"], LoadOptions(device="cpu"))
    assert memory_mode_of(pipe) == "none"
    with pytest.raises(Exception, match="memory_mode: model_cpu_offload moves weights"):
        LoadOptions(device="cpu", memory_mode="model_cpu_offload").resolved()
