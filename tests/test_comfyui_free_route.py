"""``POST /sdxlcn/free`` in a real ComfyUI server (skipped without COMFYUI_DIR): like ComfyUI's own ``/free`` it only
sets a flag that the prompt worker acts on between prompts, so a free asked for while a prompt runs waits for that
prompt (which succeeds) and then gives the pipeline's memory back; asked for while the server is idle it frees at
once. The models are widened tiny ones (~700 MB in fp32), big enough to show in the server's RSS."""

from __future__ import annotations

import json
import time

import pytest

from comfyui_harness import ROOT, SKIP_REASON, comfyui_dir, running_comfyui, wait_until

pytestmark = pytest.mark.skipif(comfyui_dir() is None, reason=SKIP_REASON)

FREED = "SDXL ControlNet: freed cached models between prompts (pipeline was {})"
EXECUTED = "Prompt executed in"


@pytest.fixture(scope="module")
def medium_models(tmp_path_factory):
    from sdxl_controlnet_img2img.pipeline.local.tiny_models import build_tiny_models

    models = build_tiny_models(tmp_path_factory.mktemp("medium-models"), seed=1, scale=8)
    size = sum(f.stat().st_size for d in models.values() for f in d.rglob("*.safetensors"))
    return models, size


def _workflow(steps: int, seed: int, num_images: int = 1) -> dict:
    wf = json.loads((ROOT / "workflows" / "api" / "sdxl_controlnet_img2img_tiny.json").read_text())
    for node in wf.values():
        if node["class_type"] == "SDXLCNLoader":
            node["inputs"].update(checkpoint="medium-sdxl", controlnet="medium-controlnet")
        if node["class_type"] == "SDXLCNImg2Img":
            node["inputs"].update(num_inference_steps=steps, strength=1.0, seed=seed, num_images=num_images)
    return wf


def _succeeds(server, prompt_id):
    entry = server.wait_history(prompt_id, deadline_s=300)
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[-2000:]


def _running(server, prompt_id) -> bool:
    return any(item[1] == prompt_id for item in server.get("/queue")["queue_running"])


def _rss_below(server, limit: float, deadline_s: float = 30) -> int:
    """The server's RSS once it is below ``limit`` (the memory is given back), or after ``deadline_s``."""
    end = time.monotonic() + deadline_s
    while (rss := server.rss_bytes()) >= limit and time.monotonic() < end:
        time.sleep(0.25)
    return rss


def _log_with(server, text: str) -> str:
    """The server's log once it holds ``text``."""
    return wait_until(lambda: text in (log := server.log()) and log, f"{text!r} in the log", 60, 0.05)


def test_free_during_a_prompt_waits_for_it_and_frees_after(tmp_path, medium_models):
    models, size = medium_models
    links = {"diffusers": {"medium-sdxl": models["checkpoint"]}, "controlnet": {"medium-controlnet": models["controlnet"]}}
    with running_comfyui(tmp_path / "base", links) as server:
        _succeeds(server, server.queue_prompt(_workflow(steps=2, seed=1)))
        loaded = server.rss_bytes()

        # a long prompt on the loaded pipeline; the free arrives while it runs
        prompt_id = server.queue_prompt(_workflow(steps=12, seed=2))
        wait_until(lambda: _running(server, prompt_id), "the prompt running", 60, 0.05)
        assert server.post("/sdxlcn/free", {}) == (200, {"scheduled": True})
        assert _running(server, prompt_id), "the prompt ended before the free arrived: make it longer"
        assert FREED.format("loaded") not in server.log()  # not freed under the running prompt
        _succeeds(server, prompt_id)

        # ... and freed right after it, by the prompt worker, between prompts
        log = _log_with(server, FREED.format("loaded"))
        before_free = log[:log.index(FREED.format("loaded"))]
        assert before_free.count(EXECUTED) == 2, "\n".join(  # both prompts had finished
            ln for ln in log.splitlines() if EXECUTED in ln or FREED.format("loaded") in ln)
        freed = _rss_below(server, loaded - 0.7 * size)
        assert loaded - freed > 0.7 * size, f"the free gave back {(loaded - freed) / size:.2f} of a pipeline"

        # idle: the flag wakes the worker, which frees at once (nothing loaded now, then a loaded pipeline)
        assert server.post("/sdxlcn/free", {}) == (200, {"scheduled": True})
        _log_with(server, FREED.format("not loaded"))
        _succeeds(server, server.queue_prompt(_workflow(steps=2, seed=3)))  # loads it again
        reloaded = server.rss_bytes()
        assert server.post("/sdxlcn/free", {}) == (200, {"scheduled": True})
        wait_until(lambda: server.log().count(FREED.format("loaded")) == 2, "the second free", 60, 0.05)
        again = _rss_below(server, reloaded - 0.7 * size)
        assert reloaded - again > 0.7 * size
        print(f"\npipeline files {size / 1e6:.0f} MB; RSS loaded {loaded / 1e6:.0f} MB, after the free that waited "
              f"for the running prompt {freed / 1e6:.0f} MB; reloaded {reloaded / 1e6:.0f} MB, after an idle free "
              f"{again / 1e6:.0f} MB")
