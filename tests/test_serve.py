"""The fal-protocol server (pipeline/serve) in this process: real HTTP on 127.0.0.1, the tiny pipeline on the CPU.

Protocol calls with plain HTTP (submit, status with logs, result, cancel, sync run, webhook), every refusal in fal's
shape, a restart of the store, and this pack's own fal client pointed at the server by SDXLCN_FAL_URL.
"""

from __future__ import annotations

import base64
import io
import json
import time
import urllib.error
import urllib.request

import pytest

from loopback import WebhookReceiver
from pictures import make_test_image

APP = "fal-ai/fast-sdxl-controlnet-canny/image-to-image"
KEY = "serve-test-key-0123456789"


def data_uri(img) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def fal_input(**changes) -> dict:
    body = {"prompt": "a red fortress", "image_url": data_uri(make_test_image(64, 64, 1)),
            "control_image_url": data_uri(make_test_image(64, 64, 2)), "num_inference_steps": 2, "strength": 1.0,
            "seed": 7, "guidance_scale": 1.0}
    body.update(changes)
    return body


def call(method, url, body=None, key=KEY, headers=None, raw=False):
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    h = {"Content-Type": "application/json", **(headers or {})}
    if key:
        h["Authorization"] = f"Key {key}"
    req = urllib.request.Request(url, data=data, method=method, headers=h)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            payload = r.read()
            return r.status, (payload if raw else json.loads(payload or b"null")), dict(r.headers)
    except urllib.error.HTTPError as e:
        payload = e.read()
        return e.code, json.loads(payload or b"null"), dict(e.headers)


class Paused:
    """A backend that runs nothing (requests stay queued): what a busy server looks like."""

    def queued(self, job):
        pass

    def cancel(self, job):
        pass

    def hooks(self):
        return frozenset()


def start(tmp_path, backend=None, pipe=None, key=KEY, **limits):
    from sdxl_controlnet_img2img.pipeline.serve.app import ServeApp
    from sdxl_controlnet_img2img.pipeline.serve.cli import StandaloneServer
    from sdxl_controlnet_img2img.pipeline.serve.inputs import Limits
    from sdxl_controlnet_img2img.pipeline.serve.store import Store
    from sdxl_controlnet_img2img.pipeline.serve.webhook import Webhooks
    from sdxl_controlnet_img2img.pipeline.serve.worker import LocalWorkers

    store = Store(tmp_path / "data")
    store.requeue_interrupted()
    workers = None
    if backend is None:
        workers = backend = LocalWorkers(store, {"cpu": pipe})
    app = ServeApp(store, backend, key=key, limits=Limits(**limits))
    hooks = Webhooks(store, app.payload_for).start()
    server = StandaloneServer(app).start()
    if workers is not None:
        workers.start()

    def stop():
        server.stop()
        if workers is not None:
            workers.stop()
        hooks.stop()
        store.close()

    server.stop_all = stop
    return server


def wait_done(url, deadline_s=120):
    end = time.monotonic() + deadline_s
    seen = []
    while time.monotonic() < end:
        code, body, _ = call("GET", url + "?logs=1")
        assert code == 200, body
        seen.append(body)
        if body["status"] == "COMPLETED":
            return body, seen
        time.sleep(0.05)
    raise AssertionError(f"not done within {deadline_s} s: {seen[-1]}")


