"""Two real ComfyUI 0.8.0 servers with the pack, on tiny models: the *serving* one answers fal's queue API under
/sdxlcn/fal (nodes/serve_routes.py, each request a prompt in its own queue; key and models from SDXLCN_SERVE_*), and
the *first* one's fal node (SDXLCNFalImg2Img in an API workflow), pointed at it by SDXLCN_FAL_URL with FAL_KEY = the
serving key, gets the serving side's pixels. ComfyUI's Cancel (/interrupt) on the serving side, and Cancel of the
first ComfyUI's prompt, stop a request in fal's shape; a request still waiting in the serving ComfyUI's queue when
it stops runs after the restart and is fetched by id through the first ComfyUI's fal node."""

from __future__ import annotations

import contextlib
import io
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from loopback import Loopback, Quiet
from PIL import Image

from comfyui_harness import ROOT, SKIP_REASON, comfyui_dir, free_port, running_comfyui, wait_until
from pictures import make_test_image
from test_serve import APP, KEY, call, fal_input, wait_done

pytestmark = pytest.mark.skipif(comfyui_dir() is None, reason=SKIP_REASON)

REQUESTS = "fal-ai/fast-sdxl-controlnet-canny/requests"
PAGE = "https://app.example:8080"  # the web page origin the serving ComfyUI lists (SDXLCN_SERVE_CORS_ORIGINS)
MODELS = {"checkpoint": "tiny-sdxl", "controlnet": "tiny-controlnet-canny"}


class Servers:
    """The serving ComfyUI (restartable on the same port, so the first one's SDXLCN_FAL_URL stays right) and the
    first ComfyUI, whose fal node is pointed at it."""

    def __init__(self, root, tiny_models, stack: contextlib.ExitStack):
        self.root, self.stack = root, stack
        from sdxl_controlnet_img2img.pipeline.local.tiny_models import build_tiny_safety_checker

        checker = build_tiny_safety_checker(root / "checker" / "flags-everything", flag_everything=True)
        self.models = {"diffusers": {MODELS["checkpoint"]: tiny_models["checkpoint"]},
                       "controlnet": {MODELS["controlnet"]: tiny_models["controlnet"]},
                       "safety_checker": {"tiny-checker": checker}}
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/sdxlcn/fal"
        for name in ("serving", "first"):
            (root / name / "input").mkdir(parents=True)
            make_test_image(64, 64, 1).save(root / name / "input" / "sdxlcn_test_image.png")
            make_test_image(64, 64, 2).save(root / name / "input" / "sdxlcn_test_control.png")
        self.serving_stack = contextlib.ExitStack()
        self.serving = self._start_serving()
        self.first = stack.enter_context(running_comfyui(
            root / "first", env={"SDXLCN_FAL_URL": self.url, "FAL_KEY": KEY, "SDXLCN_SERVE_KEY": None}))

    def _start_serving(self):
        env = {"SDXLCN_SERVE_KEY": KEY, "SDXLCN_SERVE_CHECKPOINT": MODELS["checkpoint"],
               "SDXLCN_SERVE_CONTROLNET": MODELS["controlnet"], "SDXLCN_FAL_URL": None, "FAL_KEY": None,
               "SDXLCN_SERVE_ALLOW_INTERNAL_URLS": "1",  # the slow image server below is on 127.0.0.1
               "SDXLCN_SERVE_CORS_ORIGINS": PAGE}
        return self.serving_stack.enter_context(running_comfyui(self.root / "serving", self.models, env=env,
                                                                port=self.port))

    def restart_serving(self):
        assert KEY not in self.serving.log()
        self.serving_stack.close()
        self.serving = self._start_serving()

    def close(self):
        self.serving_stack.close()

    def run_fal_node(self, deadline_s: float = 240, **widgets) -> tuple[dict, np.ndarray | None]:
        """Queue the fal node's API workflow on the first ComfyUI; its history entry and the saved image."""
        prompt_id = self.first.queue_prompt(fal_node_workflow(**widgets))
        entry = self.first.wait_history(prompt_id, deadline_s)
        images = entry.get("outputs", {}).get("5", {}).get("images", [])
        if not images:
            return entry, None
        return entry, png_pixels((self.first.base / "output" / images[0]["filename"]).read_bytes())

    def result_pixels(self, request_id: str) -> np.ndarray:
        """The serving side's result image of a request (fal's result, then its image URL)."""
        code, res, _ = call("GET", f"{self.url}/{REQUESTS}/{request_id}")
        assert code == 200, res
        assert res["images"][0]["url"].startswith(self.url + "/files/")
        code, png, _ = call("GET", res["images"][0]["url"], key=None, raw=True)
        assert code == 200
        return png_pixels(png)


