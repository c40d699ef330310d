"""``serve`` starting up (issue 31, item 2's start-up part, and item 5's warning): every start-up error is one line
naming the option or file, before the models load (they were tracebacks after the long wait), a second ``serve`` on
the same ``--data-dir`` refuses (it queued the first one's running request again), IPv6 hosts work, and a key sent
in clear text is warned about. Run as a user runs it: ``python -m sdxl_controlnet_img2img serve`` on tiny models."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from loopback import ipv6_can_bind
from test_serve import KEY
from test_serve_cli import as_at_a_terminal

ROOT = Path(__file__).resolve().parent.parent


def serve_args(tiny_models, data: Path, port: int, *extra) -> list:
    return [sys.executable, "-m", "sdxl_controlnet_img2img", "serve", "--checkpoint", str(tiny_models["checkpoint"]),
            "--controlnet", str(tiny_models["controlnet"]), "--port", str(port), "--device", "cpu", "--dtype", "fp32",
            "--data-dir", str(data), *extra]


def env_with(key: str | None) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("SDXLCN_SERVE_KEY", None)
    if key:
        env["SDXLCN_SERVE_KEY"] = key
    return env


def refused(args: list, key: str | None = KEY) -> str:
    """serve's one error line (exit 2) for ``args``; the models were never loaded."""
    p = subprocess.run(args, capture_output=True, text=True, env=env_with(key), cwd=ROOT, timeout=120)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), (p.returncode, p.stderr[-3000:])
    return lines[0]


class Serving:
    def __init__(self, args: list, key: str | None):
        self.log = open(Path(args[args.index("--data-dir") + 1]).parent / f"serve-{os.getpid()}-{id(self)}.log", "w+")
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=self.log, text=True, env=env_with(key),
                                     cwd=ROOT, preexec_fn=as_at_a_terminal)
        self.ready = self.proc.stdout.readline().strip()

    def stderr(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def test_a_second_serve_on_the_same_data_dir_refuses_in_one_line(tiny_models, tmp_path):
    from comfyui_harness import free_port

    first = Serving(serve_args(tiny_models, tmp_path / "data", free_port()), KEY)
    try:
        assert first.ready.startswith("READY"), first.stderr()[-3000:]
        line = refused(serve_args(tiny_models, tmp_path / "data", free_port()))
        assert "--data-dir" in line and "another server" in line and str(first.proc.pid) in line, line
    finally:
        first.stop()
    assert first.proc.returncode == 0


def test_start_up_errors_are_one_line_before_the_models_load(tiny_models, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        line = refused(serve_args(tiny_models, tmp_path / "a", port))
        assert f"--port {port}" in line and "in use" in line, line
    missing = tmp_path / "no-such-cert.pem"
    line = refused(serve_args(tiny_models, tmp_path / "b", 0, "--tls-cert", str(missing), "--tls-key", str(missing)))
    assert "--tls-cert" in line and str(missing) in line, line
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "queue.sqlite3").write_bytes(b"this is not a database\n" * 200)
    line = refused(serve_args(tiny_models, tmp_path / "c", 0))
    assert "--data-dir" in line and "queue.sqlite3" in line, line
    line = refused(serve_args(tiny_models, tmp_path / "d", 0, "--host", "no-such-host.invalid"))
    assert "--host no-such-host.invalid" in line, line


def test_bad_port_public_url_and_data_dir_are_one_line_naming_the_option(tiny_models, tmp_path):
    """A port out of TCP's range (99999 listened on 34463, -5 blamed --host), a --public-url that is no URL (taken
    silently) and a --data-dir holding a file where the store makes its folder (a traceback): one line each."""
    for port in (99999, -5):
        line = refused(serve_args(tiny_models, tmp_path / "a", port))
        assert line.startswith(f"error: --port {port}:") and "65535" in line, line
    line = refused(serve_args(tiny_models, tmp_path / "b", 0, "--public-url", "notaurl"))
    assert line.startswith("error: --public-url notaurl:"), line
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "requests").write_text("not a folder")
    line = refused(serve_args(tiny_models, tmp_path / "c", 0))
    assert line.startswith(f"error: --data-dir {tmp_path / 'c'}:") and "requests" in line, line


@pytest.mark.skipif(not ipv6_can_bind(), reason="this machine has no IPv6 loopback (::1)")
def test_serve_on_ipv6_loopback(tiny_models, tmp_path):
    from comfyui_harness import free_port

    port = free_port()
    server = Serving(serve_args(tiny_models, tmp_path / "data", port, "--host", "::1"), None)
    try:
        assert server.ready == f"READY http://[::1]:{port}", (server.ready, server.stderr()[-3000:])
        url = f"http://[::1]:{port}/fal-ai/fast-sdxl-controlnet-canny/requests/00000000-0000-0000-0000-000000000000"
        try:
            urllib.request.urlopen(url, timeout=30)
            raise AssertionError("an unknown request was found")
        except urllib.error.HTTPError as exc:
            assert exc.code == 404
    finally:
        server.stop()
    assert server.proc.returncode == 0


def test_a_key_without_tls_beyond_loopback_is_warned_about(tiny_models, tmp_path):
    from comfyui_harness import free_port

    server = Serving(serve_args(tiny_models, tmp_path / "data", free_port(), "--host", "0.0.0.0"), KEY)
    try:
        assert server.ready.startswith("READY"), server.stderr()[-3000:]
        err = server.stderr()
        warning = [ln for ln in err.splitlines() if ln.startswith("warning:")]
        assert len(warning) == 1 and "clear text" in warning[0] and "--tls-cert" in warning[0], err
        assert err.index("warning:") < err.index("loading the models")  # said before the long wait
        assert KEY not in err
    finally:
        server.stop()
