"""Real HTTP servers on this machine for the tests to talk to (image hosts, webhook receivers, pages), each in a thread
of its own, and whether this machine can bind IPv6 loopback. One home for the start/stop code the tests repeated."""

from __future__ import annotations

import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Quiet(BaseHTTPRequestHandler):
    """A request handler that writes no access log (the tests' output stays readable)."""

    def log_message(self, *args):
        pass


class Loopback:
    """``handler`` (a ``BaseHTTPRequestHandler`` class) served on ``host``:``port`` (0: a free one) by
    ``server_class`` in a daemon thread; ``url`` is its root (``http://127.0.0.1:PORT``, IPv6 hosts bracketed).
    ``close`` (or leaving a ``with`` block) stops it and frees the port."""

    def __init__(self, handler, host: str = "127.0.0.1", port: int = 0, server_class=ThreadingHTTPServer):
        if ":" in host and server_class.address_family != socket.AF_INET6:
            server_class = type(f"{server_class.__name__}6", (server_class,), {"address_family": socket.AF_INET6})
        self.httpd = server_class((host, port), handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.url = f"http://{f'[{host}]' if ':' in host else host}:{self.port}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class WebhookReceiver(Loopback):
    """A webhook receiver on 127.0.0.1: answers every POST 200 and keeps ``(lower-case headers, raw body, time.time()
    on arrival)`` in ``received``; ``got`` is set at the first delivery."""

    def __init__(self):
        self.received: list[tuple[dict, bytes, float]] = []
        self.got = threading.Event()
        owner = self

        class Receiver(Quiet):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                owner.received.append(({k.lower(): v for k, v in self.headers.items()}, body, time.time()))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()
                owner.got.set()

        super().__init__(Receiver)


def ipv6_can_bind(port: int = 0) -> bool:
    """Whether this process can bind ``[::1]:port`` (IPv6 loopback present; for port 80, free and allowed)."""
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", port))
        return True
    except OSError:
        return False