def png_pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def fal_node_workflow(**widgets) -> dict:
    fal = {"prompt": "a red fortress", "negative_prompt": "", "controlnet_conditioning_scale": 0.5,
           "image_size": "custom", "width": 64, "height": 64, "num_inference_steps": 2, "guidance_scale": 1.0,
           "strength": 1.0, "seed": 7, "num_images": 1, "enable_safety_checker": False, "expand_prompt": False,
           "loras": "", "sync_mode": False, "request_id": "", "max_concurrency": 1, "timeout_s": 240,
           "image": ["1", 0], "control_image": ["2", 0]}
    fal.update(widgets)
    return {"1": {"class_type": "LoadImage", "inputs": {"image": "sdxlcn_test_image.png"}},
            "2": {"class_type": "LoadImage", "inputs": {"image": "sdxlcn_test_control.png"}},
            "4": {"class_type": "SDXLCNFalImg2Img", "inputs": fal},
            "5": {"class_type": "SaveImage", "inputs": {"filename_prefix": "fal_node", "images": ["4", 0]}}}


def blocker_workflow() -> dict:
    """The shipped tiny API workflow, long enough (50 steps, guidance) to still run when the server is stopped."""
    wf = json.loads((ROOT / "workflows" / "api" / "sdxl_controlnet_img2img_tiny.json").read_text())
    wf["1"]["inputs"]["image"] = "sdxlcn_test_image.png"
    wf["4"]["inputs"].update(num_inference_steps=50, strength=1.0, guidance_scale=7.5)
    return wf


def submitted_ids(server) -> list[str]:
    """Request ids the first ComfyUI's fal node recorded, in order (its request log in ComfyUI's user folder)."""
    from sdxl_controlnet_img2img.pipeline import request_log

    records = request_log.read(server.base / "user" / "sdxl_controlnet_img2img")
    return [r["request_id"] for r in records if r["event"] == "submitted"]


def status(servers, request_id: str) -> dict:
    code, body, _ = call("GET", f"{servers.url}/{REQUESTS}/{request_id}/status?logs=1")
    assert code == 200, body
    return body


def sampling(servers, request_id: str):
    """The status once the request samples in the serving ComfyUI (a step logged); None before."""
    st = status(servers, request_id)
    assert st["status"] != "COMPLETED", f"finished before it could be stopped: {st}"
    steps = [e for e in st["logs"] or [] if e["message"].startswith("step ")]
    return st if st["status"] == "IN_PROGRESS" and steps else None


@pytest.fixture(scope="module")
def servers(tmp_path_factory, tiny_models):
    with contextlib.ExitStack() as stack:
        s = Servers(tmp_path_factory.mktemp("comfyui-serve"), tiny_models, stack)
        stack.callback(s.close)
        yield s
        assert KEY not in s.serving.log() and KEY not in s.first.log()


def test_the_first_comfyuis_fal_node_gets_the_image_from_the_serving_comfyui(servers):
    assert call("POST", f"{servers.url}/{APP}", fal_input(), key="wrong")[0] == 401
    assert call("POST", f"{servers.url}/{APP}", fal_input(strength=3))[0] == 422
    entry, got = servers.run_fal_node()
    assert entry["status"]["status_str"] == "success", entry["status"]
    [rid] = submitted_ids(servers.first)
    history = servers.serving.get(f"/history/{rid}")  # it ran as a prompt of the serving ComfyUI, under its id
    assert history[rid]["status"]["status_str"] == "success"
    assert got.shape == (64, 64, 3)
    assert np.array_equal(got, servers.result_pixels(rid))  # the serving side's pixels, unchanged


