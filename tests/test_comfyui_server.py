"""The pack in a real ComfyUI server (skipped without COMFYUI_DIR): loads, runs the API example on
tiny models, cancels, and reports bad input clearly while the server keeps serving."""

from __future__ import annotations

import copy
import json
import time

import numpy as np
import pytest

from comfyui_harness import PACK_FOLDER, ROOT, SKIP_REASON, comfyui_dir, running_comfyui, wait_until

pytestmark = pytest.mark.skipif(comfyui_dir() is None, reason=SKIP_REASON)


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_models):
    from sdxl_controlnet_img2img.pipeline.local.tiny_models import build_tiny_safety_checker

    # every path under a folder named like the repository, as in a clone made by `git clone <repo>`; beside the pack,
    # a custom node whose name starts with the pack's and that fails to import
    base = tmp_path_factory.mktemp(PACK_FOLDER) / "comfyui-base"
    broken = base / "custom_nodes" / BROKEN_NODE
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("raise ImportError('this node is broken on purpose')\n")
    checker = build_tiny_safety_checker(tmp_path_factory.mktemp("checker") / "flags-everything", flag_everything=True)
    models = {"diffusers": {"tiny-sdxl": tiny_models["checkpoint"]},
              "controlnet": {"tiny-controlnet-canny": tiny_models["controlnet"]},
              "safety_checker": {"tiny-checker": checker}}
    with running_comfyui(base, models) as s:
        yield s


BROKEN_NODE = PACK_FOLDER + "-broken"


def tiny_workflow():
    return json.loads((ROOT / "workflows" / "api" / "sdxl_controlnet_img2img_tiny.json").read_text())


def _sampler(wf):
    return next(n for n in wf.values() if n["class_type"] == "SDXLCNImg2Img")["inputs"]


def test_pack_loads_without_import_errors(server):
    # ComfyUI's own audio extras fail to import where torchaudio is absent (as here): only the pack's module counts
    problem = server.import_problem()
    assert problem is None, problem
    # the same check sees a node that failed, and quotes why
    broken = server.import_problem(BROKEN_NODE)
    assert broken and "(IMPORT FAILED)" in broken and "this node is broken on purpose" in broken, broken
    info = server.get("/object_info")
    for name in ("SDXLCNLoader", "SDXLCNCanny", "SDXLCNImg2Img"):
        assert name in info, name
    loader = info["SDXLCNLoader"]["input"]["required"]
    assert "tiny-sdxl" in loader["checkpoint"][0] and "tiny-controlnet-canny" in loader["controlnet"][0]
    assert (server.base / "input" / "sdxlcn_fortress.png").is_file()


def test_api_example_runs_on_tiny_models(server):
    from PIL import Image

    entry = server.wait_history(server.queue_prompt(tiny_workflow()))
    assert entry["status"]["status_str"] == "success", entry["status"]
    saved = [img for out in entry["outputs"].values() for img in out.get("images", []) if img["type"] == "output"]
    assert len(saved) == 1
    path = server.base / "output" / saved[0]["subfolder"] / saved[0]["filename"]
    with Image.open(path) as img:
        assert img.size == (64, 64)
        pixels = np.asarray(img.convert("RGB")).reshape(-1, 3)
        assert len(np.unique(pixels, axis=0)) > 50  # a real picture, not a blank
    canny_ui = entry["outputs"].get("2", {}).get("images", [])
    assert canny_ui and canny_ui[0]["type"] == "temp"  # the edge map preview on the Canny node


def test_cancel_stops_a_long_run(server):
    wf = tiny_workflow()
    s = _sampler(wf)
    s.update(num_inference_steps=50, strength=1.0, width=384, height=384, seed=7)
    prompt_id = server.queue_prompt(wf)
    end = time.monotonic() + 60
    while time.monotonic() < end:  # wait until it is running
        q = server.get("/queue")
        if any(item[1] == prompt_id for item in q["queue_running"]):
            break
        time.sleep(0.1)
    time.sleep(1.0)  # let it get into the denoising loop
    t0 = time.monotonic()
    status, _ = server.post("/interrupt", {})
    assert status == 200
    entry = server.wait_history(prompt_id, deadline_s=60)
    assert time.monotonic() - t0 < 30, "cancel took too long"  # within a step or two, on a busy 2-core CPU
    assert entry["status"]["status_str"] == "error"
    messages = json.dumps(entry["status"]["messages"])
    assert "execution_interrupted" in messages, messages


def test_bad_inputs_give_clear_errors_and_server_keeps_serving(server):
    wf = tiny_workflow()
    _sampler(wf)["strength"] = 1.5
    status, body = server.post("/prompt", {"prompt": wf})
    assert status == 400 and "strength" in json.dumps(body["node_errors"]), body

    wf = tiny_workflow()
    _sampler(wf)["prompt"] = "   "
    status, body = server.post("/prompt", {"prompt": wf})  # refused when queued (test_comfyui_node_errors.py)
    assert status == 400 and "prompt - is empty" in json.dumps(body["node_errors"]), body

    wf = tiny_workflow()
    next(n for n in wf.values() if n["class_type"] == "SDXLCNLoader")["inputs"]["checkpoint"] = "missing.safetensors"
    status, body = server.post("/prompt", {"prompt": wf})
    assert status == 400 and "checkpoint" in json.dumps(body), body

    ok = server.wait_history(server.queue_prompt(copy.deepcopy(tiny_workflow())))
    assert ok["status"]["status_str"] == "success"


def test_safety_checker_from_the_models_folder_blacks_out_flagged_images(server):
    from PIL import Image

    wf = tiny_workflow()
    _sampler(wf)["enable_safety_checker"] = True  # the tiny checker in models/safety_checker flags everything
    entry = server.wait_history(server.queue_prompt(wf))
    assert entry["status"]["status_str"] == "success", entry["status"]
    saved = [img for out in entry["outputs"].values() for img in out.get("images", []) if img["type"] == "output"]
    with Image.open(server.base / "output" / saved[0]["subfolder"] / saved[0]["filename"]) as img:
        assert img.size == (64, 64) and not np.asarray(img.convert("RGB")).any()


def test_free_route_releases_the_cached_pipeline(server):
    """The route sets a flag; the prompt worker frees between prompts, at once when idle (the flag wakes it).
    A free during a prompt: tests/test_comfyui_free_route.py."""

    def freed_lines(state):
        return server.log().count(f"freed cached models between prompts (pipeline was {state})")

    server.wait_history(server.queue_prompt(tiny_workflow()))
    loaded, empty = freed_lines("loaded"), freed_lines("not loaded")
    assert server.post("/sdxlcn/free", {}) == (200, {"scheduled": True})
    wait_until(lambda: freed_lines("loaded") == loaded + 1, "a free of the loaded pipeline", 60)
    assert server.post("/sdxlcn/free", {}) == (200, {"scheduled": True})
    wait_until(lambda: freed_lines("not loaded") == empty + 1, "a free with nothing loaded", 60)
    ok = server.wait_history(server.queue_prompt(tiny_workflow()))  # loads again on the next run
    assert ok["status"]["status_str"] == "success"
