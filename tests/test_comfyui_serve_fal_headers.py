"""fal's queue headers on ComfyUI's endpoint (issue 33, item 5), sent by fal's own Python client (``fal_client``'s
``start_timeout`` and ``priority``) to a real ComfyUI whose own queue runs the requests:

- ``x-fal-request-timeout``: a request still waiting in ComfyUI's queue when its time is up ends timed out (fal_client
  gets 504) and its prompt leaves that queue: ComfyUI freed a moment later never runs it;
- ``x-fal-queue-priority: low``: a normal request submitted after two low ones runs before them (the order ComfyUI ran
  them in, from its history), and fal_client's queue positions say so.

As in ``test_comfyui_serve_queue.py``, a long plain ComfyUI prompt runs first, so that the served requests wait.
"""

from __future__ import annotations

import json
import time

import pytest

from comfyui_harness import ROOT, SKIP_REASON, comfyui_dir, wait_until
from test_serve import fal_input

pytestmark = pytest.mark.skipif(comfyui_dir() is None, reason=SKIP_REASON)
# ``serving``, the real ComfyUI these tests call, is tests/conftest.py's fixture (one per module)

TIMEOUT_S = 3  # a request's x-fal-request-timeout: long enough to see it wait in ComfyUI's queue first
AFTER_S = 1.0  # how long after its timeout ComfyUI's worker is freed for it
ROUNDS = 3  # freed while a request's end may still be due: a server that ends it late passes one round by chance
SAMPLERS = 25  # the long prompt's samplers: 50 short steps each, so that ComfyUI's Cancel stops it within a step


def block(serving, seed: int) -> str:
    """A long plain ComfyUI prompt, running once this returns, that ComfyUI's Cancel stops within a step (a fraction
    of a second): many samplers of short steps, where ``Serving.block``'s few long ones take seconds to stop."""
    wf = json.loads((ROOT / "workflows" / "api" / "sdxl_controlnet_img2img_tiny.json").read_text())
    wf["1"]["inputs"]["image"] = "sdxlcn_test_image.png"
    sampler, _save = wf.pop("4"), wf.pop("5")
    for i in range(SAMPLERS):
        wf[f"s{i}"] = {**sampler, "inputs": {**sampler["inputs"], "num_inference_steps": 50, "strength": 1.0,
                                             "width": 256, "height": 256, "seed": seed + i}}
        wf[f"p{i}"] = {"class_type": "PreviewImage", "inputs": {"images": [f"s{i}", 0]}}
    blocker = serving.comfy.queue_prompt(wf)
    wait_until(lambda: serving.queue()[0] == [blocker], "the long prompt running")
    return blocker


def started_at(serving, prompt_id: str) -> int:
    """When ComfyUI started the prompt: its history's ``execution_start`` message (ms)."""
    entry = serving.comfy.get(f"/history/{prompt_id}")[prompt_id]
    return next(data["timestamp"] for kind, data in entry["status"]["messages"] if kind == "execution_start")


def test_a_request_past_its_timeout_leaves_comfyuis_queue_and_never_runs(serving):
    """Its time is up while it waits behind the long prompt; ComfyUI's worker is free a moment later. Nothing but the
    server looks at it meanwhile (no status call), as with a client that only waits for its webhook."""
    for round_ in range(ROUNDS):
        blocker = block(serving, 1000 + 100 * round_)  # seeds of its own: nothing of it comes from ComfyUI's cache
        try:
            submitted = time.monotonic()
            rid = serving.fal.submit(fal_input(seed=11 + round_), start_timeout=TIMEOUT_S)["request_id"]
            wait_until(lambda: rid in serving.queue()[1], "the request waiting in ComfyUI's queue", TIMEOUT_S)
            time.sleep(max(0.0, submitted + TIMEOUT_S + AFTER_S - time.monotonic()))
            assert serving.queue()[0] == [blocker]  # still waiting behind it when its time was up
        finally:
            serving.unblock(blocker)  # ComfyUI's worker takes the next prompt of its queue at once
        wait_until(lambda: serving.queue() == ([], []), "ComfyUI's queue empty", deadline_s=60)
        st = serving.fal.status(rid)
        assert (st["kind"], st["error_type"]) == ("Completed", "request_timeout"), (round_, st)
        # fal_client gets the timeout's 504 for it (and does not retry it), never a late result
        res = serving.fal.result(rid)
        assert (res.get("http_error"), res.get("request_id_header")) == (504, rid), (round_, res)
        assert serving.comfy.get(f"/history/{rid}") == {}, round_  # out of ComfyUI's queue before it could run
        wait_until(lambda: not serving.input_files(rid), "the timed-out request's input files deleted", 15)


def test_a_normal_request_runs_before_the_low_priority_ones_queued_before_it(serving):
    blocker = block(serving, 2000)
    ids = {}
    try:
        for name in ("low1", "low2"):
            ids[name] = serving.fal.submit(fal_input(seed=len(ids) + 20), priority="low")["request_id"]
        # nothing normal waits: ComfyUI's queue holds them, as any request
        wait_until(lambda: {ids["low1"], ids["low2"]} <= set(serving.queue()[1]), "the low requests in ComfyUI's "
                   "queue", deadline_s=30)
        ids["normal"] = serving.fal.submit(fal_input(seed=30))["request_id"]
        wait_until(lambda: ids["normal"] in serving.queue()[1], "the normal request in ComfyUI's queue", 30)
        positions = {name: serving.fal.status(rid)["position"] for name, rid in ids.items()}
        assert positions == {"normal": 0, "low1": 1, "low2": 2}, positions
    finally:
        serving.unblock(blocker)
    for rid in ids.values():
        wait_until(lambda rid=rid: serving.fal.status(rid)["kind"] == "Completed", "the requests finishing", 240)
        assert "result" in serving.fal.result(rid)
    ran = sorted(ids, key=lambda name: started_at(serving, ids[name]))
    assert ran == ["normal", "low1", "low2"], ran
