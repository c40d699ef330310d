"""A real fal-protocol HTTPS server on 127.0.0.1 for the tests (queue API, storage upload, result files).

It speaks the queue protocol the way fal does: ``POST /<app>`` -> ``{request_id, status_url,
response_url, cancel_url}``; ``GET .../requests/<id>/status?logs=1`` -> IN_QUEUE (queue_position)
/ IN_PROGRESS (logs) / COMPLETED; ``GET .../requests/<id>`` -> the result; ``PUT .../cancel``.
Auth is ``Authorization: Key <key>``. Results are real PNGs computed from the submitted input
image (its colours inverted), served over https or returned as data URIs with ``sync_mode``.

``fal_client`` reads its hosts when imported, so :func:`configure_environment` must run before
anything imports it: it reserves a port, writes a self-signed certificate for 127.0.0.1 (``openssl``)
and sets ``FAL_QUEUE_RUN_HOST``/``FAL_RUN_HOST`` and ``SSL_CERT_FILE``.

Faults are set per test with :meth:`FalTestServer.reset` (see :class:`Behaviour`).
"""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import ssl
import subprocess
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

APP = "fal-ai/fast-sdxl-controlnet-canny/image-to-image"
TEST_KEY = "test-key-id:test-secret-not-real"

_env: dict | None = None


def configure_environment() -> dict:
    """Reserve a port, make a certificate, set fal_client's host variables. Idempotent."""
    global _env
    if _env is not None:
        return _env
    tmp = Path(tempfile.mkdtemp(prefix="fal-test-server-"))
    cert, keyfile = tmp / "cert.pem", tmp / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost", "-keyout", str(keyfile), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    host = f"127.0.0.1:{port}"
    os.environ["FAL_QUEUE_RUN_HOST"] = host
    os.environ["FAL_RUN_HOST"] = host
    os.environ["SSL_CERT_FILE"] = str(cert)
    _env = {"port": port, "host": host, "cert": cert, "key": keyfile, "dir": tmp}
    return _env


@dataclass
class Behaviour:
    """What the server does for the next requests (faults are consumed as they fire)."""

    queue_s: float = 0.0  # time a request stays IN_QUEUE
    queue_ahead: int = 3  # queue position at submission, counting down to 0 over queue_s
    run_s: float = 0.05  # time IN_PROGRESS
    logs: list = field(default_factory=lambda: ["loading model", "step 1/2", "step 2/2"])
    submit_statuses: list = field(default_factory=list)  # HTTP statuses answered before the submit succeeds
    # 5xx answered by an ingress in front of fal (no x-fal-request-id header: the request never reached fal)
    submit_ingress_statuses: list = field(default_factory=list)
    # 5xx answered by fal *after* it accepted the submission (the job exists; the header carries its id)
    submit_accepted_statuses: list = field(default_factory=list)
    # fal accepts the submission (the job exists, it is billed) but its answer comes this much later: a large body
    # still being sent, or a slow ingress
    submit_answer_delay_s: float = 0.0
    # fal accepts the submission and sends its answer's headers, then the body goes wrong (one fault per submit):
    # "cutoff" (half the body, then the connection closes), "stall" (half the body, then nothing for stall_s),
    # "html" (a 200 whose body is an HTML page, as a proxy in front of fal may answer)
    submit_answer_faults: list = field(default_factory=list)
    fault_request_id: bool = True  # whether those answers carry the x-fal-request-id header
    stall_s: float = 5.0
    status_statuses: list = field(default_factory=list)  # same, for status polls
    result_statuses: list = field(default_factory=list)  # same, for the result
    auth_detail: str | None = None  # answer every call with 401 and this detail (may contain the key: tests redact)
    auth_status: int = 401
    validation_at: str = "result"  # where a 422 for invalid arguments is answered: "submit" or "result"
    drop_status: int = 0  # number of status polls answered by closing the connection
    hang_status_s: float = 0.0  # each status poll sleeps this long before answering (bounded)
    no_images: bool = False
    image_status: int = 200  # HTTP status of the result image files
    completed_error: str | None = None  # COMPLETED with this error
    fail_prompts: list = field(default_factory=list)  # requests with one of these prompts complete with an error
    fail_seeds: list = field(default_factory=list)  # same, by seed
    nsfw: list | None = None  # has_nsfw_concepts to report
    reject: list = field(default_factory=list)  # extra 422 problems ({loc, msg, type}) for every request


