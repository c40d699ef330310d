"""A submit never waits on the network (issue 33 item 6): image URLs are stored with the request and downloaded by
whatever runs it (the stand-alone worker; ComfyUI's backend through its own download threads, tested here without
ComfyUI and in tests/test_comfyui_serve.py with it). Before, the submit handler downloaded them: a URL that never
answered held the submit (and one of the server's few call threads) up to 30 s.

A URL that cannot be used ends its request as fal ends one: COMPLETED with an error naming the field, the result
route answering fal's 422 shape, read here through fal's own Python client. Real HTTP servers on 127.0.0.1 play the
image hosts (the operator allows 127.0.0.1: ``SDXLCN_SERVE_ALLOW_INTERNAL_URLS``).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading

import numpy as np
from PIL import Image

from comfyui_harness import wait_until
from loopback import Loopback, Quiet
from pictures import make_test_image
from test_serve import APP, KEY, call, fal_input, start, wait_done

ENV = "SDXLCN_SERVE_ALLOW_INTERNAL_URLS"


def png_of(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


class Images(Loopback):
    """An image host on 127.0.0.1: ``/held.png`` answers only once ``release`` is set (``sent`` is set when it has
    answered anything), ``/img.png`` and ``files``' paths at once, anything else 404. ``hits`` lists the paths
    asked for."""

    def __init__(self, png: bytes, files: dict | None = None):
        self.release, self.sent = threading.Event(), threading.Event()
        self.hits = []
        served = {"/held.png": png, "/img.png": png, **(files or {})}
        owner = self

        class Handler(Quiet):
            def do_GET(self):
                owner.hits.append(self.path)
                if self.path == "/held.png":
                    owner.release.wait(120)
                data = served.get(self.path)
                self.send_response(404 if data is None else 200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(data or b"")))
                self.end_headers()
                self.wfile.write(data or b"")
                owner.sent.set()

        super().__init__(Handler)

    def close(self):
        self.release.set()
        super().close()


def local_pixels(tiny_pipe, **changes) -> np.ndarray:
    from sdxl_controlnet_img2img.pipeline.local.generate import generate
    from sdxl_controlnet_img2img.pipeline.request import GenerationRequest

    req = GenerationRequest.from_dict({**fal_input(**changes), "image_url": make_test_image(64, 64, 3),
                                       "control_image_url": make_test_image(64, 64, 2)})
    return np.asarray(generate(tiny_pipe, req).images[0])


def test_submits_answer_before_their_image_urls_do_and_status_answers_meanwhile(tmp_path, tiny_pipe, monkeypatch):
    """Three submits whose image URL answers only when the test lets it: each is answered (200, a request id) while
    the image host has sent nothing; while the worker's download waits, status, ready and another submit answer;
    once the host answers, each request runs on the downloaded image (the local run's pixels)."""
    monkeypatch.setenv(ENV, "127.0.0.1")
    host = Images(png_of(make_test_image(64, 64, 3)))
    server = start(tmp_path, pipe=tiny_pipe, download_timeout_s=20.0)
    try:
        subs = []
        for seed in (1, 2, 3):
            code, sub, _ = call("POST", f"{server.url}/{APP}", fal_input(image_url=f"{host.url}/held.png", seed=seed))
            assert not host.sent.is_set(), "the image host answered before the submit did"
            assert code == 200, sub
            subs.append(sub)
        wait_until(lambda: host.hits, "the download starting", deadline_s=30)
        code, first, _ = call("GET", subs[0]["status_url"] + "?logs=1")  # downloaded before it runs, not by a worker
        assert code == 200 and first["status"] == "IN_QUEUE", first
        assert "downloading image_url" in [entry["message"] for entry in first["logs"]], first
        code, second, _ = call("GET", subs[1]["status_url"])
        assert code == 200 and second["status"] == "IN_QUEUE" and second["queue_position"] == 1, second
        assert call("GET", f"{server.url}/ready", key=None)[:2] == (200, {"ready": True})
        code, fourth, _ = call("POST", f"{server.url}/{APP}", fal_input(seed=4))  # data URIs: stored at once
        assert code == 200, fourth
        assert not host.sent.is_set()
        host.release.set()
        for sub in subs + [fourth]:
            done, _seen = wait_done(sub["status_url"])
            assert "error" not in done, done
        code, result, _ = call("GET", subs[0]["response_url"])
        assert code == 200, result
        png = call("GET", result["images"][0]["url"], key=None, raw=True)[1]
        inputs = [p.name for p in server.app.store.job_dir(subs[0]["request_id"]).iterdir() if p.name.endswith("_url")]
        assert inputs == [], inputs  # the downloaded input went when the request ended, as a data URI's does
    finally:
        server.stop_all()
        host.close()
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png)).convert("RGB")), local_pixels(tiny_pipe, seed=1))


CLIENT = r"""
import json, sys, fal_client
APP = "fal-ai/fast-sdxl-controlnet-canny/image-to-image"
outs = []
for inp in json.loads(sys.stdin.read()):
    handle = fal_client.submit(APP, inp)
    out = {}
    try:
        out["result"] = handle.get()
    except fal_client.client.FalClientHTTPError as exc:
        out["error"] = [exc.status_code, exc.message]
    st = handle.status()
    out["status"] = [type(st).__name__, st.error, st.error_type]
    outs.append(out)
print("RESULT " + json.dumps(outs))
"""


