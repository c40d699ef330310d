"""Our sampler on ComfyUI's own models (``SDXLCNFromComfyModels``), with ComfyUI imported from its checkout (as
ComfyUI runs it with --cpu): tiny SDXL-shaped models built as ComfyUI's own objects from the same random weights
as a diffusers pipeline. The grafted pipeline holds no tensor of its own, gives the very pixels of our diffusers
path, follows a LoRA from ComfyUI's LoRA loader exactly (merged on a full load, or added per call in ComfyUI's
low-VRAM mode), runs ComfyUI's fp8 storage in its compute dtype, and refuses what it cannot run, naming the input.
The smaller SDXL ControlNets (diffusers' -mid and -small layouts, loaded by ComfyUI's own ControlNet loader) run too."""

from __future__ import annotations


import pytest

from comfyui_harness import SKIP_REASON, comfyui_dir, run_probe

pytestmark = pytest.mark.skipif(comfyui_dir() is None, reason=SKIP_REASON)


@pytest.fixture(scope="module")
def found(tmp_path_factory):
    return run_probe("comfy_graft_probe.py", tmp_path_factory.mktemp("graft"))


def test_no_copy_of_comfyui_weights(found):
    assert found["grafted_tensors"] > 600  # every UNet and ControlNet tensor of the tiny models
    assert found["no_own_storage"]  # each is one of ComfyUI's own tensors
    assert found["vae_skeleton_empty"]  # the diffusers VAE is a config on meta; ComfyUI's VAE does the work


def test_same_pixels_as_our_diffusers_path(found):
    assert found["shape"] == [2, 64, 64, 3]  # num_images 2, each with seed + i
    # float rounding apart: 1 level in a few pixels with ComfyUI 0.8.0 and torch 2.14 on the CPU
    assert found["vs_diffusers_max_diff"] <= 1 and found["vs_diffusers_mean_diff"] < 0.01


def test_comfyui_lora_applies_exactly(found):
    assert found["lora_changes_it"] > 50
    assert found["lora_vs_comfy_weights_max_diff"] <= 1  # = our path on the weights ComfyUI patched (rounding)
    assert found["lora_vs_our_lora_mean_diff"] < 0.01  # = the same file through our own LoRA loader
    assert found["base_again_after_lora"] == 0  # the LoRA clone does not leak into the base MODEL's runs


def test_comfyui_lowvram_mode_applies(found):
    assert found["lowvram_layers"] > 200  # ComfyUI's layers cast their weights per call
    assert found["lowvram_weights_unpatched"]  # the LoRA is added inside their forward, not merged
    assert found["lowvram_vs_full_load_max_diff"] == 0  # the same image as with the LoRA merged on a full load


def test_fp8_storage_runs_in_the_compute_dtype(found):
    assert (found["fp8_storage"], found["fp8_compute"]) == ("torch.float8_e4m3fn", "torch.float32")
    assert found["fp8_changes_it"] > 0  # the weights really are rounded to fp8
    assert found["fp8_vs_diffusers_max_diff"] <= 1  # = our diffusers path on the fp8-rounded weights


def test_refusals_name_the_input(found):
    assert found["refuses_sd15"].startswith("model: this MODEL is SD 1.x/2.x, not SDXL")
    assert found["refuses_control_lora"].startswith("control_net:") and "Control-LoRA" in found["refuses_control_lora"]
    assert found["refuses_edm"].startswith("model:") and "EDM" in found["refuses_edm"]
    assert found["refuses_union"].startswith("control_net:") and "Union" in found["refuses_union"]
    assert found["refuses_quantized"].startswith("model:") and "quantized" in found["refuses_quantized"]
    assert "ComfyUI's 'Load LoRA'" in found["lora_node_refuses"]
    assert found["named_patches"] == ["attn2_patch (patches)"]


# --- the smaller SDXL ControlNets (diffusers' -mid and -small shapes) through ComfyUI's own ControlNet loader -------

@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return run_probe("comfy_graft_small_probe.py", tmp_path_factory.mktemp("graft-small"))


@pytest.mark.parametrize("kind", ["mid", "small"])
def test_smaller_controlnets_load_in_comfyui_as_its_mid_and_small_layouts(small, kind):
    depths, middle = small["comfy_depths_expected"][kind]
    assert small[kind]["comfy_detected"] == [depths, middle]  # ComfyUI's own detection names the layout
    assert small[kind]["load_warnings"] == []  # no missing or leftover keys: the files have exactly that layout


@pytest.mark.parametrize("kind, down_blocks", [
    ("mid", ["DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"]),
    ("small", ["DownBlock2D", "DownBlock2D", "DownBlock2D"]),
])
def test_smaller_controlnets_run_on_comfyui_models_with_our_diffusers_paths_pixels(small, kind, down_blocks):
    found = small[kind]
    assert "refused" not in found, found["refused"]
    assert found["skeleton_down_block_types"] == down_blocks  # the skeleton follows the ControlNet's own depths
    assert found["grafted_cn_tensors"] > 50 and found["cn_no_own_storage"]  # ComfyUI's own tensors, no copies
    assert found["shape"] == [2, 64, 64, 3]
    assert found["controlnet_changes_it"] > 10
    assert found["vs_diffusers_max_diff"] <= 1 and found["vs_diffusers_mean_diff"] < 0.01  # float rounding apart
