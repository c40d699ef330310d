"""The shipped example workflow (its API copy) in a real ComfyUI server on full-size files: an SDXL single file named
sd_xl_base_1.0.safetensors and a ControlNet folder named controlnet-canny-sdxl-1.0, as a user who downloaded just
those two has them. Random weights from bench/fullsize.py; skipped unless SDXLCN_FULLSIZE_DIR points at that
--scratch folder and COMFYUI_DIR at ComfyUI (not part of CI: it needs ~10 GB of disk and RAM).

    SDXLCN_FULLSIZE_DIR=/work/fullsize COMFYUI_DIR=... COMFYUI_PYTHON=... .venv/bin/python -m pytest --rootdir=tests \\
        tests/test_comfyui_fullsize.py
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from comfyui_harness import ROOT, SKIP_REASON, comfyui_dir, running_comfyui

FULLSIZE = Path(os.environ.get("SDXLCN_FULLSIZE_DIR", "/nonexistent"))
BASE, CONTROLNET = "sdxl_fullsize_random.safetensors", "controlnet_fullsize_random.safetensors"
pytestmark = [
    pytest.mark.skipif(comfyui_dir() is None, reason=SKIP_REASON),
    pytest.mark.skipif(not (FULLSIZE / BASE).is_file(), reason="set SDXLCN_FULLSIZE_DIR to bench/fullsize.py's --scratch"),
]


def test_the_shipped_example_runs_on_full_size_files(tmp_path):
    cn_dir = tmp_path / "controlnet-canny-sdxl-1.0"  # the layout diffusers/controlnet-canny-sdxl-1.0 downloads as
    cn_dir.mkdir()
    shutil.copy(ROOT / "pipeline" / "local" / "configs" / "controlnet_sdxl" / "config.json", cn_dir / "config.json")
    (cn_dir / "diffusion_pytorch_model.safetensors").symlink_to(FULLSIZE / CONTROLNET)
    models = {"checkpoints": {"sd_xl_base_1.0.safetensors": FULLSIZE / BASE}, "controlnet": {cn_dir.name: cn_dir}}
    wf = json.loads((ROOT / "workflows" / "api" / "sdxl_controlnet_img2img.json").read_text())
    for node in wf.values():
        if node["class_type"] == "SDXLCNLoader":
            node["inputs"]["dtype"] = "bf16"  # ComfyUI's CPU choice, fp32, needs ~19 GB for these models
        if node["class_type"] == "SDXLCNImg2Img":
            node["inputs"].update(num_inference_steps=2, strength=1.0, image_size="square")  # minutes, not an hour
    with running_comfyui(tmp_path / "base", models, deadline_s=300) as server:
        entry = server.wait_history(server.queue_prompt(wf), deadline_s=1500)
        assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[-2000:]
        saved = [i for out in entry["outputs"].values() for i in out.get("images", []) if i["type"] == "output"]
        assert len(saved) == 1
        log = server.log()
        assert "Requested to load SDXLCNPipelineModels" in log  # a ComfyUI model, under its memory management
        print(f"\nserver RSS after the run: {server.rss_bytes() / 2**30:.1f} GiB "
              f"(weights {((FULLSIZE / BASE).stat().st_size + (FULLSIZE / CONTROLNET).stat().st_size) / 2**30:.1f} GiB in fp16)")


def _fullsize_lora(path: Path) -> Path:
    """A small random kohya LoRA for SDXL's full-size UNet attention layers (the names come from a skeleton)."""
    import types

    import torch
    from diffusers import UNet2DConditionModel

    import lora_factory
    from sdxl_controlnet_img2img.pipeline.local.sdxl_config import SDXL_BASE_CONFIG

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(SDXL_BASE_CONFIG / "unet"))
    lora_factory.write(lora_factory.kohya_state_dict(types.SimpleNamespace(unet=unet), te=False, rank=2, amp=0.01),
                       path)
    return path


def test_the_comfy_models_workflow_keeps_one_copy_of_the_weights(tmp_path):
    """Load Checkpoint -> Load LoRA -> Load ControlNet Model -> our pipeline node -> our sampler, at 256², 2 steps:
    the server holds ComfyUI's weights once (bf16 UNet/ControlNet, as --bf16-unet makes them, fp16 CLIP, fp32 VAE
    on the CPU), and our node adds no second copy."""
    from safetensors import safe_open

    lora = _fullsize_lora(tmp_path / "example_sdxl_lora.safetensors")
    cn_name = "controlnet-canny-sdxl-1.0/diffusion_pytorch_model.safetensors"
    models = {"checkpoints": {"sd_xl_base_1.0.safetensors": FULLSIZE / BASE},
              "controlnet": {cn_name: FULLSIZE / CONTROLNET}, "loras": {lora.name: lora}}
    wf = json.loads((ROOT / "workflows" / "api" / "sdxl_controlnet_img2img_comfy_models.json").read_text())
    for node in wf.values():
        if node["class_type"] == "SDXLCNImg2Img":
            node["inputs"].update(num_inference_steps=2, strength=1.0, image_size="custom", width=256, height=256)
    with running_comfyui(tmp_path / "base", models, deadline_s=300, extra_args=("--bf16-unet",)) as server:
        idle = server.rss_bytes()
        entry = server.wait_history(server.queue_prompt(wf), deadline_s=1500)
        assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[-2000:]
        saved = [i for out in entry["outputs"].values() for i in out.get("images", []) if i["type"] == "output"]
        assert len(saved) == 1
        after = server.rss_bytes()
        log = server.log()
    # ComfyUI's own weights at the dtypes it chose: bf16 UNet and ControlNet, fp16 text encoders, fp32 VAE
    bytes_per = {"model.diffusion_model.": 2, "conditioner.": 2, "first_stage_model.": 4}
    weights = 0
    with safe_open(str(FULLSIZE / BASE), "pt") as f:
        for key in f.keys():
            n = f.get_slice(key).get_shape()
            size = 1
            for d in n:
                size *= d
            weights += size * next((b for p, b in bytes_per.items() if key.startswith(p)), 2)
    with safe_open(str(FULLSIZE / CONTROLNET), "pt") as f:
        for key in f.keys():
            size = 1
            for d in f.get_slice(key).get_shape():
                size *= d
            weights += size * 2
    print(f"\nserver RSS idle {idle / 2**30:.2f} GiB, after the run {after / 2**30:.2f} GiB; ComfyUI's loaded weights "
          f"{weights / 2**30:.2f} GiB; RSS after / weights = {after / weights:.3f}")
    assert "grafted" in log and "no copies" in log
    assert after < 1.10 * weights, (after, weights)