def test_queue_protocol_gives_the_local_pipelines_pixels(tmp_path, tiny_pipe):
    import numpy as np
    from PIL import Image

    from sdxl_controlnet_img2img.pipeline.local.generate import generate
    from sdxl_controlnet_img2img.pipeline.request import GenerationRequest

    server = start(tmp_path, pipe=tiny_pipe)
    try:
        code, sub, headers = call("POST", f"{server.url}/{APP}", fal_input())
        assert code == 200, sub
        rid = sub["request_id"]
        assert headers["x-fal-request-id"] == rid and len(rid) == 36
        assert sub["status_url"] == f"{server.url}/fal-ai/fast-sdxl-controlnet-canny/requests/{rid}/status"
        done, seen = wait_done(sub["status_url"])
        assert "error" not in done and done["metrics"]["inference_time"] > 0
        messages = [entry["message"] for entry in done["logs"]]
        assert "step 2/2" in messages, messages
        code, result, _ = call("GET", sub["response_url"])
        assert code == 200 and result["seed"] == 7 and result["has_nsfw_concepts"] == [False]
        entry = result["images"][0]
        assert (entry["width"], entry["height"], entry["content_type"]) == (64, 64, "image/png")
        code, png, headers = call("GET", entry["url"], key=None, raw=True)  # fal's image URLs need no key
        assert code == 200 and headers["Content-Type"] == "image/png"
        got = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
        req = GenerationRequest.from_dict({**fal_input(), "image_url": make_test_image(64, 64, 1),
                                           "control_image_url": make_test_image(64, 64, 2)})
        want = np.asarray(generate(tiny_pipe, req).images[0])
        assert np.array_equal(got, want)
        # sync_mode: a data URI, and fal's synchronous run answers the result itself
        code, result, headers = call("POST", f"{server.url}/run/{APP}", fal_input(sync_mode=True))
        assert code == 200, result
        assert result["images"][0]["url"].startswith("data:image/png;base64,")
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(base64.b64decode(
            result["images"][0]["url"].split(",", 1)[1]))).convert("RGB")), want)
    finally:
        server.stop_all()


def test_refusals_in_fals_shapes(tmp_path):
    server = start(tmp_path, backend=Paused(), max_waiting=1, max_body_bytes=200_000)
    base = f"{server.url}/{APP}"
    try:
        code, body, _ = call("POST", base, fal_input(), key="wrong-key")
        assert code == 401 and "wrong-key" not in json.dumps(body)
        assert call("POST", base, fal_input(), key=None)[0] == 401
        for bad, loc in (({"strength": 3}, ["body", "strength"]), ({"prompt": None}, ["body", "prompt"]),
                         ({"image_url": "/etc/passwd"}, ["body", "image_url"]),
                         ({"control_image_url": "file:///etc/hosts"}, ["body", "control_image_url"]),
                         ({"image_url": "data:image/png;base64,bm90IGFuIGltYWdl"}, ["body", "image_url"]),
                         ({"loras": [{"path": "/models/x.safetensors"}]}, ["body", "loras", 0, "path"]),
                         ({"num_images": 9}, ["body", "num_images"]), ({"bogus": 1}, ["body", "bogus"]),
                         ({"image_size": {"width": 4096, "height": 4096}}, ["body", "image_size"])):
            code, body, _ = call("POST", base, fal_input(**bad))
            assert code == 422, (bad, body)
            assert body["detail"][0]["loc"] == loc and body["detail"][0]["msg"], body
        code, body, _ = call("POST", base, b"{not json")
        assert code == 422 and body["detail"][0]["loc"] == ["body"]
        code, body, _ = call("POST", base, fal_input(prompt="x" * 300_000))
        assert code == 413
        code, body, _ = call("POST", base, fal_input(), headers={}, key=KEY)
        assert code == 200
        code, body, headers = call("POST", base, fal_input())
        assert code == 429 and "full" in body["detail"] and headers.get("Retry-After")
        assert call("POST", f"{server.url}/fal-ai/flux/dev", fal_input())[0] == 404
        assert call("GET", f"{server.url}/{APP}/requests/../../etc/passwd")[0] == 404
        assert call("GET", f"{server.url}/{APP}/requests/not-a-uuid/status")[0] == 404
        code, body, _ = call("GET", f"{server.url}/{APP}/requests/3f2b8c1e-0d4a-4b6e-9c7f-1a2b3c4d5e6f")
        assert code == 404 and "not found" in body["detail"]
        # through a proxy (what fal.js sends with proxyUrl): only this endpoint, nothing forwarded
        for target in ("https://queue.fal.run/fal-ai/flux/dev", "https://evil.example/fal-ai/fast-sdxl-controlnet"
                                                                 "-canny/image-to-image"):
            code, body, _ = call("POST", f"{server.url}/proxy", fal_input(), headers={"x-fal-target-url": target})
            assert code == 404 and "forwards nothing" in body["detail"]
        # fal's storage through the proxy: answered here (tests/test_serve_uploads.py), any other call on its host 404
        code, body, _ = call("POST", f"{server.url}/proxy", {"file_name": "a.png"},
                             headers={"x-fal-target-url": "https://rest.fal.ai/storage/upload/initiate"})
        assert code == 200 and body["upload_url"].startswith(f"{server.url}/storage/upload/"), body
        code, body, _ = call("POST", f"{server.url}/proxy", fal_input(),
                             headers={"x-fal-target-url": f"https://rest.fal.ai/{APP}"})
        assert code == 404 and "forwards nothing" in body["detail"]
        # a page on an origin the operator did not list gets no CORS headers (tests/test_serve_access.py: listed)
        code, _b, headers = call("OPTIONS", f"{server.url}/proxy", key=None, headers={"Origin": "https://page.example"})
        assert code == 403 and not [h for h in headers if h.lower().startswith("access-control-")], headers
    finally:
        server.stop_all()


