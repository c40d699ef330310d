"""fal's request headers (issue 33, item 5), sent by fal's own Python client ``fal_client`` (its ``start_timeout`` and
``priority`` arguments) to a real server over HTTPS on 127.0.0.1, and the log items as fal's clients type them:

- ``x-fal-request-timeout``: a request still waiting after that many seconds ends; fal_client sees HTTP 504 with
  ``X-Fal-Request-Timeout-Type: user`` and does not retry it (its log of retries stays empty, the server sees one
  result call);
- ``x-fal-queue-priority: low`` waits behind every ``normal`` request (queue positions as fal_client reads them, and
  the order the worker then runs them in); ``x-fal-no-retry`` is accepted;
- log items carry ``source: "USER"`` and one of fal's levels (@fal-ai/client's ``RequestLog`` type).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from test_serve import APP, KEY, call, fal_input, wait_done
from test_serve_cli import make_cert

ROOT = Path(__file__).resolve().parent.parent
# @fal-ai/client 1.10's RequestLog (tests/js/node_modules/@fal-ai/client/src/types/common.d.ts)
FAL_LOG_LEVELS = {"STDERR", "STDOUT", "ERROR", "INFO", "WARN", "DEBUG"}
FAL_LOG_SOURCE = "USER"

CLIENT = r"""
import json, logging, sys, fal_client
APP = "fal-ai/fast-sdxl-controlnet-canny/image-to-image"
retries = []

class Retries(logging.Handler):
    def emit(self, record):
        if "Retrying" in record.getMessage():
            retries.append(record.getMessage())

logging.getLogger("fal_client").addHandler(Retries())
logging.getLogger("fal_client").setLevel(logging.DEBUG)
inp = json.loads(sys.stdin.read())
out = {"ids": {}}
for i, (name, priority) in enumerate((("low1", "low"), ("normal1", "normal"), ("low2", "low"), ("normal2", None))):
    out["ids"][name] = fal_client.submit(APP, {**inp, "seed": i}, priority=priority).request_id
out["positions"] = {name: fal_client.status(APP, rid).position for name, rid in out["ids"].items()}
out["no_retry"] = fal_client.submit(APP, inp, headers={"x-fal-no-retry": "1"}).request_id
try:
    fal_client.subscribe(APP, inp, start_timeout=1.5, client_timeout=30,
                         on_enqueue=lambda rid: out.__setitem__("late", rid))
    out["timeout"] = "it ran"
except fal_client.client.FalClientHTTPError as exc:
    out["timeout"] = [exc.status_code, exc.response_headers.get("x-fal-request-timeout-type")]
except Exception as exc:
    out["timeout"] = repr(exc)
out["retries"] = retries
print("RESULT " + json.dumps(out))
"""


def test_fal_clients_timeout_priority_and_no_retry(tmp_path, tiny_pipe, monkeypatch):
    from sdxl_controlnet_img2img.pipeline.serve.app import ServeApp
    from sdxl_controlnet_img2img.pipeline.serve.server import StandaloneServer
    from sdxl_controlnet_img2img.pipeline.serve.store import Store
    from sdxl_controlnet_img2img.pipeline.serve.worker import LocalWorkers

    class Counting(ServeApp):  # the real app, counting the calls it is asked
        calls: list = []

        def handle(self, req):
            self.calls.append((req.method, req.path))
            return super().handle(req)

    cert, key = make_cert(tmp_path)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # this test's own calls (urllib) trust the server too
    store = Store(tmp_path / "data")
    workers = LocalWorkers(store, {"cpu": tiny_pipe})  # not started while the client runs: everything waits
    app = Counting(store, workers, key=KEY)
    server = StandaloneServer(app, tls_cert=cert, tls_key=key).start()
    try:
        env = {**os.environ, "FAL_QUEUE_RUN_HOST": f"127.0.0.1:{server.port}",
               "FAL_RUN_HOST": f"127.0.0.1:{server.port}/run", "SSL_CERT_FILE": str(cert), "FAL_KEY": KEY}
        p = subprocess.run([sys.executable, "-c", CLIENT], input=json.dumps(fal_input()), capture_output=True,
                           text=True, env=env, timeout=120)
        assert p.returncode == 0, p.stderr[-3000:]
        out = json.loads([ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")][-1][len("RESULT "):])
        assert out["timeout"] == [504, "user"], out
        assert out["retries"] == [], out["retries"]
        late = out["late"]
        assert [c for c in app.calls if c == ("GET", f"/fal-ai/fast-sdxl-controlnet-canny/requests/{late}")] == \
            [("GET", f"/fal-ai/fast-sdxl-controlnet-canny/requests/{late}")], app.calls
        assert out["positions"] == {"normal1": 0, "normal2": 1, "low1": 2, "low2": 3}, out["positions"]
        workers.start()
        ids = out["ids"]
        base = f"{server.url}/fal-ai/fast-sdxl-controlnet-canny/requests/"
        for rid in [*ids.values(), out["no_retry"]]:
            done, _seen = wait_done(base + rid + "/status")
            assert "error" not in done, done
        started = {name: store.get(rid).started for name, rid in ids.items()}
        assert sorted(started, key=started.get) == ["normal1", "normal2", "low1", "low2"], started
        assert store.get(late).started is None  # it never ran
        code, status, _ = call("GET", base + ids["low1"] + "/status?logs=1")
        assert code == 200 and status["logs"], status
        for item in status["logs"]:
            assert item["source"] == FAL_LOG_SOURCE and item["level"] in FAL_LOG_LEVELS, item
        # a timeout that is no number is refused, naming the header
        code, body, _ = call("POST", f"{server.url}/{APP}", fal_input(), headers={"x-fal-request-timeout": "soon"})
        assert code == 422 and body["detail"][0]["loc"] == ["header", "x-fal-request-timeout"], body
        code, body, _ = call("POST", f"{server.url}/{APP}", fal_input(), headers={"x-fal-queue-priority": "high"})
        assert code == 422 and body["detail"][0]["loc"] == ["header", "x-fal-queue-priority"], body
    finally:
        server.stop()
        if workers.threads[0].ident is not None:  # started
            workers.stop()
        store.close()


def test_the_log_levels_are_those_of_fals_js_client():
    """The levels above are @fal-ai/client's own, when its package is installed (``npm ci --prefix tests/js``)."""
    import re

    types = ROOT / "tests" / "js" / "node_modules" / "@fal-ai" / "client" / "src" / "types" / "common.d.ts"
    if not types.is_file():
        import os

        import pytest

        why = "@fal-ai/client is not installed (npm ci --prefix tests/js; scripts/test.sh does it first)"
        if os.environ.get("SDXLCN_REQUIRE_COMFYUI") == "1":  # CI: installed by scripts/test.sh, never skipped
            pytest.fail(why)
        pytest.skip(why)
    text = types.read_text()
    block = re.search(r"type RequestLog = \{(.*?)\};", text, re.S).group(1)
    assert set(re.findall(r'"([A-Z]+)"', re.search(r"level: ([^;]+);", block).group(1))) == FAL_LOG_LEVELS
    assert re.search(r"source: ([^;]+);", block).group(1).strip() == f'"{FAL_LOG_SOURCE}"'