def test_comfyuis_cancel_stops_a_served_request_in_fals_shape(servers):
    # Cancel (POST /interrupt) on the serving ComfyUI while the request samples
    code, sub, _ = call("POST", f"{servers.url}/{APP}", fal_input(num_inference_steps=50, guidance_scale=7.5, seed=5))
    assert code == 200, sub
    rid = sub["request_id"]
    wait_until(lambda: sampling(servers, rid), "the request sampling")
    assert servers.serving.post("/interrupt", {"prompt_id": rid})[0] == 200
    done, _seen = wait_done(sub["status_url"], deadline_s=60)
    assert (done["error"], done["error_type"]) == ("Request cancelled", "request_cancelled"), done
    assert call("GET", sub["response_url"])[:2] == (400, {"detail": "Request cancelled"})
    assert call("PUT", sub["cancel_url"])[:2] == (400, {"status": "ALREADY_COMPLETED"})
    entry = servers.serving.get(f"/history/{rid}")[rid]
    assert entry["status"]["status_str"] == "error"
    assert "execution_interrupted" in [m[0] for m in entry["status"]["messages"]]
    # Cancel of the first ComfyUI's prompt: its fal node cancels the request, the serving ComfyUI stops it
    before = len(submitted_ids(servers.first))
    prompt_id = servers.first.queue_prompt(fal_node_workflow(num_inference_steps=50, guidance_scale=7.5, seed=6))
    [rid] = wait_until(lambda: submitted_ids(servers.first)[before:], "the fal node's submit")
    wait_until(lambda: sampling(servers, rid), "the fal node's request sampling")
    assert servers.first.post("/interrupt", {"prompt_id": prompt_id})[0] == 200
    entry = servers.first.wait_history(prompt_id, 60)
    assert entry["status"]["status_str"] == "error"
    done, _seen = wait_done(f"{servers.url}/{REQUESTS}/{rid}/status", deadline_s=60)
    assert done["error_type"] == "request_cancelled", done
    assert servers.serving.get(f"/history/{rid}")[rid]["status"]["status_str"] == "error"


def test_a_request_waiting_at_a_restart_of_the_serving_comfyui_is_fetched_after_it(servers):
    # a long plain ComfyUI prompt runs; the fal request waits behind it in ComfyUI's queue; then the server stops
    blocker = servers.serving.queue_prompt(blocker_workflow())
    code, sub, _ = call("POST", f"{servers.url}/{APP}", fal_input(seed=9))
    assert code == 200, sub
    rid = sub["request_id"]

    def waiting_behind():
        q = servers.serving.get("/queue")
        running = [item[1] for item in q["queue_running"]]
        pending = [item[1] for item in q["queue_pending"]]
        return running == [blocker] and rid in pending

    wait_until(waiting_behind, "the fal request waiting behind the long prompt in ComfyUI's queue")
    st = status(servers, rid)
    assert st["status"] == "IN_QUEUE" and st["queue_position"] == 0, st
    servers.restart_serving()
    # the first ComfyUI's fal node fetches it by id (nothing submitted again)
    before = submitted_ids(servers.first)
    entry, got = servers.run_fal_node(request_id=rid)
    assert entry["status"]["status_str"] == "success", entry["status"]
    assert submitted_ids(servers.first) == before
    assert np.array_equal(got, servers.result_pixels(rid))
    code, res, _ = call("GET", f"{servers.url}/{REQUESTS}/{rid}")
    assert res["seed"] == 9
    first = submitted_ids(servers.first)[0]  # a result finished before the restart stays fetchable
    code, res, _ = call("GET", f"{servers.url}/{REQUESTS}/{first}")
    assert code == 200 and res["seed"] == 7
    assert call("GET", res["images"][0]["url"], key=None, raw=True)[0] == 200


