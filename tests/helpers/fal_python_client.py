"""fal's own Python client (``fal_client``) driven step by step from a test, against a server of fal's queue protocol.

fal_client reads its hosts when imported and speaks https only, so it runs in a child process whose
``FAL_QUEUE_RUN_HOST`` is the server's base (``127.0.0.1:PORT/sdxlcn/fal`` behind a local TLS terminator) and whose
``SSL_CERT_FILE`` trusts that terminator's certificate; the test sends it one call at a time and reads what the
client returned or raised.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from test_serve import APP

CHILD = r"""
import json, sys
import fal_client
from fal_client.client import FalClientHTTPError

APP = sys.argv[1]
for line in sys.stdin:
    cmd = json.loads(line)
    try:
        if cmd["op"] == "submit":
            out = {"request_id": fal_client.submit(APP, cmd["arguments"], **cmd.get("options", {})).request_id}
        elif cmd["op"] == "status":
            s = fal_client.status(APP, cmd["request_id"], with_logs=True)
            out = {"kind": type(s).__name__, "position": getattr(s, "position", None),
                   "error": getattr(s, "error", None),
                   "error_type": getattr(s, "error_type", None),
                   "logs": [entry["message"] for entry in (getattr(s, "logs", None) or [])]}
        elif cmd["op"] == "cancel":
            fal_client.cancel(APP, cmd["request_id"])
            out = {"cancelled": True}
        else:
            out = {"result": fal_client.result(APP, cmd["request_id"])}
    except FalClientHTTPError as exc:
        out = {"http_error": exc.status_code, "message": exc.message,
               "request_id_header": exc.response_headers.get("x-fal-request-id")}
    print("OUT " + json.dumps(out), flush=True)
"""


class FalPythonClient:
    """``fal_client`` in a child process: ``submit``, ``status``, ``cancel``, ``result`` return what it gave, or
    ``{"http_error": status, "message": ..., "request_id_header": ...}`` for the FalClientHTTPError it raised."""

    def __init__(self, host: str, cert, key: str):
        env = {**os.environ, "FAL_QUEUE_RUN_HOST": host, "FAL_RUN_HOST": host + "/run", "SSL_CERT_FILE": str(cert),
               "FAL_KEY": key}
        self.proc = subprocess.Popen([sys.executable, "-c", CHILD, APP], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env)

    def _call(self, **cmd) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise AssertionError(f"the fal_client process ended (exit {self.proc.wait(10)})")
            if line.startswith("OUT "):
                return json.loads(line[4:])

    def submit(self, arguments: dict, **options) -> dict:
        """``options``: fal_client.submit's own keyword arguments (``priority``, ``start_timeout``, ``headers``)."""
        return self._call(op="submit", arguments=arguments, options=options)

    def status(self, request_id: str) -> dict:
        return self._call(op="status", request_id=request_id)

    def cancel(self, request_id: str) -> dict:
        return self._call(op="cancel", request_id=request_id)

    def result(self, request_id: str) -> dict:
        return self._call(op="result", request_id=request_id)

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
