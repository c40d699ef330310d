"""``serve`` processes as nodes of a shared queue, for the Redis tests: each one ``python -m sdxl_controlnet_img2img
serve --queue URL`` on a free port (``--port 0``), its stderr in a log file the test reads, started once it printed
READY. Workers load the tiny models on the CPU; API nodes (``--workers 0``) load none."""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from test_serve import KEY

ROOT = Path(__file__).resolve().parent.parent.parent


class Node:
    def __init__(self, name: str, proc: subprocess.Popen, log: Path, cert=None):
        self.name, self.proc, self.log_path, self.cert = name, proc, log, cert
        self.url: str | None = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, deadline_s: float = 240) -> "Node":
        end = time.monotonic() + deadline_s
        while time.monotonic() < end:
            line = self.proc.stdout.readline()
            if line.startswith("READY "):
                self.url = line.split()[1]
                return self
            if not line and self.proc.poll() is not None:
                break
        self.proc.kill()
        raise AssertionError(f"node {self.name} did not start: {self.log()[-3000:]}")

    def call(self, method: str, path: str, body=None, key: str | None = KEY, headers: dict | None = None):
        """(status, JSON body, headers) of a call to this node; ``path`` relative to its base, or a full URL."""
        url = path if path.startswith("http") else f"{self.url}/{path.lstrip('/')}"
        data = json.dumps(body).encode() if body is not None else None
        h = {"Content-Type": "application/json", **(headers or {})}
        if key:
            h["Authorization"] = f"Key {key}"
        ctx = ssl.create_default_context(cafile=str(self.cert)) if self.cert else None
        req = urllib.request.Request(url, data=data, method=method, headers=h)
        try:
            with urllib.request.urlopen(req, timeout=30, context=ctx) as r:
                raw = r.read()
                return r.status, (raw if r.headers.get("Content-Type") == "image/png" else json.loads(raw or b"null")), \
                    dict(r.headers)
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null"), dict(e.headers)

    def kill(self) -> None:
        """SIGKILL: what a power loss or the OOM killer does."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)

    def interrupt(self) -> None:
        """Ctrl-C, without waiting for it to take effect."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.interrupt()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()


def start_node(folder: Path, name: str, queue_url: str, *args: str, models: dict | None = None, tls=None) -> Node:
    """A node started (not yet ready: :meth:`Node.wait_ready`); ``models`` (the tiny models) makes it a worker,
    ``tls`` (cert, key) serves HTTPS."""
    folder.mkdir(parents=True, exist_ok=True)
    log = folder / f"{name}.log"
    cmd = [sys.executable, "-m", "sdxl_controlnet_img2img", "serve", "--queue", queue_url, "--port", "0",
           "--data-dir", str(folder / f"{name}-data"), *args]
    if models is not None:
        cmd += ["--checkpoint", str(models["checkpoint"]), "--controlnet", str(models["controlnet"]), "--device",
                "cpu", "--dtype", "fp32"]
    else:
        cmd += ["--workers", "0"]
    if tls is not None:
        cmd += ["--tls-cert", str(tls[0]), "--tls-key", str(tls[1])]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "SDXLCN_SERVE_KEY": KEY,
           "OMP_NUM_THREADS": "1"}  # several workers on a machine's few cores: one thread each, none oversubscribed
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=open(log, "w"), text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    return Node(name, proc, log, tls[0] if tls else None)


def wait_completed(node: Node, request_id: str, deadline_s: float = 180) -> dict:
    """The request's status with logs once COMPLETED, asked of ``node``."""
    from test_serve import APP

    end = time.monotonic() + deadline_s
    last = None
    while time.monotonic() < end:
        code, last, _ = node.call("GET", f"{APP.rsplit('/', 1)[0]}/requests/{request_id}/status?logs=1")
        assert code == 200, last
        if last["status"] == "COMPLETED":
            return last
        time.sleep(0.1)
    raise AssertionError(f"{request_id} not completed within {deadline_s} s: {last}")