def test_the_served_list_holds_exactly_the_generated_images_with_their_seed(servers, tiny_pipe):
    """What a fal client reads from the serving ComfyUI: num_images images (not the Canny node's edge-map preview
    beside them), in order, each the picture a local run of the same request gives, and the seed used (one was
    chosen when the request had none)."""
    import cv2

    from sdxl_controlnet_img2img.pipeline.local.generate import generate
    from sdxl_controlnet_img2img.pipeline.request import GenerationRequest

    code, sub, _ = call("POST", f"{servers.url}/{APP}", fal_input(num_images=2, seed=11))
    assert code == 200, sub
    wait_done(sub["status_url"], deadline_s=240)
    code, res, _ = call("GET", sub["response_url"])
    assert code == 200, res
    assert len(res["images"]) == 2 and res["seed"] == 11 and res["has_nsfw_concepts"] == [False, False], res
    got = [png_pixels(call("GET", entry["url"], key=None, raw=True)[1]) for entry in res["images"]]
    req = GenerationRequest.from_dict({**fal_input(num_images=2, seed=11), "image_url": make_test_image(64, 64, 1),
                                       "control_image_url": make_test_image(64, 64, 2)})
    want = [np.asarray(img, dtype=np.float32) for img in generate(tiny_pipe, req).images]
    edges = cv2.Canny(np.asarray(make_test_image(64, 64, 2).convert("RGB")), 100, 200).astype(np.float32)[..., None]
    for i, (g, w) in enumerate(zip(got, want)):
        g = g.astype(np.float32)
        # ComfyUI's venv has its own torch build: the same picture up to float noise, never the edge map
        assert np.abs(g - w).mean() < 2.0, f"image {i} is not the local run's picture"
        assert np.abs(g - edges).mean() > 20.0, f"image {i} is the Canny edge map"
    assert np.abs(got[0].astype(np.float32) - got[1]).mean() > 2.0  # seed 11 and seed 12: two pictures

    # the safety checker's verdict per image (the tiny one in models/safety_checker flags everything)
    code, sub, _ = call("POST", f"{servers.url}/{APP}", fal_input(num_images=2, enable_safety_checker=True))
    assert code == 200, sub
    wait_done(sub["status_url"], deadline_s=240)
    code, res, _ = call("GET", sub["response_url"])
    assert code == 200 and res["has_nsfw_concepts"] == [True, True], res

    code, sub, _ = call("POST", f"{servers.url}/{APP}", {k: v for k, v in fal_input().items() if k != "seed"})
    assert code == 200, sub
    wait_done(sub["status_url"], deadline_s=240)
    code, res, _ = call("GET", sub["response_url"])
    assert code == 200 and isinstance(res["seed"], int) and len(res["images"]) == 1, res


def test_the_route_judges_the_key_before_reading_the_body(servers):
    """A caller without the key sends the headers of a large body and only its first bytes: 401 at once (the route
    read the whole body first)."""
    from test_serve_http import post_head, read_response

    with socket.create_connection(("127.0.0.1", servers.port), timeout=15) as s:
        s.sendall(post_head(f"/sdxlcn/fal/{APP}", {"Content-Type": "application/json", "Content-Length": "900000"})
                  + b"{" + b" " * 1000)
        status, _h, answer = read_response(s)
    assert status == 401, answer


class SlowImages:
    """An image server that sends the start of an image and then holds every download until released."""

    def __init__(self):
        self.active, self.most, self.lock, self.release = 0, 0, threading.Lock(), threading.Event()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                with owner.lock:
                    owner.active += 1
                    owner.most = max(owner.most, owner.active)
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "image/png")
                    self.send_header("Content-Length", "100000")
                    self.end_headers()
                    self.wfile.write(b"\x89PNG\r\n\x1a\n")
                    self.wfile.flush()
                    owner.release.wait(120)
                finally:
                    with owner.lock:
                        owner.active -= 1

            def log_message(self, *a):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/slow.png"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_submits_never_wait_for_image_urls_and_comfyuis_page_is_still_served(servers):
    """8 submits whose image downloads hang are answered at once (issue 33 item 6: each waited on its download, on
    one of the route's threads); the downloads run on the backend's own few threads (ComfyUI's own page, a static
    file, is answered meanwhile), and each request ends as fal ends one: COMPLETED, its result 422 naming
    image_url. A URL that answers gives the picture its data URI gives."""
    import urllib.request

    from sdxl_controlnet_img2img.pipeline.serve.downloads import THREADS

    slow = SlowImages()
    subs = []
    try:
        for _ in range(8):
            code, sub, _ = call("POST", f"{servers.url}/{APP}", fal_input(image_url=slow.url))
            assert code == 200, sub
            subs.append(sub)
        wait_until(lambda: slow.active >= THREADS, "the slow downloads starting", deadline_s=60)
        with urllib.request.urlopen(f"http://127.0.0.1:{servers.port}/", timeout=20) as r:
            assert r.status == 200 and b"<html" in r.read(4096).lower()
        assert status(servers, subs[-1]["request_id"])["status"] == "IN_QUEUE"
        assert slow.most <= THREADS, f"{slow.most} downloads at once: beyond the backend's own threads"
    finally:
        slow.release.set()  # the held downloads end cut off, the later ones at once
        slow.close()
    for sub in subs:
        done, _seen = wait_done(sub["status_url"], deadline_s=120)
        assert done["error"].startswith("image_url: "), done
        code, body, _ = call("GET", sub["response_url"])
        assert code == 422 and body["detail"][0]["loc"] == ["body", "image_url"], body
    with ImageHost(data_uri_bytes(fal_input()["image_url"])) as host:
        pictures = []
        for image_url in (host.url, fal_input()["image_url"]):
            code, sub, _ = call("POST", f"{servers.url}/{APP}", fal_input(image_url=image_url, seed=21))
            assert code == 200, sub
            done, _seen = wait_done(sub["status_url"], deadline_s=240)
            assert "error" not in done, done
            pictures.append(servers.result_pixels(sub["request_id"]))
    assert np.array_equal(*pictures)


