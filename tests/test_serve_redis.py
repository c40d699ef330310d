"""Several ``serve`` processes on one shared queue (issue 34): a real ``redis-server`` (tests/helpers/redis_server.py), two API
nodes (``--workers 0``, HTTPS) and two workers (the tiny models on the CPU), each its own process. fal's own clients
submit through one node and read through the other (no affinity); a worker killed with SIGKILL mid-request loses
nothing: its request runs to one result on the other worker. Also what a user sees without the packages, and an API
node started before its Redis.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from comfyui_harness import wait_until
from fal_python_client import FalPythonClient
from pictures import make_test_image
from redis_server import RedisServer
from serve_nodes import ROOT, start_node, wait_completed
from test_serve import APP, KEY, fal_input
from test_serve_cli import make_cert

LEASE_S = "4"  # the workers' --worker-lease: a killed worker's request runs again seconds later, not a minute


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, tiny_models):
    """{"redis", "api": [A, B], "workers": [W1, W2], "cert"}: all started, stopped at the end."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed: apt-get install redis-server (Debian's package; .ci/run does)")
    pytest.importorskip("rq", reason="the redis extra is not installed: pip install -e '.[redis]'")
    root = tmp_path_factory.mktemp("cluster")
    redis = RedisServer(root / "redis").start()
    cert, key = make_cert(root)
    here = ("--allow-internal-urls", "127.0.0.1")  # the webhook receiver is on this machine
    nodes = [*(start_node(root, f"api-{n}", redis.url, *here, tls=(cert, key)) for n in "ab"),
             *(start_node(root, f"worker-{i}", redis.url, *here, "--worker-lease", LEASE_S, models=tiny_models)
               for i in (1, 2))]
    try:
        for node in nodes:
            node.wait_ready()
        yield {"redis": redis, "api": nodes[:2], "workers": nodes[2:], "cert": cert, "root": root}
    finally:
        for node in nodes:  # all at once: each worker may wait for RQ's next poll (a few seconds) to stop
            node.interrupt()
        for node in nodes:
            node.stop()
        redis.stop()
    for node in nodes:
        assert KEY not in node.log(), f"the key reached the log of {node.name}"


def png_pixels(png: bytes):
    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def local_pixels(tiny_pipe, **changes):
    """What the plain local pipeline gives for :func:`fal_input` with ``changes``: the truth a node's image is held to
    (on one thread, as the nodes run: the sums' order, and so the last bits, follow the thread count)."""
    import numpy as np
    import torch

    from sdxl_controlnet_img2img.pipeline.local.generate import generate
    from sdxl_controlnet_img2img.pipeline.request import GenerationRequest

    req = GenerationRequest.from_dict({**fal_input(**changes), "image_url": make_test_image(64, 64, 1),
                                       "control_image_url": make_test_image(64, 64, 2)})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return np.asarray(generate(tiny_pipe, req).images[0])
    finally:
        torch.set_num_threads(threads)


def started_on(nodes, request_id: str):
    """The nodes whose log says they started ``request_id``."""
    return [n for n in nodes if f"request {request_id} started" in n.log()]


def test_fal_python_client_submits_through_one_node_and_reads_through_the_other(cluster, tiny_pipe):
    import numpy as np

    a, b = cluster["api"]
    via_a = FalPythonClient(a.url.split("://", 1)[1], cluster["cert"], KEY)
    via_b = FalPythonClient(b.url.split("://", 1)[1], cluster["cert"], KEY)
    try:
        rid = via_a.submit(fal_input(seed=7))["request_id"]
        status = wait_completed(b, rid)
        assert "error" not in status, status
        assert "step 2/2" in [line["message"] for line in status["logs"]]
        assert via_b.status(rid)["kind"] == "Completed"
        result = via_b.result(rid)["result"]
        assert result["seed"] == 7 and result["has_nsfw_concepts"] == [False], result
        image = result["images"][0]
        assert image["url"].startswith(f"{b.url}/files/"), image["url"]  # the node asked names itself
        code, png, headers = b.call("GET", image["url"], key=None)
        assert code == 200 and headers["Content-Type"] == "image/png"
        assert np.array_equal(png_pixels(png), local_pixels(tiny_pipe, seed=7))  # the worker's pixels, via B
        code, again, _ = a.call("GET", image["url"].replace(b.url, a.url), key=None)  # any node serves the image
        assert code == 200 and again == png
        unknown = via_b.result("00000000-0000-4000-8000-000000000000")
        assert unknown["http_error"] == 404, unknown
    finally:
        via_a.close()
        via_b.close()
    # the same protocol answers from every node: 401 without the key, 422 naming the field, x-fal-request-id
    code, body, _ = b.call("POST", APP, fal_input(), key="not-the-key")
    assert code == 401 and "not-the-key" not in json.dumps(body), body
    code, body, _ = a.call("POST", APP, fal_input(num_inference_steps=0))
    assert code == 422 and body["detail"][0]["loc"] == ["body", "num_inference_steps"], body
    code, body, headers = a.call("GET", f"{APP.rsplit('/', 1)[0]}/requests/{rid}")
    assert code == 200 and headers["x-fal-request-id"] == rid and body["seed"] == 7