def test_an_optional_model_the_server_lacks_is_refused_with_a_hint_it_can_follow(tmp_path):
    """The refusal's advice names only options that `serve` really has (its own parser is the truth)."""
    import argparse
    import re

    from sdxl_controlnet_img2img.pipeline.serve.cli import add_serve_parser

    sub = argparse.ArgumentParser().add_subparsers()
    add_serve_parser(sub)
    options = set(sub.choices["serve"]._option_string_actions)
    server = start(tmp_path, backend=Paused())
    try:
        for name in ("enable_safety_checker", "expand_prompt"):
            code, body, _ = call("POST", f"{server.url}/{APP}", fal_input(**{name: True}))
            assert code == 422 and body["detail"][0]["loc"] == ["body", name], body
            msg = body["detail"][0]["msg"]
            assert "false" in msg and set(re.findall(r"--[a-z][a-z-]+", msg)) <= options, msg
    finally:
        server.stop_all()


def test_cancel_restart_and_webhook(tmp_path, tiny_pipe, monkeypatch):
    monkeypatch.setenv("SDXLCN_SERVE_ALLOW_INTERNAL_URLS", "127.0.0.1")  # the receiver is on this machine
    hook = WebhookReceiver()
    hook_url = f"{hook.url}/done?x=1"
    server = start(tmp_path, backend=Paused())
    try:  # queued while nothing runs: position, cancel, then a "crash" with one request still waiting
        code, first, _ = call("POST", f"{server.url}/{APP}?fal_webhook={urllib.request.quote(hook_url, safe='')}",
                              fal_input())
        assert code == 200 and first["gateway_request_id"] == first["request_id"]
        _c, second, _ = call("POST", f"{server.url}/{APP}", fal_input(seed=8))
        code, st, _ = call("GET", second["status_url"])
        assert st["status"] == "IN_QUEUE" and st["queue_position"] == 1
        assert call("PUT", second["cancel_url"])[0] == 202
        code, st, _ = call("GET", second["status_url"])
        assert st["status"] == "COMPLETED" and st["error_type"] == "request_cancelled"
        assert call("GET", second["response_url"])[0] == 400
        assert call("PUT", second["cancel_url"])[:2] == (400, {"status": "ALREADY_COMPLETED"})
    finally:
        server.stop_all()
    server = start(tmp_path, pipe=tiny_pipe)  # the same data folder: the accepted request runs now
    try:
        base = server.url + "/fal-ai/fast-sdxl-controlnet-canny/requests/"
        done, _seen = wait_done(base + first["request_id"] + "/status")
        assert "error" not in done
        assert hook.got.wait(30), "the webhook never came"
        body = json.loads(hook.received[0][1])
        assert body["request_id"] == first["request_id"] and body["status"] == "OK" and body["error"] is None
        assert body["payload"]["images"][0]["width"] == 64
    finally:
        server.stop_all()
        hook.close()
    server = start(tmp_path, backend=Paused())  # after another restart the finished result is still there
    try:
        code, result, _ = call("GET", server.url + "/fal-ai/fast-sdxl-controlnet-canny/requests/" + first["request_id"])
        assert code == 200 and result["seed"] == 7
        assert call("GET", result["images"][0]["url"], key=None, raw=True)[0] == 200
    finally:
        server.stop_all()


