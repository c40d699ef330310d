"""One error per mistake, on the input that is wrong, in a real ComfyUI server's `POST /prompt` answer (HTTP 400,
`node_errors`) and in the run's error (skipped without COMFYUI_DIR).

ComfyUI 0.8.0 (execution.py, validate_inputs) pins a VALIDATE_INPUTS answer to every argument the method takes, and
checks the lists and ranges of the inputs it does not take itself, each on its own: these tests read the shape of
what the server answers, never our own messages' wording alone."""

from __future__ import annotations

import json

import pytest
import torch

from comfyui_harness import ROOT, SKIP_REASON, comfyui_dir, running_comfyui

pytestmark = pytest.mark.skipif(comfyui_dir() is None, reason=SKIP_REASON)

CANNY, LOADER, LORA = "2", "3", "9"


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_models):
    files = tmp_path_factory.mktemp("files")
    junk = files / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    pickle = files / "style_pickle.pt"
    torch.save({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, pickle)
    models = {"diffusers": {"tiny-sdxl": tiny_models["checkpoint"]},
              "controlnet": {"tiny-controlnet-canny": tiny_models["controlnet"]},
              # a ControlNet's weights where a base checkpoint goes: listed, so only its header can tell
              "checkpoints": {"controlnet_not_a_base.safetensors":
                              tiny_models["controlnet"] / "diffusion_pytorch_model.safetensors"},
              "loras": {"junk.safetensors": junk, "style_pickle.pt": pickle}}
    with running_comfyui(tmp_path_factory.mktemp("comfyui-base"), models,
                         env={"SDXLCN_ALLOW_PICKLE": None}) as s:
        yield s


def workflow(lora_name=None):
    wf = json.loads((ROOT / "workflows" / "api" / "sdxl_controlnet_img2img_tiny.json").read_text())
    if lora_name is not None:
        wf[LORA] = {"class_type": "SDXLCNLoraLoader",
                    "inputs": {"pipeline": [LOADER, 0], "lora_name": lora_name, "strength": 1.0, "allow_pickle": True}}
        wf["4"]["inputs"]["pipeline"] = [LORA, 0]
    return wf


def refused(server, wf) -> dict:
    """{node id: sorted [(error type, input name), ...]} of a /prompt that must be refused (ComfyUI walks a node's
    inputs as a set: their order varies), and the raw errors."""
    status, body = server.post("/prompt", {"prompt": wf})
    assert status == 400, body
    errors = body["node_errors"]
    return {nid: sorted((e["type"], e["extra_info"].get("input_name")) for e in entry["errors"])
            for nid, entry in errors.items()}, errors


def details(errors, nid) -> str:
    return "\n".join(e["details"] for e in errors[nid]["errors"])


def test_every_mistake_in_one_answer_each_once_on_its_own_input(server):
    """A shared workflow whose models are absent, a bad LoRA file and a threshold out of range: one answer names
    each of them once, on its own input (before: the checkpoint four times, on checkpoint, controlnet, device and
    vae, the ControlNet only on the next try, the LoRA twice, the threshold five times)."""
    wf = workflow("junk.safetensors")
    wf[LOADER]["inputs"].update(checkpoint="sd_xl_base_1.0.safetensors", controlnet="controlnet-canny-sdxl-1.0",
                                vae="sdxl_vae.safetensors")
    wf[CANNY]["inputs"]["low_threshold"] = 300
    shape, errors = refused(server, wf)
    assert shape == {LOADER: [("value_not_in_list", "checkpoint"), ("value_not_in_list", "controlnet"),
                              ("value_not_in_list", "vae")],  # sorted
                     LORA: [("custom_validation_failed", "lora_name")],
                     CANNY: [("value_bigger_than_max", "low_threshold")]}, errors
    loader = details(errors, LOADER)
    assert "sd_xl_base_1.0.safetensors" in loader and "controlnet-canny-sdxl-1.0" in loader
    assert "junk.safetensors" in details(errors, LORA) and "not a readable safetensors" in details(errors, LORA)


def test_one_missing_model_is_one_error(server):
    wf = workflow()
    wf[LOADER]["inputs"]["controlnet"] = "controlnet-canny-sdxl-1.0"
    shape, errors = refused(server, wf)
    assert shape == {LOADER: [("value_not_in_list", "controlnet")]}, errors


def test_an_unusable_device_is_one_error_on_device(server):
    wf = workflow()
    wf[LOADER]["inputs"]["device"] = "mps"  # never available on Linux; a saved workflow keeps any device it names
    shape, errors = refused(server, wf)
    assert shape == {LOADER: [("custom_validation_failed", "device")]}, errors
    # ComfyUI puts the input's name first ("device - ..."): the answer does not name it again
    assert details(errors, LOADER).startswith("device - mps was asked for, but it is not available"), errors


@pytest.mark.parametrize("lora", ["missing.safetensors", "style_pickle.pt"])
def test_a_missing_or_refused_lora_is_one_error_on_lora_name(server, lora):
    shape, errors = refused(server, workflow(lora))
    assert shape == {LORA: [("custom_validation_failed", "lora_name")]}, errors
    text = details(errors, LORA)
    assert lora in text
    if lora.endswith(".pt"):  # the node's allow_pickle is on: the server's own opt-in is what is missing
        assert "SDXLCN_ALLOW_PICKLE=1" in text and "refused by default" in text


def _run_error(server, wf) -> list[dict]:
    entry = server.wait_history(server.queue_prompt(wf))
    assert entry["status"]["status_str"] == "error", entry["status"]
    return [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]


def _outputs(server, entry, node_id) -> list:
    """The pixels of the images a node of a finished run shows or saved, read back through ComfyUI's /view."""
    import io
    import urllib.parse
    import urllib.request

    import numpy as np
    from PIL import Image

    arrays = []
    for img in entry["outputs"][node_id]["images"]:
        query = urllib.parse.urlencode({k: img[k] for k in ("filename", "subfolder", "type")})
        with urllib.request.urlopen(f"{server.url}/view?{query}", timeout=10) as r:
            arrays.append(np.asarray(Image.open(io.BytesIO(r.read())).convert("RGB")))
    return arrays


def test_thresholds_the_wrong_way_round_run_as_opencv_runs_them_with_one_warning_line(server):
    """OpenCV's Canny takes its thresholds either way round (the smaller one links edges, the larger one starts
    them): 250/100 runs, says so in one warning line, with no error and no traceback, and gives the pixels of
    100/250 (it was refused when the node ran, with a 20-line traceback in the log)."""
    import numpy as np

    wf = workflow()
    wf["4"]["inputs"]["num_inference_steps"] = 2
    wf[CANNY]["inputs"].update(low_threshold=250, high_threshold=100)
    start = len(server.log())
    swapped = server.wait_history(server.queue_prompt(wf))
    log = server.log()[start:]
    assert swapped["status"]["status_str"] == "success", swapped["status"]
    assert "Exception during processing" not in log and "Traceback" not in log, log
    said = [ln for ln in log.splitlines() if "low_threshold" in ln]
    assert said == ["SDXLCNCanny: low_threshold 250 is above high_threshold 100: using 100/250, as OpenCV does (the "
                    "smaller threshold links edges, the larger one starts them)"], log
    wf[CANNY]["inputs"].update(low_threshold=100, high_threshold=250)
    ordered = server.wait_history(server.queue_prompt(wf))
    assert ordered["status"]["status_str"] == "success", ordered["status"]
    for node_id in (CANNY, "5"):  # the edge map the Canny node shows, the picture the workflow saves
        a, b = _outputs(server, swapped, node_id), _outputs(server, ordered, node_id)
        assert len(a) == len(b) == 1 and np.array_equal(a[0], b[0]), node_id
    assert _outputs(server, ordered, CANNY)[0].any()


def test_a_file_of_the_wrong_kind_is_one_error(server):
    wf = workflow()
    wf[LOADER]["inputs"]["checkpoint"] = "controlnet_not_a_base.safetensors"
    runs = _run_error(server, wf)
    assert len(runs) == 1 and runs[0]["node_id"] == LOADER, runs
    message = runs[0]["exception_message"]
    assert message.startswith("checkpoint: ") and "ControlNet" in message, message


SAMPLER = "4"


@pytest.mark.parametrize("prompt", ["", "  \n"])
def test_an_empty_prompt_is_refused_when_queued_once_on_prompt(server, prompt):
    """A fresh sampler's prompt is empty: the workflow is refused at /prompt, on the prompt input, once, before the
    pipeline loads (it used to load the models and fail when the sampler ran)."""
    wf = workflow()
    wf[SAMPLER]["inputs"]["prompt"] = prompt
    shape, errors = refused(server, wf)
    assert shape == {SAMPLER: [("custom_validation_failed", "prompt")]}, errors
    assert "is empty: write what to generate" in details(errors, SAMPLER)


def test_a_prompt_from_another_node_is_checked_when_it_runs(server):
    """A linked prompt is unknown at /prompt: it validates, runs, and an empty one is refused when the sampler runs."""
    wf = workflow()
    wf["20"] = {"class_type": "StringConcatenate", "inputs": {"string_a": "ice", "string_b": "fortress",
                                                              "delimiter": " "}}
    wf[SAMPLER]["inputs"]["prompt"] = ["20", 0]
    entry = server.wait_history(server.queue_prompt(wf))
    assert entry["status"]["status_str"] == "success", entry["status"]
    wf["20"]["inputs"].update(string_a="", string_b="")
    runs = _run_error(server, wf)
    assert len(runs) == 1 and runs[0]["node_id"] == SAMPLER, runs
    assert runs[0]["exception_message"].startswith("prompt: is empty: write what to generate"), runs


def test_the_fal_nodes_empty_prompt_is_refused_when_it_runs_in_the_samplers_words(server):
    """The fal node's prompt may be empty when request_id fetches by id, so it cannot be refused when queued; without
    an id it is refused when the node runs, before anything is sent, in the words ComfyUI shows for the sampler's
    empty prompt at /prompt (it said "prompt: is required")."""
    wf = workflow()
    wf[SAMPLER]["inputs"]["prompt"] = ""
    _shape, errors = refused(server, wf)
    queued = details(errors, SAMPLER)  # "prompt - <our words>", as ComfyUI writes a VALIDATE_INPUTS answer
    assert queued.startswith("prompt - "), queued
    fal = {k: v for k, v in wf[SAMPLER]["inputs"].items() if k in FAL_INPUTS}
    wf[SAMPLER] = {"class_type": "SDXLCNFalImg2Img",
                   "inputs": {**fal, "control_image": ["1", 0], "request_id": "", "loras": "", "sync_mode": False,
                              "max_concurrency": 1, "timeout_s": 30}}
    runs = _run_error(server, wf)
    assert len(runs) == 1 and runs[0]["node_id"] == SAMPLER, runs
    assert runs[0]["exception_message"].strip() == "prompt: " + queued.removeprefix("prompt - "), runs


FAL_INPUTS = ("prompt", "negative_prompt", "controlnet_conditioning_scale", "image_size", "width", "height",
              "num_inference_steps", "guidance_scale", "strength", "seed", "num_images", "enable_safety_checker",
              "expand_prompt", "image")