def test_two_workers_share_the_queue(cluster):
    a, b = cluster["api"]
    ids = []
    for seed in range(20, 24):
        code, sub, _ = a.call("POST", APP, fal_input(seed=seed, num_inference_steps=4))
        assert code == 200, sub
        ids.append(sub["request_id"])
    for rid in ids:
        assert "error" not in wait_completed(b, rid)
    ran = {rid: [n.name for n in started_on(cluster["workers"], rid)] for rid in ids}
    assert all(len(names) == 1 for names in ran.values()), ran  # each ran once
    assert {names[0] for names in ran.values()} == {"worker-1", "worker-2"}, ran  # on both workers


def test_fal_js_client_submits_through_one_node_and_reads_through_the_other(cluster):
    js = ROOT / "tests" / "js"
    if not (js / "node_modules" / "@fal-ai" / "client").is_dir() or shutil.which("node") is None:
        pytest.skip("fal's JS client is not installed: npm ci --prefix tests/js (scripts/test.sh runs it)")
    a, b = cluster["api"]
    env = {**os.environ, "NODE_EXTRA_CA_CERTS": str(cluster["cert"])}  # the nodes' self-signed certificate
    done = subprocess.run(["node", str(js / "serve_two_nodes.mjs"), a.url, b.url, KEY], capture_output=True,
                          text=True, env=env, timeout=240, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads([ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")][-1][len("RESULT "):])
    assert out["resultRequestId"] == out["requestId"] and out["seed"] == 5, out
    assert out["statuses"][-1] == "COMPLETED" and "step 2/2" in out["logs"], out
    assert out["url"].startswith(f"{b.url}/files/"), out
    assert (out["width"], out["height"], out["contentType"], out["png"]) == (64, 64, "image/png", "PNG"), out


def test_a_webhook_from_any_node_verifies_with_any_nodes_jwks(cluster):
    """The nodes sign with one key (the first node's, shared through Redis): a receiver verifies a delivery, as fal
    documents, with the JWKS of a node other than the one it submitted to."""
    from test_serve_webhook_signing import fals_verification

    received, got = [], threading.Event()

    class Receiver(BaseHTTPRequestHandler):
        def do_POST(self):
            data = self.rfile.read(int(self.headers["Content-Length"]))
            received.append(({k.lower(): v for k, v in self.headers.items()}, data, time.time()))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()
            got.set()

        def log_message(self, *args):
            pass

    receiver = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    a, b = cluster["api"]
    try:
        hook = f"http://127.0.0.1:{receiver.server_address[1]}/hook"
        code, sub, _ = a.call("POST", f"{APP}?fal_webhook={hook}", fal_input(seed=12))
        assert code == 200, sub
        assert got.wait(120), "no webhook delivered"
    finally:
        receiver.shutdown()
    keys = [n.call("GET", ".well-known/jwks.json", key=None)[1] for n in [*cluster["api"], *cluster["workers"]]]
    assert all(k == keys[0] for k in keys), keys  # one key on every node
    for headers, data, at in received:
        assert json.loads(data)["request_id"] == sub["request_id"] and json.loads(data)["status"] == "OK"
        assert fals_verification(keys[1], headers, data, at)


def test_a_killed_workers_request_completes_on_the_other_once(cluster):
    """SIGKILL mid-request (no stop, no goodbye): the request shows IN_QUEUE again with a log line saying why, runs on
    the other worker, and ends with one result; the nodes and the queue go on."""
    a, b = cluster["api"]
    long = {"num_inference_steps": 50, "image_size": {"width": 512, "height": 512}, "seed": 31}
    code, sub, _ = a.call("POST", APP, fal_input(**long))
    assert code == 200, sub
    rid = sub["request_id"]
    end = time.monotonic() + 120
    while time.monotonic() < end:  # running, a step done: then its worker dies
        code, status, _ = b.call("GET", f"{APP.rsplit('/', 1)[0]}/requests/{rid}/status?logs=1")
        if status["status"] == "IN_PROGRESS" and any(x["message"].startswith("step ") for x in status["logs"]):
            break
        assert status["status"] != "COMPLETED", status
        time.sleep(0.05)
    [victim] = started_on(cluster["workers"], rid)
    victim.kill()
    [other] = [w for w in cluster["workers"] if w is not victim]
    status = wait_completed(b, rid, deadline_s=240)
    assert "error" not in status, status
    messages = [x["message"] for x in status["logs"]]
    assert any("stopped answering" in m and "queued again" in m for m in messages), messages
    assert f"request {rid} completed" in other.log()
    assert messages.count(f"step 50/50") == 1, messages  # one full run: the killed one never reached its end
    code, result, _ = a.call("GET", f"{APP.rsplit('/', 1)[0]}/requests/{rid}")
    assert code == 200 and result["seed"] == 31 and len(result["images"]) == 1, result
    code, png, _ = a.call("GET", result["images"][0]["url"], key=None)
    assert code == 200 and png_pixels(png).shape == (512, 512, 3)
    code, sub, _ = b.call("POST", APP, fal_input(seed=32))  # the queue goes on with the worker left
    assert code == 200 and "error" not in wait_completed(a, sub["request_id"])


def test_without_the_packages_serve_says_what_to_install(tmp_path):
    code = ("import sys; sys.modules['rq'] = None; sys.argv = ['x', 'serve', '--queue', 'redis://:pw@127.0.0.1:1/0', "
            f"'--workers', '0', '--data-dir', {str(tmp_path / 'd')!r}]; "
            "from sdxl_controlnet_img2img.pipeline.cli import main; sys.exit(main())")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "pip install 'comfyui-sdxl-controlnet-img2img[redis]'" in lines[0], done.stderr
    assert "pw" not in done.stderr


def test_an_api_node_started_while_redis_is_down_answers_503_and_takes_requests_once_it_is_up(tmp_path):
    """The node starts (one warning line naming the queue, never its password), answers 503 saying why, and takes
    requests once Redis answers (its /ready says so within about a second): nothing to restart."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed: apt-get install redis-server (Debian's package; .ci/run does)")
    pytest.importorskip("rq", reason="the redis extra is not installed: pip install -e '.[redis]'")
    redis = RedisServer(tmp_path / "redis", password="pw-not-to-print")  # not started yet
    api = start_node(tmp_path, "api", redis.url).wait_ready()
    try:
        code, body, headers = api.call("POST", APP, fal_input())
        assert code == 503 and headers.get("Retry-After"), body
        assert f"shared queue at redis://127.0.0.1:{redis.port}/0 cannot be reached" in body["detail"], body
        redis.start()
        wait_until(lambda: api.call("GET", "ready", key=None)[0] == 200, "/ready once Redis answers", deadline_s=30)
        code, body, _ = api.call("POST", APP, fal_input())
        assert code == 200, body
        code, status, _ = api.call("GET", f"{APP.rsplit('/', 1)[0]}/requests/{body['request_id']}/status")
        assert code == 200 and status["status"] == "IN_QUEUE" and status["queue_position"] == 0, status
    finally:
        api.stop()
        redis.stop()
    log = api.log()
    assert "warning: the shared queue at redis://127.0.0.1" in log and "pw-not-to-print" not in log, log


def test_a_wrong_redis_password_is_one_line_at_start(tmp_path):
    """A password Redis refuses is a setting to fix: one line naming --queue (never the password), exit non-zero,
    before any model loads (break-it review: the node started READY and logged a traceback at every retry)."""
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed: apt-get install redis-server (Debian's package; .ci/run does)")
    pytest.importorskip("rq", reason="the redis extra is not installed: pip install -e '.[redis]'")
    redis = RedisServer(tmp_path / "redis", password="the-right-one").start()
    try:
        wrong = redis.url.replace("the-right-one", "wrong-pw-99")
        code = (f"import sys; sys.argv = ['x', 'serve', '--queue', {wrong!r}, '--workers', '0', '--port', '0', "
                f"'--data-dir', {str(tmp_path / 'd')!r}]; "
                "from sdxl_controlnet_img2img.pipeline.cli import main; sys.exit(main())")
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    finally:
        redis.stop()
    assert done.returncode != 0, done.stderr
    lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "--queue" in lines[0] and "password" in lines[0], done.stderr
    assert "wrong-pw-99" not in done.stderr and "READY" not in done.stderr + done.stdout
