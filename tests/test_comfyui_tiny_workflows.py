"""A quick first run, as a ComfyUI-Manager user makes it (skipped without COMFYUI_DIR): the pack cloned into
``custom_nodes/<folder with dashes>`` (not importable as ``sdxl_controlnet_img2img``), the README's command
``python custom_nodes/<folder> make-tiny-models`` run from ComfyUI's folder with ComfyUI's python, then every tiny
workflow (``workflows/api/*_tiny.json``: the plain, LoRA and few-step ones) run in that real ComfyUI, and the fal
workflow against the fal-protocol test server."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from comfyui_harness import PACK_FOLDER, ROOT, SKIP_REASON, comfyui_dir, running_comfyui
from fal_server import TEST_KEY, fal_test_server  # noqa: F401 - the session fixture

pytestmark = pytest.mark.skipif(comfyui_dir() is None, reason=SKIP_REASON)

TINY = sorted((ROOT / "workflows" / "api").glob("*_tiny.json"))
# what a clone of the repository brings that ComfyUI and the command line use
PACK_PARTS = ("__init__.py", "__main__.py", "requirements.txt", "pyproject.toml", "pipeline", "nodes", "web",
              "workflows")


def _clone_into(custom_nodes):
    dest = custom_nodes / PACK_FOLDER
    dest.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in PACK_PARTS:
        src = ROOT / name
        (shutil.copytree(src, dest / name, ignore=ignore) if src.is_dir() else shutil.copy2(src, dest / name))


@pytest.fixture(scope="module")
def comfy(tmp_path_factory, fal_test_server):  # noqa: F811
    base = tmp_path_factory.mktemp("comfyui-manager-install")
    _clone_into(base / "custom_nodes")
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    made = subprocess.run([python, f"custom_nodes/{PACK_FOLDER}", "make-tiny-models"], cwd=base, capture_output=True,
                          text=True, timeout=600, env=dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1"))
    assert made.returncode == 0 and "Traceback" not in made.stderr, made.stderr[-3000:]
    paths = json.loads(made.stdout.strip().splitlines()[-1])
    assert paths == {"checkpoint": str(base / "models" / "diffusers" / "tiny-sdxl"),
                     "controlnet": str(base / "models" / "controlnet" / "tiny-controlnet-canny"),
                     "lora": str(base / "models" / "loras" / "tiny-sdxl-lora.safetensors")}, paths
    with running_comfyui(base, env={"FAL_KEY": TEST_KEY, "FAL_KEY_ID": None, "FAL_KEY_SECRET": None}) as server:
        yield server


def _saved(server, entry):
    from PIL import Image

    assert entry["status"]["status_str"] == "success", entry["status"]
    files = [img for out in entry["outputs"].values() for img in out.get("images", []) if img["type"] == "output"]
    assert len(files) == 1, files
    with Image.open(server.base / "output" / files[0]["subfolder"] / files[0]["filename"]) as img:
        return np.asarray(img.convert("RGB"))


def test_every_shipped_workflow_has_a_tiny_version():
    """Each local UI workflow in the Templates has a tiny twin (UI and API), except _comfy_models: ComfyUI's own
    checkpoint loader recognises SDXL only at its full size; _fal needs no models (run below)."""
    shipped = {p.stem for p in (ROOT / "workflows").glob("*.json")}
    tiny = {p.stem.removesuffix("_tiny") for p in TINY}
    assert shipped - {"sdxl_controlnet_img2img_comfy_models", "sdxl_controlnet_img2img_fal"} <= tiny, (shipped, tiny)
    assert {p.stem for p in (ROOT / "workflows" / "tiny").glob("*.json")} == {p.stem for p in TINY}


def test_every_tiny_workflow_runs_in_comfyui(comfy):
    assert comfy.import_problem() is None, comfy.import_problem()
    pictures = {}
    for path in TINY:
        workflow = json.loads(path.read_text())
        pictures[path.stem] = picture = _saved(comfy, comfy.wait_history(comfy.queue_prompt(workflow)))
        assert picture.shape == (64, 64, 3), path.name
        assert len(np.unique(picture.reshape(-1, 3), axis=0)) > 50, path.name  # a picture, not a blank
        if any(n["class_type"] == "SDXLCNLoraLoader" for n in workflow.values()):
            assert "tiny-sdxl-lora.safetensors" in json.dumps(workflow)
    # the LoRA changes the picture of the same seed and settings
    plain, lora = pictures["sdxl_controlnet_img2img_tiny"], pictures["sdxl_controlnet_img2img_lora_tiny"]
    assert np.abs(plain.astype(int) - lora.astype(int)).mean() > 5


def test_the_fal_workflow_runs_in_comfyui(comfy, fal_test_server):  # noqa: F811
    """The shipped fal workflow, against the fal-protocol test server (which answers the init image inverted)."""
    from PIL import Image, ImageOps

    fal_test_server.reset()
    workflow = json.loads((ROOT / "workflows" / "api" / "sdxl_controlnet_img2img_fal.json").read_text())
    picture = _saved(comfy, comfy.wait_history(comfy.queue_prompt(workflow)))
    with Image.open(ROOT / "workflows" / "inputs" / "fortress.png") as source:
        assert np.array_equal(picture, np.asarray(ImageOps.invert(source.convert("RGB"))))
    assert fal_test_server.submissions == 1
