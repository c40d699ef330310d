"""``serve`` stops when asked and no client can stall it: the cases behind a CI run where ``serve`` did not exit
within 60 s of SIGINT.

- SIGINT (or SIGTERM, which stops it the same way) that the kernel hands to one of the server's other threads (any
  thread of a process may receive a signal sent to the process; Python only acts on it in the main thread, when
  that thread next runs);
- a client that opens a TCP connection to the HTTPS port and sends nothing (the TLS handshake must not hold the
  thread that accepts connections: other clients are still answered, and the server still stops);
- an idle keep-alive connection left open when the server stops.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from test_serve import KEY, Paused
from test_serve_cli import as_at_a_terminal, make_cert

ROOT = Path(__file__).resolve().parent.parent


def tls_server(tmp_path):
    from sdxl_controlnet_img2img.pipeline.serve.app import ServeApp
    from sdxl_controlnet_img2img.pipeline.serve.cli import StandaloneServer
    from sdxl_controlnet_img2img.pipeline.serve.store import Store

    cert, key = make_cert(tmp_path)
    store = Store(tmp_path / "data")
    server = StandaloneServer(ServeApp(store, Paused(), key=KEY), tls_cert=cert, tls_key=key).start()
    return server, store, ssl.create_default_context(cafile=str(cert))


def get_status(server, ctx, timeout=10.0) -> int:
    """An unknown request's status over HTTPS: answered (404) when the server serves."""
    req = urllib.request.Request(f"{server.url}/fal-ai/fast-sdxl-controlnet-canny/requests/"
                                 "00000000-0000-0000-0000-000000000000/status",
                                 headers={"Authorization": f"Key {KEY}"})
    try:
        with urllib.request.urlopen(req, timeout=timeout, context=ctx) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def stop_within(server, seconds: float) -> bool:
    t = threading.Thread(target=server.stop, daemon=True)
    t.start()
    t.join(seconds)
    return not t.is_alive()


def test_a_silent_connection_neither_blocks_other_clients_nor_the_stop(tmp_path):
    server, store, ctx = tls_server(tmp_path)
    silent = socket.create_connection(("127.0.0.1", server.port), timeout=10)  # connects, never says hello
    idle = None
    try:
        time.sleep(0.5)
        # other clients are answered while the silent one waits: a handshake and a request
        idle = ctx.wrap_socket(socket.create_connection(("127.0.0.1", server.port), timeout=10),
                               server_hostname="127.0.0.1")
        assert get_status(server, ctx) == 404
        assert stop_within(server, 10.0), "the server did not stop with a silent and an idle connection open"
    finally:
        silent.close()
        if idle is not None:
            idle.close()
        store.close()


def tgkill(pid: int, tid: int, sig: int) -> None:
    """Send ``sig`` to one thread of another process (Linux tgkill)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(234 if os.uname().machine == "x86_64" else 131, pid, tid, sig) != 0:
        raise OSError(ctypes.get_errno(), "tgkill")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_stop_signal_to_any_thread_stops_serve(tiny_models, tmp_path, sig):
    from comfyui_harness import free_port, wait_until

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("SDXLCN_SERVE_KEY", None)
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "sdxl_controlnet_img2img", "serve", "--checkpoint", str(tiny_models["checkpoint"]),
         "--controlnet", str(tiny_models["controlnet"]), "--port", str(free_port()), "--device", "cpu", "--dtype",
         "fp32", "--data-dir", str(tmp_path / "data")], stdout=subprocess.PIPE, stderr=log, text=True, env=env,
        cwd=ROOT, preexec_fn=as_at_a_terminal)
    try:
        line = proc.stdout.readline()
        assert line.startswith("READY"), (line, (tmp_path / "serve.log").read_text()[-3000:])
        others = [int(t) for t in os.listdir(f"/proc/{proc.pid}/task") if int(t) != proc.pid]
        assert others  # the HTTP, worker and webhook threads at least
        tgkill(proc.pid, others[0], sig)  # Python's C-level handler runs there; main must still act
        wait_until(lambda: proc.poll() is not None, f"serve exits after {sig.name} reached one of its other threads",
                   deadline_s=30)
        assert proc.returncode == 0
        assert "stopping" in (tmp_path / "serve.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
