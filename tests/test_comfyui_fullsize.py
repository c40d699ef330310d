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
    from sdxl_controlnet_img2img.pipeline.local.models.sdxl_config import SDXL_BASE_CONFIG

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(SDXL_BASE_CONFIG / "unet"))
    lora_factory.write(lora_factory.kohya_state_dict(types.SimpleNamespace(unet=unet), te=False, rank=2, amp=0.01),
                       path)
    return path


def _native_graph(wf: dict) -> dict:
    """The comfy-models workflow with ComfyUI's own nodes in place of ours: the same loaders and LoRA, CLIPTextEncode,
    ControlNetApplyAdvanced at 0.5, VAEEncode, KSampler (euler) and VAEDecode, same size and steps."""
    wf = json.loads(json.dumps(wf))
    sampler = next(k for k, n in wf.items() if n["class_type"] == "SDXLCNImg2Img")
    inputs = wf.pop(sampler)["inputs"]
    ours = next(k for k, n in wf.items() if n["class_type"] == "SDXLCNFromComfyModels")
    links = wf.pop(ours)["inputs"]
    model, clip, vae, control_net = (links[k] for k in ("model", "clip", "vae", "control_net"))
    canny = next(k for k, n in wf.items() if n["class_type"] == "SDXLCNCanny")
    picture = wf[canny]["inputs"]["image"]
    save = next(k for k, n in wf.items() if n["class_type"] == "SaveImage")
    w, h = inputs["width"], inputs["height"]
    wf.update({
        "20": {"class_type": "CLIPTextEncode", "inputs": {"text": inputs["prompt"], "clip": clip}},
        "21": {"class_type": "CLIPTextEncode", "inputs": {"text": inputs["negative_prompt"], "clip": clip}},
        "23": {"class_type": "ImageScale", "inputs": {"image": picture, "upscale_method": "bilinear", "width": w,
                                                      "height": h, "crop": "center"}},
        "22": {"class_type": "ControlNetApplyAdvanced", "inputs": {
            "positive": ["20", 0], "negative": ["21", 0], "control_net": control_net, "image": [canny, 0],
            "strength": inputs["controlnet_conditioning_scale"], "start_percent": 0.0, "end_percent": 1.0, "vae": vae}},
        "24": {"class_type": "VAEEncode", "inputs": {"pixels": ["23", 0], "vae": vae}},
        "25": {"class_type": "KSampler", "inputs": {
            "model": model, "positive": ["22", 0], "negative": ["22", 1], "latent_image": ["24", 0], "seed": 1,
            "steps": inputs["num_inference_steps"], "cfg": inputs["guidance_scale"], "sampler_name": "euler",
            "scheduler": "normal", "denoise": inputs["strength"]}},
        "26": {"class_type": "VAEDecode", "inputs": {"samples": ["25", 0], "vae": vae}},
    })
    wf[canny]["inputs"]["image"] = ["23", 0]
    wf[save]["inputs"]["images"] = ["26", 0]
    return wf


def test_the_comfy_models_workflow_keeps_one_copy_of_the_weights(tmp_path):
    """Load Checkpoint -> Load LoRA -> Load ControlNet Model -> our pipeline node -> our sampler at 256², 2 steps, in
    the server right after ComfyUI's own graph on the same loaders: the server's memory stays within 10% of what
    ComfyUI itself holds for these models (its weights -- bf16 UNet/ControlNet with --bf16-unet, fp16 CLIP, fp32
    VAE -- plus its own LoRA backups and working memory): our node adds no second copy."""
    wf = json.loads((ROOT / "workflows" / "api" / "sdxl_controlnet_img2img_comfy_models.json").read_text())
    lora_name = next(n["inputs"]["lora_name"] for n in wf.values() if n["class_type"] == "LoraLoader")
    lora = _fullsize_lora(tmp_path / lora_name)  # random weights under the name the workflow gives
    cn_name = "controlnet-canny-sdxl-1.0/diffusion_pytorch_model.safetensors"
    models = {"checkpoints": {"sd_xl_base_1.0.safetensors": FULLSIZE / BASE},
              "controlnet": {cn_name: FULLSIZE / CONTROLNET}, "loras": {lora.name: lora}}
    for node in wf.values():
        if node["class_type"] == "SDXLCNImg2Img":
            node["inputs"].update(num_inference_steps=2, strength=1.0, image_size="custom", width=256, height=256)
    with running_comfyui(tmp_path / "base", models, deadline_s=300, extra_args=("--bf16-unet",)) as server:
        idle = server.rss_bytes()
        rss = {}
        for name, graph in (("ComfyUI's own graph", _native_graph(wf)), ("our workflow", wf)):
            entry = server.wait_history(server.queue_prompt(graph), deadline_s=1500)
            assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[-2000:]
            saved = [i for out in entry["outputs"].values() for i in out.get("images", []) if i["type"] == "output"]
            assert len(saved) == 1, name
            rss[name] = server.rss_bytes()
        log = server.log()
    weights = (FULLSIZE / BASE).stat().st_size + (FULLSIZE / CONTROLNET).stat().st_size
    theirs, ours = rss["ComfyUI's own graph"], rss["our workflow"]
    print(f"\nserver RSS: idle {idle / 2**30:.2f} GiB, after ComfyUI's own graph {theirs / 2**30:.2f} GiB, after ours "
          f"{ours / 2**30:.2f} GiB (ratio {ours / theirs:.3f}); model files {weights / 2**30:.2f} GiB in fp16")
    assert "grafted" in log and "no copies" in log
    assert ours < 1.10 * theirs, rss