def test_an_image_url_that_fails_ends_the_request_as_fal_does_through_fal_client(tmp_path, tiny_pipe, monkeypatch):
    """fal's Python client over HTTPS: a submit whose image_url answers 404 is accepted; the request ends
    COMPLETED with an error naming image_url, and the client's result call raises fal's 422 with ``loc`` naming
    it. A control image URL holding an icon (a format the server does not take) ends the same way, naming
    control_image_url and the formats it takes; a good URL gives a result."""
    from test_serve_cli import make_cert
    from test_serve_input_bounds import ico_holding

    from sdxl_controlnet_img2img.pipeline.serve.app import ServeApp
    from sdxl_controlnet_img2img.pipeline.serve.cli import StandaloneServer
    from sdxl_controlnet_img2img.pipeline.serve.store import Store
    from sdxl_controlnet_img2img.pipeline.serve.worker import LocalWorkers

    monkeypatch.setenv(ENV, "127.0.0.1")
    host = Images(png_of(make_test_image(64, 64, 3)), {"/icon.ico": ico_holding(png_of(make_test_image(64, 64, 2)))})
    cert, key = make_cert(tmp_path)
    store = Store(tmp_path / "data")
    workers = LocalWorkers(store, {"cpu": tiny_pipe})
    server = StandaloneServer(ServeApp(store, workers, key=KEY), tls_cert=cert, tls_key=key).start()
    workers.start()
    env = {**os.environ, "FAL_QUEUE_RUN_HOST": f"127.0.0.1:{server.port}", "FAL_RUN_HOST": f"127.0.0.1:{server.port}",
           "SSL_CERT_FILE": str(cert), "FAL_KEY": KEY}
    inputs = [fal_input(image_url=f"{host.url}/gone.png"), fal_input(control_image_url=f"{host.url}/icon.ico"),
              fal_input(image_url=f"{host.url}/img.png")]
    try:
        p = subprocess.run([sys.executable, "-c", CLIENT], input=json.dumps(inputs), capture_output=True, text=True,
                           env=env, timeout=300)
    finally:
        server.stop()
        workers.stop()
        store.close()
        host.close()
    assert p.returncode == 0, p.stderr[-3000:]
    gone, icon, good = json.loads([ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")][-1][7:])
    assert host.hits == ["/gone.png", "/icon.ico", "/img.png"], host.hits
    for out, field, words in ((gone, "image_url", "HTTP 404"), (icon, "control_image_url", "PNG, JPEG, WebP")):
        kind, error, error_type = out["status"]
        assert kind == "Completed" and error.startswith(f"{field}: ") and words in error, out
        assert error_type == "validation_error", out
        status, detail = out["error"]
        assert status == 422 and detail[0]["loc"] == ["body", field] and words in detail[0]["msg"], out
    assert good["status"][:2] == ["Completed", None] and good["result"]["images"][0]["width"] == 64, good


def test_comfyuis_downloads_run_on_threads_of_their_own_and_end_a_request_as_the_worker_does(tmp_path, monkeypatch):
    """ComfyUI's backend (nodes/serve_routes.py) hands a request to ComfyUI's queue once :class:`Prefetch` says its
    inputs are stored; the downloads run on Prefetch's threads (the watcher asking again meanwhile starts no second
    one). A good URL's bytes are stored, a 404 ends its request with the 422 naming image_url, and a request
    cancelled while its download waits keeps nothing."""
    import json

    from sdxl_controlnet_img2img.pipeline.serve.downloads import Prefetch
    from sdxl_controlnet_img2img.pipeline.serve.inputs import Limits, check_submission
    from sdxl_controlnet_img2img.pipeline.serve.store import Store

    monkeypatch.setenv(ENV, "127.0.0.1")
    png = png_of(make_test_image(64, 64, 3))
    host = Images(png)
    store = Store(tmp_path / "data")
    finished = threading.Semaphore(0)
    prefetch = Prefetch(store, Limits(), on_done=finished.release)

    def add(path):
        args, images = check_submission(json.dumps(fal_input(image_url=host.url + path)).encode(), Limits())
        return store.add(args, images)

    try:
        held, good, gone = add("/held.png"), add("/img.png"), add("/gone.png")
        assert not prefetch.ready(held)
        wait_until(lambda: host.hits, "the held download starting", deadline_s=30)
        assert not prefetch.ready(held)  # still running: not started again
        assert not prefetch.ready(good) and not prefetch.ready(gone)
        assert finished.acquire(timeout=30) and finished.acquire(timeout=30)
        assert prefetch.ready(store.get(good.id)) and store.input_bytes(good.id, "image_url") == png
        ended = store.get(gone.id)
        assert (ended.state, ended.error_status) == ("COMPLETED", 422), ended
        assert ended.error_detail[0]["loc"] == ["body", "image_url"] and ended.error.startswith("image_url: "), ended
        assert store.cancel(held.id) == "cancelled"
        host.release.set()
        assert finished.acquire(timeout=30)
        assert not store.has_input(held.id, "image_url")
        assert sorted(host.hits) == ["/gone.png", "/held.png", "/img.png"], host.hits
    finally:
        host.close()
        store.close()
