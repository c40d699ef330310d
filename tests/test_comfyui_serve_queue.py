"""A served request waiting in a real ComfyUI's own queue (issue 31): fal's cancel takes it out of that queue, and
ComfyUI's Clear Queue or Delete ends it cancelled, as fal's cancel ends a request; either way its input files go.

The serving ComfyUI runs the pack on tiny models with a key; fal's own Python client (``fal_client``) calls it through
a local TLS terminator (fal_client speaks https only). A long plain ComfyUI prompt runs first, so that the served
requests wait behind it in ComfyUI's queue.
"""

from __future__ import annotations

import contextlib
import json

import pytest

from comfyui_harness import ROOT, SKIP_REASON, comfyui_dir, running_comfyui, wait_until
from fal_python_client import FalPythonClient
from pictures import make_test_image
from test_serve import KEY, fal_input

pytestmark = pytest.mark.skipif(comfyui_dir() is None, reason=SKIP_REASON)
# ``serving``, the real ComfyUI these tests call, is tests/conftest.py's fixture (one per module)

MODELS = {"checkpoint": "tiny-sdxl", "controlnet": "tiny-controlnet-canny"}
CANCELLED = {"kind": "Completed", "error": "Request cancelled", "error_type": "request_cancelled"}


class Serving:
    def __init__(self, root, tiny_models, stack: contextlib.ExitStack):
        from test_serve_cli import make_cert
        from test_serve_tls_proxy import TlsProxy

        (root / "input").mkdir(parents=True)
        make_test_image(64, 64, 1).save(root / "input" / "sdxlcn_test_image.png")
        env = {"SDXLCN_SERVE_KEY": KEY, "SDXLCN_SERVE_CHECKPOINT": MODELS["checkpoint"],
               "SDXLCN_SERVE_CONTROLNET": MODELS["controlnet"], "SDXLCN_FAL_URL": None, "FAL_KEY": None}
        models = {"diffusers": {MODELS["checkpoint"]: tiny_models["checkpoint"]},
                  "controlnet": {MODELS["controlnet"]: tiny_models["controlnet"]}}
        self.comfy = stack.enter_context(running_comfyui(root, models, env=env))
        cert, key = make_cert(root)
        proxy = TlsProxy(self.comfy.url, cert, key)
        stack.callback(proxy.stop)
        self.fal = FalPythonClient(f"127.0.0.1:{proxy.port}/sdxlcn/fal", cert, KEY)
        stack.callback(self.fal.close)

    def queue(self) -> tuple[list[str], list[str]]:
        """The prompt ids ComfyUI runs and holds waiting (its ``GET /queue``)."""
        q = self.comfy.get("/queue")
        return [item[1] for item in q["queue_running"]], [item[1] for item in q["queue_pending"]]

    def input_files(self, request_id: str) -> list[str]:
        """The request's files in ComfyUI's input folder and its input images in the pack's store."""
        comfy = [p.name for p in (self.comfy.base / "input").iterdir() if request_id in p.name]
        folder = self.comfy.base / "user" / "sdxl_controlnet_img2img" / "serve" / "requests" / request_id
        stored = [p.name for p in folder.iterdir() if p.name in ("image_url", "control_image_url")] \
            if folder.is_dir() else []
        return comfy + stored

    def block(self) -> str:
        """A long plain ComfyUI prompt, running once this returns."""
        wf = json.loads((ROOT / "workflows" / "api" / "sdxl_controlnet_img2img_tiny.json").read_text())
        wf["1"]["inputs"]["image"] = "sdxlcn_test_image.png"
        wf["4"]["inputs"].update(num_inference_steps=50, strength=1.0, width=1536, height=1536)
        blocker = self.comfy.queue_prompt(wf)
        wait_until(lambda: self.queue()[0] == [blocker], "the long prompt running")
        return blocker

    def unblock(self, blocker: str) -> None:
        assert self.comfy.post("/interrupt", {"prompt_id": blocker})[0] == 200
        self.comfy.wait_history(blocker, 120)

    def waiting(self, arguments: dict) -> str:
        """A served request, once it waits in ComfyUI's queue with its input files written."""
        sub = self.fal.submit(arguments)
        assert "request_id" in sub, sub
        rid = sub["request_id"]
        wait_until(lambda: rid in self.queue()[1], "the served request waiting in ComfyUI's queue", deadline_s=30)
        assert len(self.input_files(rid)) == 4, self.input_files(rid)
        assert self.fal.status(rid)["kind"] == "Queued"
        return rid


def test_fal_cancel_takes_a_waiting_request_out_of_comfyuis_queue(serving):
    blocker = serving.block()
    try:
        rid = serving.waiting(fal_input(seed=3))
        assert serving.fal.cancel(rid) == {"cancelled": True}
        # out of ComfyUI's queue (it stayed there, and ran after the long prompt), its files gone (they stayed)
        wait_until(lambda: rid not in serving.queue()[1], "the cancelled request out of ComfyUI's queue",
                   deadline_s=15)
        wait_until(lambda: not serving.input_files(rid), "the cancelled request's input files deleted", deadline_s=15)
        st = serving.fal.status(rid)
        assert {k: st[k] for k in CANCELLED} == CANCELLED, st
        assert serving.fal.result(rid) == {"http_error": 400, "message": "Request cancelled",
                                           "request_id_header": rid}
    finally:
        serving.unblock(blocker)
    assert serving.queue() == ([], [])
    assert serving.comfy.get(f"/history/{rid}") == {}  # it never ran


def test_clear_queue_and_delete_in_comfyui_end_the_served_requests_cancelled(serving):
    blocker = serving.block()
    try:
        first, second = serving.waiting(fal_input(seed=4)), serving.waiting(fal_input(seed=5))
        # the user deletes the first one in ComfyUI's queue panel (POST /queue {"delete": [...]})
        assert serving.comfy.post("/queue", {"delete": [first]})[0] == 200
        wait_until(lambda: serving.fal.status(first)["kind"] == "Completed", "the deleted request ending",
                   deadline_s=15)
        st = serving.fal.status(first)
        assert {k: st[k] for k in CANCELLED} == CANCELLED, st
        assert any("Clear Queue" in line for line in st["logs"]), st["logs"]  # the log says what happened
        assert serving.fal.result(first)["http_error"] == 400
        wait_until(lambda: not serving.input_files(first), "the deleted request's input files deleted", deadline_s=15)
        assert serving.fal.status(second)["kind"] == "Queued"  # only the one the user deleted
        # then Clear Queue (POST /queue {"clear": true})
        assert serving.comfy.post("/queue", {"clear": True})[0] == 200
        wait_until(lambda: serving.fal.status(second)["kind"] == "Completed", "the cleared request ending",
                   deadline_s=15)
        st = serving.fal.status(second)
        assert {k: st[k] for k in CANCELLED} == CANCELLED, st
        wait_until(lambda: not serving.input_files(second), "the cleared request's input files deleted",
                   deadline_s=15)
    finally:
        serving.unblock(blocker)
    # a request submitted after all this still runs to its image
    sub = serving.fal.submit(fal_input(seed=6))
    wait_until(lambda: serving.fal.status(sub["request_id"])["kind"] == "Completed", "a later request", 180)
    res = serving.fal.result(sub["request_id"])["result"]
    assert res["seed"] == 6 and len(res["images"]) == 1, res
