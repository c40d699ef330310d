"""A shared workflow cannot make a real ComfyUI server read files outside its model folders or unpickle a file
(skipped without COMFYUI_DIR): the loader and LoRA nodes take only names their model folders list, and pickle LoRAs
need the server's own opt-in (SDXLCN_ALLOW_PICKLE=1), which no workflow can set."""

from __future__ import annotations

import json

import pytest
import torch

from comfyui_harness import ROOT, SKIP_REASON, comfyui_dir, running_comfyui

pytestmark = pytest.mark.skipif(comfyui_dir() is None, reason=SKIP_REASON)


@pytest.fixture(scope="module")
def loras(tmp_path_factory, tiny_pipe):
    import lora_factory

    d = tmp_path_factory.mktemp("loras")
    lora_factory.write(lora_factory.kohya_state_dict(tiny_pipe, seed=3), d / "style.safetensors")
    torch.save(lora_factory.kohya_state_dict(tiny_pipe, seed=4), d / "style_pickle.pt")
    outside = tmp_path_factory.mktemp("outside")
    lora_factory.write(lora_factory.kohya_state_dict(tiny_pipe, seed=5), outside / "elsewhere.safetensors")
    return {"style": d / "style.safetensors", "pickle": d / "style_pickle.pt",
            "outside": outside / "elsewhere.safetensors"}


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_models, loras):
    base = tmp_path_factory.mktemp("comfyui-base")
    models = {"diffusers": {"tiny-sdxl": tiny_models["checkpoint"]},
              "controlnet": {"tiny-controlnet-canny": tiny_models["controlnet"]},
              "loras": {"style.safetensors": loras["style"], "style_pickle.pt": loras["pickle"]}}
    with running_comfyui(base, models) as s:
        yield s


def workflow(lora_name=None, allow_pickle=False):
    wf = json.loads((ROOT / "workflows" / "api" / "sdxl_controlnet_img2img_tiny.json").read_text())
    if lora_name is not None:
        wf["9"] = {"class_type": "SDXLCNLoraLoader",
                   "inputs": {"pipeline": ["3", 0], "lora_name": lora_name, "strength": 1.0,
                              "allow_pickle": allow_pickle}}
        wf["4"]["inputs"]["pipeline"] = ["9", 0]
    return wf


def node_error(body, node_id):
    return json.dumps(body.get("node_errors", {}).get(node_id, body))


def test_the_loader_refuses_a_path_outside_the_model_folders(server, tiny_models):
    wf = workflow()
    wf["3"]["inputs"]["checkpoint"] = str(tiny_models["checkpoint"])  # exists, but not through models/
    status, body = server.post("/prompt", {"prompt": wf})
    assert status == 400 and "checkpoint" in node_error(body, "3"), body
    wf = workflow()
    wf["3"]["inputs"]["controlnet"] = "../../" + str(tiny_models["controlnet"]).lstrip("/")
    status, body = server.post("/prompt", {"prompt": wf})
    assert status == 400 and "controlnet" in node_error(body, "3"), body


def test_the_lora_node_refuses_a_path_outside_the_loras_folder(server, loras):
    status, body = server.post("/prompt", {"prompt": workflow(str(loras["outside"]))})
    assert status == 400 and "loras folder" in node_error(body, "9"), body
    entry = server.wait_history(server.queue_prompt(workflow("style.safetensors")))  # a listed name runs
    assert entry["status"]["status_str"] == "success", entry["status"]


def test_a_workflow_cannot_turn_on_pickles(server):
    status, body = server.post("/prompt", {"prompt": workflow("style_pickle.pt", allow_pickle=True)})
    text = node_error(body, "9")
    assert status == 400 and "SDXLCN_ALLOW_PICKLE=1" in text and "style_pickle.pt" in text, body
    status, body = server.post("/prompt", {"prompt": workflow("style_pickle.pt", allow_pickle=False)})
    assert status == 400 and "refused by default" in node_error(body, "9"), body