def test_the_packs_fal_client_uses_the_endpoint_from_the_environment(tmp_path, tiny_pipe, monkeypatch):
    from sdxl_controlnet_img2img.pipeline.fal.client import fetch_remote_result, run_remote
    from sdxl_controlnet_img2img.pipeline.fal.errors import FalValidationError
    from sdxl_controlnet_img2img.pipeline.fal.settings import FalSettings
    from sdxl_controlnet_img2img.pipeline.request import GenerationRequest

    server = start(tmp_path, pipe=tiny_pipe)
    try:
        monkeypatch.setenv("SDXLCN_FAL_URL", server.url)
        monkeypatch.setenv("FAL_KEY", KEY)
        settings = FalSettings(http_timeout_s=10.0, max_retries=1, poll_interval_s=0.05)
        log_dir = tmp_path / "log"
        statuses = []
        req = GenerationRequest.from_dict(fal_input())
        result = run_remote(req, settings=settings, request_log_dir=log_dir, on_status=statuses.append, timeout_s=120)
        assert result.images[0].size == (64, 64) and result.seed == 7
        rid = statuses[0].request_id
        assert any("step 1/2" in line for s in statuses for line in s.logs)
        again = fetch_remote_result(rid, settings=settings, request_log_dir=log_dir, timeout_s=30)
        assert again.images[0].tobytes() == result.images[0].tobytes()
        for bad in ("http://192.168.1.5:8443", "ftp://x", "https://host/x?y=1"):
            monkeypatch.setenv("SDXLCN_FAL_URL", bad)
            with pytest.raises(FalValidationError, match="SDXLCN_FAL_URL"):
                FalSettings()
    finally:
        server.stop_all()


def test_public_url_is_the_base_of_every_url_the_server_answers(tmp_path, tiny_pipe):
    """``serve --public-url`` (behind a load balancer: this server's own address as clients reach it): the submit's
    and status's URLs and the result's image URLs are built on it, not on the Host header a request came with."""
    import argparse
    import urllib.parse

    from sdxl_controlnet_img2img.pipeline.serve.cli import StandaloneServer, add_serve_parser, build_app
    from sdxl_controlnet_img2img.pipeline.serve.store import Store
    from sdxl_controlnet_img2img.pipeline.serve.worker import LocalWorkers

    public = "https://gpu-1.lan:9443"
    parser = argparse.ArgumentParser()
    add_serve_parser(parser.add_subparsers())
    args = parser.parse_args(["serve", "--checkpoint", "c", "--controlnet", "n", "--public-url", public + "/"])
    store = Store(tmp_path / "data")
    workers = LocalWorkers(store, {"cpu": tiny_pipe})
    server = StandaloneServer(build_app(store, workers, args, KEY)).start()
    workers.start()
    try:
        code, sub, _ = call("POST", f"{server.url}/{APP}", fal_input())
        assert code == 200, sub
        root = f"{public}/fal-ai/fast-sdxl-controlnet-canny/requests/{sub['request_id']}"
        assert (sub["status_url"], sub["response_url"], sub["cancel_url"]) == (root + "/status", root, root + "/cancel")
        local = server.url + "/fal-ai/fast-sdxl-controlnet-canny/requests/" + sub["request_id"]
        done, _seen = wait_done(local + "/status")
        assert (done["status_url"], done["response_url"]) == (root + "/status", root)
        code, result, _ = call("GET", local)
        assert code == 200, result
        url = result["images"][0]["url"]
        assert url.startswith(public + "/files/") and url.endswith("/0.png"), url
        code, png, _ = call("GET", server.url + urllib.parse.urlsplit(url).path, key=None, raw=True)
        assert code == 200 and png.startswith(b"\x89PNG")
        # through a proxy (fal.js with proxyUrl) the client expects fal's own URLs, which it sends through the proxy
        code, sub, _ = call("POST", f"{server.url}/proxy", fal_input(seed=3),
                            headers={"x-fal-target-url": f"https://queue.fal.run/{APP}"})
        assert code == 200 and sub["status_url"].startswith("https://queue.fal.run/"), sub
    finally:
        server.stop()
        workers.stop()
        store.close()