class Job:
    def __init__(self, rid: str, args: dict, behaviour: Behaviour):
        self.id = rid
        self.args = args
        self.submitted = time.monotonic()
        self.queue_s = behaviour.queue_s
        self.run_s = behaviour.run_s
        self.queue_ahead = behaviour.queue_ahead
        self.cancelled = False
        self.fetched = False

    def state(self, now: float) -> tuple[str, int]:
        t = now - self.submitted
        if t < self.queue_s:
            left = 1 - t / self.queue_s if self.queue_s else 0
            return "IN_QUEUE", int(round(self.queue_ahead * left))
        if t < self.queue_s + self.run_s:
            return "IN_PROGRESS", 0
        return "COMPLETED", 0


class FalTestServer:
    def __init__(self, key: str = TEST_KEY):
        env = configure_environment()
        self.key = key
        self.port = env["port"]
        self.base = f"https://127.0.0.1:{self.port}"
        self.lock = threading.Lock()
        self.files: dict[str, tuple[bytes, str]] = {}
        self.stopping = threading.Event()
        self.reset()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):  # quiet
                pass

            def do_POST(self):
                server._handle(self, "POST")

            def do_GET(self):
                server._handle(self, "GET")

            def do_PUT(self):
                server._handle(self, "PUT")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.httpd.daemon_threads = True
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(env["cert"], env["key"])
        self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        self._wait_ready()

    def _wait_ready(self, deadline_s: float = 10.0):
        end = time.monotonic() + deadline_s
        while time.monotonic() < end:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.02)
        raise RuntimeError("fal test server did not start")

    def stop(self):
        self.stopping.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    # ---- state ---------------------------------------------------------------------------
    def reset(self, **behaviour):
        with getattr(self, "lock", threading.Lock()):
            self.behaviour = Behaviour(**behaviour)
            self.jobs: dict[str, Job] = {}
            self.calls: list[tuple[str, str, str]] = []  # (method, path, auth header)
            self.cancelled: list[str] = []
            self.active = 0
            self.max_active = 0
            self.uploads: list[str] = []
            self.submissions = 0  # POSTs to the app: each one fal accepts is billed

    def _pop(self, name: str):
        lst = getattr(self.behaviour, name)
        if lst:
            return lst.pop(0)
        return None

    # ---- HTTP ----------------------------------------------------------------------------
    def _send(self, h, code: int, body, ctype="application/json", headers=None, fal_id: str | None = "srv",
              length: int | None = None):
        """Answer ``body``; ``length`` (the Content-Length) longer than it: a body cut off after the headers."""
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        h.send_response(code)
        h.send_header("Content-Type", ctype)
        h.send_header("Content-Length", str(length or len(data)))
        if fal_id is not None:  # fal itself answered (an ingress error has no such header)
            h.send_header("x-fal-request-id", fal_id)
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(data)

    def _handle(self, h, method: str):
        url = urlsplit(h.path)
        path = url.path
        length = int(h.headers.get("Content-Length") or 0)
        raw = h.rfile.read(length) if length else b""
        auth = h.headers.get("Authorization", "")
        with self.lock:
            self.calls.append((method, path, auth))
            b = self.behaviour
        if path.startswith("/files/"):
            return self._file(h, path[len("/files/"):])
        if path.startswith("/storage/upload/put/") and method == "PUT":
            name = path.rsplit("/", 1)[1]
            self.files[name] = (raw, h.headers.get("Content-Type", "application/octet-stream"))
            return self._send(h, 200, {})
        if auth != f"Key {self.key}":
            return self._send(h, 401, {"detail": f"Invalid key: {auth[4:]!s}"})
        if b.auth_detail is not None:
            return self._send(h, b.auth_status, {"detail": b.auth_detail})
        if path.startswith("/storage/upload/initiate") and method == "POST":
            info = json.loads(raw or b"{}")
            name = f"{uuid.uuid4().hex}-{info.get('file_name', 'upload.bin')}"
            with self.lock:
                self.uploads.append(name)
            return self._send(h, 200, {"upload_url": f"{self.base}/storage/upload/put/{name}",
                                       "file_url": f"{self.base}/files/{name}"})
        if "/requests/" in path:
            app, _, rest = path.lstrip("/").partition("/requests/")
            rid, _, tail = rest.partition("/")
            with self.lock:
                job = self.jobs.get(rid)
            if job is None:
                return self._send(h, 404, {"detail": f"Request {rid} not found"})
            if tail == "status" and method == "GET":
                return self._status(h, job, parse_qs(url.query))
            if tail == "cancel" and method == "PUT":
                return self._cancel(h, job)
            if tail == "" and method == "GET":
                return self._result(h, job)
            return self._send(h, 405, {"detail": "method not allowed"})
        if method == "POST":
            return self._submit(h, path.lstrip("/"), raw)
        return self._send(h, 404, {"detail": "not found"})

    def _submit(self, h, app: str, raw: bytes):
        with self.lock:
            self.submissions += 1
        code = self._pop("submit_statuses")
        if code:
            return self._send(h, code, {"detail": f"injected {code}"})
        code = self._pop("submit_ingress_statuses")
        if code:
            return self._send(h, code, b"<html>502 Bad Gateway</html>", ctype="text/html", fal_id=None)
        args = json.loads(raw or b"{}")
        if self.behaviour.validation_at == "submit":
            problems = _validate(args) + list(self.behaviour.reject)
            if problems:
                return self._send(h, 422, {"detail": problems})
        rid = str(uuid.uuid4())
        with self.lock:
            self.jobs[rid] = Job(rid, args, self.behaviour)
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        if self.behaviour.submit_answer_delay_s:
            self.stopping.wait(self.behaviour.submit_answer_delay_s)
        code = self._pop("submit_accepted_statuses")
        if code:
            return self._send(h, code, {"detail": f"injected {code} after accepting"}, fal_id=rid)
        base = f"{self.base}/{app}/requests/{rid}"
        answer = {"request_id": rid, "status_url": base + "/status", "response_url": base,
                  "cancel_url": base + "/cancel", "queue_position": self.behaviour.queue_ahead}
        fault = self._pop("submit_answer_faults")
        if fault:
            return self._broken_answer(h, fault, answer, rid if self.behaviour.fault_request_id else None)
        return self._send(h, 200, answer)

    def _broken_answer(self, h, fault: str, answer: dict, fal_id: str | None):
        """The submit's answer headers (200) go out whole, its body does not (``Behaviour.submit_answer_faults``)."""
        if fault == "html":
            page = b"<html><head><title>502</title></head><body>upstream busy, try again</body></html>"
            return self._send(h, 200, page, ctype="text/html", fal_id=fal_id)
        assert fault in ("cutoff", "stall"), fault
        data = json.dumps(answer).encode()
        self._send(h, 200, data[: len(data) // 2], fal_id=fal_id, length=len(data))
        h.wfile.flush()
        if fault == "stall":
            self.stopping.wait(self.behaviour.stall_s)
        _drop(h)

    def _status(self, h, job: Job, query):
        b = self.behaviour
        if b.hang_status_s:
            self.stopping.wait(b.hang_status_s)
        with self.lock:
            if b.drop_status > 0:
                b.drop_status -= 1
                drop = True
            else:
                drop = False
        if drop:
            return _drop(h)
        code = self._pop("status_statuses")
        if code:
            return self._send(h, code, {"detail": f"injected {code}"})
        if job.cancelled:
            return self._send(h, 200, {"status": "COMPLETED", "logs": [], "error": "Request cancelled",
                                       "error_type": "request_cancelled"})
        state, pos = job.state(time.monotonic())
        with_logs = query.get("logs", ["0"])[0] in ("1", "true", "True")
        logs = None
        if with_logs:
            n = len(b.logs) if state == "COMPLETED" else (1 if state == "IN_PROGRESS" else 0)
            logs = [{"message": m, "level": "INFO", "source": "user", "timestamp": "2025-01-01T00:00:00Z"}
                    for m in b.logs[:n]]
        body = {"status": state, "request_id": job.id, "response_url": "", "logs": logs}
        if state == "IN_QUEUE":
            body["queue_position"] = pos
        if state == "COMPLETED":
            body["metrics"] = {"inference_time": 0.01}
            if b.completed_error:
                body["error"] = b.completed_error
            elif job.args.get("prompt") in b.fail_prompts or job.args.get("seed") in b.fail_seeds:
                body["error"] = f"runner failed for prompt {job.args.get('prompt')!r}"
        return self._send(h, 200, body)

    def _cancel(self, h, job: Job):
        with self.lock:
            self.cancelled.append(job.id)
            state, _ = job.state(time.monotonic())
            if state == "IN_QUEUE":
                job.cancelled = True
                self.active -= 1
                return self._send(h, 202, {"status": "CANCELLATION_REQUESTED"})
        return self._send(h, 400, {"status": "ALREADY_COMPLETED"})

    def _result(self, h, job: Job):
        code = self._pop("result_statuses")
        if code:
            return self._send(h, code, {"detail": f"injected {code}"})
        state, _ = job.state(time.monotonic())
        if state != "COMPLETED":
            return self._send(h, 400, {"detail": "Request is still in progress"})
        problems = _validate(job.args) + list(self.behaviour.reject)
        if problems:
            return self._send(h, 422, {"detail": problems})
        with self.lock:
            if not job.fetched:
                job.fetched = True
                self.active -= 1
        return self._send(h, 200, self._output(job))

    def _output(self, job: Job) -> dict:
        from PIL import Image, ImageOps

        args, b = job.args, self.behaviour
        init = _open_input(args["image_url"], self)
        size = args.get("image_size")
        if isinstance(size, dict):
            init = init.resize((size["width"], size["height"]))
        images = []
        for i in range(int(args.get("num_images", 1))):
            img = ImageOps.invert(init.convert("RGB"))
            if i:
                img = img.rotate(180)
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            data = buf.getvalue()
            if args.get("sync_mode"):
                url = "data:image/png;base64," + base64.b64encode(data).decode()
            else:
                name = f"{job.id}-{i}.png"
                self.files[name] = (data, "image/png")
                url = f"{self.base}/files/{name}"
            images.append({"url": url, "width": img.width, "height": img.height, "content_type": "image/png"})
        if b.no_images:
            images = []
        return {
            "images": images,
            "seed": args.get("seed", 42),
            "has_nsfw_concepts": b.nsfw if b.nsfw is not None else [False] * len(images),
            "prompt": args.get("prompt", ""),
            "timings": {"inference": 0.01},
        }

    def _file(self, h, name: str):
        if self.behaviour.image_status != 200:
            return self._send(h, self.behaviour.image_status, {"detail": "gone"})
        if name not in self.files:
            return self._send(h, 404, {"detail": "no such file"})
        data, ctype = self.files[name]
        return self._send(h, 200, data, ctype)


def _drop(h) -> None:
    """Close the connection without (the rest of) an answer."""
    h.close_connection = True
    try:
        h.connection.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _validate(args: dict) -> list:
    problems = []
    s = args.get("strength")
    if s is not None and not (0 < s <= 1):
        problems.append({"loc": ["body", "strength"], "msg": "ensure this value is less than or equal to 1",
                         "type": "value_error.number.not_le"})
    for name in ("prompt", "image_url", "control_image_url"):
        if not args.get(name):
            problems.append({"loc": ["body", name], "msg": "field required", "type": "value_error.missing"})
    return problems


def _open_input(url: str, server: FalTestServer):
    from PIL import Image

    if url.startswith("data:"):
        data = base64.b64decode(url.partition(",")[2])
    elif url.startswith(server.base + "/files/"):
        data = server.files[url.rsplit("/", 1)[1]][0]
    else:
        raise ValueError(f"the test server cannot open {url[:40]}")
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


# ---- pytest fixtures (imported by tests/test_fal*.py) ---------------------------------------
import pytest  # noqa: E402


def _ensure_fal_client_hosts(host: str) -> None:
    """fal_client reads FAL_QUEUE_RUN_HOST at import: reload it if something imported it earlier."""
    import importlib

    import fal_client
    import fal_client.auth
    import fal_client.client

    if host not in fal_client.client.QUEUE_URL_FORMAT:
        importlib.reload(fal_client.auth)
        importlib.reload(fal_client.client)
        importlib.reload(fal_client)
    assert host in fal_client.client.QUEUE_URL_FORMAT


_server: FalTestServer | None = None


@pytest.fixture(scope="session")
def fal_test_server():
    """One server per test session (several test modules import this fixture; it starts once)."""
    global _server
    env = configure_environment()
    _ensure_fal_client_hosts(env["host"])
    if _server is None:
        _server = FalTestServer()
    return _server


@pytest.fixture
def fal(fal_test_server, monkeypatch):
    """The server, reset, with FAL_KEY set to the fake test key (and no other key source)."""
    monkeypatch.setenv("FAL_KEY", TEST_KEY)
    monkeypatch.delenv("FAL_KEY_ID", raising=False)
    monkeypatch.delenv("FAL_KEY_SECRET", raising=False)
    fal_test_server.reset()
    return fal_test_server


@pytest.fixture
def user_dir(tmp_path, monkeypatch):
    """ComfyUI's ``folder_paths`` is absent in tests: a stand-in giving the user directory (and an output folder)."""
    import sys
    import types

    (tmp_path / "output").mkdir(exist_ok=True)
    monkeypatch.setitem(sys.modules, "folder_paths", types.SimpleNamespace(
        get_user_directory=lambda: str(tmp_path), get_output_directory=lambda: str(tmp_path / "output")))
    return tmp_path / "sdxl_controlnet_img2img"


def fast_settings(**changes):
    from sdxl_controlnet_img2img.pipeline.fal.settings import FalSettings

    base = dict(http_timeout_s=3.0, max_retries=2, backoff_s=0.01, backoff_max_s=0.05, poll_interval_s=0.02,
                download_timeout_s=3.0)
    base.update(changes)
    return FalSettings(**base)