def data_uri_bytes(uri: str) -> bytes:
    import base64

    return base64.b64decode(uri.split(",", 1)[1])


class ImageHost(Loopback):
    """An HTTP server on 127.0.0.1 answering every GET with ``data`` (a PNG)."""

    def __init__(self, data: bytes):
        class Handler(Quiet):
            def do_GET(self):
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        super().__init__(Handler)
        self.url = f"{self.url}/image.png"


def test_a_keyless_route_answers_only_this_machines_programs(servers):
    """The first ComfyUI has no serving key: a call through a proxy (everyone is 127.0.0.1 behind a local reverse
    proxy) or under another host name (DNS rebinding) is refused; a plain local call is answered."""
    url = f"http://127.0.0.1:{servers.first.port}/sdxlcn/fal/{REQUESTS}/00000000-0000-0000-0000-000000000000/status"
    assert call("GET", url, key=None)[0] == 404
    for headers in ({"X-Forwarded-For": "203.0.113.9"}, {"Host": f"rebind.evil.example:{servers.first.port}"}):
        code, body, got = call("GET", url, key=None, headers=headers)
        assert code == 403 and "key" in body["detail"], (headers, code, body)
        assert not [h for h in got if h.lower().startswith("access-control-")], got


def test_a_keyless_route_refuses_every_call_while_comfyui_listens_beyond_loopback(tmp_path):
    with running_comfyui(tmp_path / "wide", extra_args=("--listen", "0.0.0.0"), env={"SDXLCN_SERVE_KEY": None}) as wide:
        code, body, _ = call("GET", f"http://127.0.0.1:{wide.port}/sdxlcn/fal/{REQUESTS}/"
                                    "00000000-0000-0000-0000-000000000000/status", key=None)
        assert code == 403 and "0.0.0.0" in body["detail"] and "key" in body["detail"], body
        assert "refuses every call" in wide.log()


def test_cors_in_comfyui_only_for_the_listed_origin(servers):
    """The route answers its own CORS preflights (ComfyUI's middlewares answered every OPTIONS with 200 and no CORS
    headers, so no listed page could call it): the listed origin gets them, another none."""
    preflight = {"Origin": PAGE, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type,x-fal-target-url"}
    code, _b, headers = call("OPTIONS", f"{servers.url}/proxy", key=None, headers=preflight)
    assert code == 204 and headers.get("Access-Control-Allow-Origin") == PAGE, (code, headers)
    assert "x-fal-target-url" in headers["Access-Control-Allow-Headers"]
    code, _b, headers = call("OPTIONS", f"{servers.url}/proxy", key=None,
                             headers={**preflight, "Origin": "https://evil.example"})
    assert code == 403 and not [h for h in headers if h.lower().startswith("access-control-")], headers
    code, _b, headers = call("GET", f"{servers.url}/{REQUESTS}/00000000-0000-0000-0000-000000000000/status",
                             headers={"Origin": PAGE})
    assert code == 404 and headers.get("Access-Control-Allow-Origin") == PAGE
