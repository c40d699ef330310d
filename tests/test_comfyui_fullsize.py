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
