"""A real ComfyUI 0.8.0 as a worker of a shared queue (issue 34): ComfyUI started with ``SDXLCN_SERVE_QUEUE`` (a
real ``redis-server``, tests/helpers/redis_server.py) takes the requests submitted to a plain ``serve --workers 0`` API node
into its own prompt queue (its prompt id the request id), and the API node answers their status, result and image.
ComfyUI's Cancel (``POST /interrupt``) stops a shared request there, which ends cancelled as fal's cancel ends it.
"""

from __future__ import annotations

import shutil

import pytest

from comfyui_harness import SKIP_REASON, comfyui_dir, running_comfyui, wait_until
from redis_server import RedisServer
from serve_nodes import start_node, wait_completed
from test_serve import APP, KEY, fal_input

pytestmark = pytest.mark.skipif(comfyui_dir() is None, reason=SKIP_REASON)
MODELS = {"checkpoint": "tiny-sdxl", "controlnet": "tiny-controlnet-canny"}
REQUESTS = f"{APP.rsplit('/', 1)[0]}/requests"


def test_comfyui_runs_requests_from_a_shared_queue_fed_by_a_serve_api_node(tmp_path, tiny_models):
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed: apt-get install redis-server (Debian's package; .ci/run does)")
    pytest.importorskip("rq", reason="the redis extra is not installed: pip install -e '.[redis]'")
    redis = RedisServer(tmp_path / "redis").start()
    api = start_node(tmp_path, "api", redis.url).wait_ready()
    env = {"SDXLCN_SERVE_QUEUE": redis.url, "SDXLCN_SERVE_KEY": KEY, "SDXLCN_SERVE_CHECKPOINT": MODELS["checkpoint"],
           "SDXLCN_SERVE_CONTROLNET": MODELS["controlnet"], "SDXLCN_FAL_URL": None, "FAL_KEY": None}
    models = {"diffusers": {MODELS["checkpoint"]: tiny_models["checkpoint"]},
              "controlnet": {MODELS["controlnet"]: tiny_models["controlnet"]}}
    try:
        with running_comfyui(tmp_path / "comfy", models, env=env) as comfy:
            assert comfy.import_problem() is None, comfy.import_problem()
            code, sub, _ = api.call("POST", APP, fal_input(seed=7))
            assert code == 200, sub
            rid = sub["request_id"]
            status = wait_completed(api, rid, deadline_s=240)
            assert "error" not in status, status
            assert "queued in ComfyUI" in [x["message"] for x in status["logs"]], status["logs"]
            history = comfy.get(f"/history/{rid}")
            assert rid in history and history[rid]["status"]["status_str"] == "success", history  # ran as a prompt
            code, result, _ = api.call("GET", f"{REQUESTS}/{rid}")
            assert code == 200 and result["seed"] == 7 and len(result["images"]) == 1, result
            code, png, headers = api.call("GET", result["images"][0]["url"], key=None)
            assert code == 200 and headers["Content-Type"] == "image/png" and png[1:4] == b"PNG"

            # a longer one, stopped with ComfyUI's own Cancel while it runs there
            code, sub, _ = api.call("POST", APP, fal_input(seed=8, num_inference_steps=50,
                                                           image_size={"width": 512, "height": 512}))
            assert code == 200, sub
            rid = sub["request_id"]
            wait_until(lambda: any(item[1] == rid for item in comfy.get("/queue")["queue_running"]),
                       "the request running in ComfyUI's queue", deadline_s=120, every_s=0.05)
            wait_until(lambda: any(x["message"].startswith("step ") for x in api.call(
                "GET", f"{REQUESTS}/{rid}/status?logs=1")[1]["logs"]), "a step done", deadline_s=120, every_s=0.05)
            assert comfy.post("/interrupt", {"prompt_id": rid})[0] == 200
            status = wait_completed(api, rid, deadline_s=120)
            assert status.get("error_type") == "request_cancelled", status
            code, body, _ = api.call("GET", f"{REQUESTS}/{rid}")
            assert code == 400 and body["detail"] == "Request cancelled", body
            assert KEY not in comfy.log()
    finally:
        api.stop()
        redis.stop()
