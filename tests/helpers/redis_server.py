"""A real ``redis-server`` (Debian's package) for the shared-queue tests: its own process on a free loopback port, its
files in a temp folder, the append-only file on and synced at every write (so a SIGKILL loses nothing accepted), no
snapshots. :meth:`RedisServer.kill` and :meth:`RedisServer.start` again on the same folder test recovery from the
append-only file. Without ``redis-server`` on PATH the tests that need it skip, saying how to install it (CI installs
it: ``.ci/run``)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    def __init__(self, folder: Path, password: str | None = None):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.password = password
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> "RedisServer":
        args = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.folder),
                "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--daemonize", "no",
                "--logfile", str(self.folder / "redis.log")]
        if self.password:
            args += ["--requirepass", self.password]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        end = time.monotonic() + 30
        while time.monotonic() < end:  # ready once it answers PING (after loading its append-only file)
            if self.proc.poll() is not None:
                raise AssertionError(f"redis-server exited: {(self.folder / 'redis.log').read_text()[-2000:]}")
            if self._pong():
                return self
            time.sleep(0.05)
        raise AssertionError("redis-server did not answer within 30 s")

    def _pong(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                auth = f"AUTH {self.password}\r\n" if self.password else ""
                s.sendall(f"{auth}PING\r\n".encode())
                return b"+PONG" in s.recv(256) or (self.password and b"+PONG" in s.recv(256))
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL: no shutdown save; what survives is what the append-only file holds."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        self.kill()


@pytest.fixture
def redis_server(tmp_path):
    """A started :class:`RedisServer` in the test's temp folder (killed at the end)."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed: apt-get install redis-server (Debian's package; .ci/run does)")
    pytest.importorskip("rq", reason="the redis extra is not installed: pip install -e '.[redis]'")
    server = RedisServer(tmp_path / "redis").start()
    try:
        yield server
    finally:
        server.stop()
