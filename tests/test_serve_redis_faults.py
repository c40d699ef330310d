"""Redis itself failing under the shared queue (issue 34 item 3): a real ``redis-server`` with a password, SIGKILLed
while one request runs and another waits, then started again on its append-only file. Meanwhile a submit answers 503
naming the queue (never its password) and /ready says why; afterwards nothing accepted is lost: the waiting request
runs, the running one's result (made by its worker while Redis was down, and kept) is stored, and the worker goes
on.
"""

from __future__ import annotations

import shutil
import threading

import pytest

from comfyui_harness import wait_until
from redis_server import RedisServer
from test_serve import APP, KEY, call, fal_input
from test_serve_redis_store import node

PASSWORD = "redis-secret-pw-42"


@pytest.fixture
def redis_with_password(tmp_path):
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed: apt-get install redis-server (Debian's package; .ci/run does)")
    pytest.importorskip("rq", reason="the redis extra is not installed: pip install -e '.[redis]'")
    server = RedisServer(tmp_path / "redis", password=PASSWORD).start()
    try:
        yield server
    finally:
        server.stop()


def state(server, request_id):
    code, body, _ = call("GET", f"{server.url}/{APP.rsplit('/', 1)[0]}/requests/{request_id}/status?logs=1")
    return body if code == 200 else None


def test_redis_killed_and_restarted_from_its_append_only_file_loses_nothing(redis_with_password, tmp_path, tiny_pipe,
                                                                            caplog):
    from sdxl_controlnet_img2img.pipeline.local.generate import generate

    generated = threading.Event()

    def generate_then_say(pipe, request, **kwargs):  # the real generation; the test learns when one has ended
        try:
            return generate(pipe, request, **kwargs)
        finally:
            generated.set()

    redis = redis_with_password
    _api_store, _api, api = node(redis, tmp_path / "api")
    _worker_store, _workers, worker = node(redis, tmp_path / "worker", {"cpu": tiny_pipe}, generate_then_say)
    try:
        code, running, _ = call("POST", f"{api.url}/{APP}", fal_input(seed=41, num_inference_steps=20))
        assert code == 200, running
        code, waiting, _ = call("POST", f"{api.url}/{APP}", fal_input(seed=42))
        assert code == 200, waiting
        wait_until(lambda: (state(api, running["request_id"]) or {}).get("status") == "IN_PROGRESS",
                   "the first request running", deadline_s=120, every_s=0.02)
        redis.kill()
        assert not generated.is_set(), "the request ran to its end before Redis was killed: make it longer"

        code, body, headers = call("POST", f"{api.url}/{APP}", fal_input(seed=43))
        assert code == 503 and headers.get("Retry-After"), body
        assert f"shared queue at redis://127.0.0.1:{redis.port}/0 cannot be reached" in body["detail"], body
        code, ready, _ = call("GET", f"{api.url}/ready", key=None)
        assert code == 503 and "cannot be reached" in ready["detail"], ready
        code, status, headers = call("GET", waiting["status_url"])  # a read too: 503 (fal's clients retry it)
        assert code == 503 and "cannot be reached" in status["detail"] and headers.get("Retry-After"), status
        assert PASSWORD not in str(body) + str(ready) + str(status)

        assert generated.wait(120)  # the first request's result is made while Redis is down: its worker keeps it
        redis.start()  # the same folder: its append-only file
        for sub, seed in ((running, 41), (waiting, 42)):
            done = wait_until(lambda sub=sub: (lambda s: s if s and s["status"] == "COMPLETED" else None)(
                state(api, sub["request_id"])), f"request {seed} completing", deadline_s=180, every_s=0.1)
            assert "error" not in done, done
            code, result, _ = call("GET", sub["response_url"])
            assert code == 200 and result["seed"] == seed, result
        assert call("GET", f"{api.url}/ready", key=None)[0] == 200
        code, sub, _ = call("POST", f"{worker.url}/{APP}", fal_input(seed=44))  # and the queue goes on
        assert code == 200
        wait_until(lambda: (state(api, sub["request_id"]) or {}).get("status") == "COMPLETED", "a new request",
                   deadline_s=120)
    finally:
        api.stop_all()
        worker.stop_all()
    assert PASSWORD not in caplog.text
