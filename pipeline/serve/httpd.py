"""The stand-alone server (stdlib HTTP, optional TLS) and ``serve`` on the command line.

``python -m sdxl_controlnet_img2img serve --checkpoint ... --controlnet ... --port 8443 --tls-cert C --tls-key K``
answers fal's queue protocol for ``fal-ai/fast-sdxl-controlnet-canny/image-to-image`` with one worker per
``--device``. The key comes from ``SDXLCN_SERVE_KEY`` or ``--key-file``; without one the server listens on 127.0.0.1
only (and says so).
"""

from __future__ import annotations

import ipaddress
import os
import signal
import ssl
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from .app import HttpRequest, ServeApp, log
from .inputs import Limits

KEY_ENV = "SDXLCN_SERVE_KEY"


IDLE_S = 120  # a connection silent this long (mid-request, or idle between keep-alive requests) is closed


class StandaloneServer:
    """:class:`ServeApp` on a ``ThreadingHTTPServer``; ``port=0`` picks a free port (see :attr:`port`).

    No client can hold the server: the TLS handshake runs on the connection's own thread (the thread that accepts
    connections never waits on a client), a connection silent for ``IDLE_S`` is closed, and :meth:`stop` does not
    wait for open connections (their threads are daemons)."""

    def __init__(self, app: ServeApp, host: str = "127.0.0.1", port: int = 0, tls_cert=None, tls_key=None):
        self.app = app
        self.tls = tls_cert is not None
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            timeout = IDLE_S

            def handle(self):
                if server.tls:
                    try:
                        self.connection.do_handshake()
                    except (OSError, ValueError) as exc:  # not TLS, a bad hello, or silent past IDLE_S
                        log.debug("serve: TLS handshake with %s failed: %s", self.client_address[0], exc)
                        return
                super().handle()

            def log_message(self, fmt, *args):  # the path may carry a webhook URL: keep the access log short
                path = getattr(self, "path", "")  # unset when the request line never came
                log.debug("serve: %s %s", getattr(self, "command", "-"), path.split("?", 1)[0][:200])

            def do_GET(self):
                server._handle(self)

            do_POST = do_PUT = do_OPTIONS = do_DELETE = do_GET

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self.httpd.block_on_close = False  # stop() must not wait for a client to close its connection
        if self.tls:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(str(tls_cert), str(tls_key))
            # handshakes in Handler.handle, on each connection's thread: accept() must never wait on a client
            self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True, do_handshake_on_connect=False)
        self.host = host
        self.port = self.httpd.server_address[1]
        self.thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = self.host if ":" not in self.host else f"[{self.host}]"
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}"

    def start(self) -> "StandaloneServer":
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.2},
                                       name="sdxlcn-serve-http", daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        try:
            length = int(h.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        path, _, query = h.path.partition("?")
        headers = {k.lower(): v for k, v in h.headers.items()}
        base = f"{'https' if self.tls else 'http'}://{h.headers.get('Host') or f'{self.host}:{self.port}'}"
        if length < 0 or length > self.app.limits.max_body_bytes:
            h.close_connection = True  # the body is not read: the connection cannot be reused
            resp = self.app.too_large(max(length, 0))
        else:
            body = h.rfile.read(length) if length else b""
            resp = self.app.handle(HttpRequest(h.command, path, query, headers, body, base))
        try:
            h.send_response(resp.status)
            h.send_header("Content-Type", resp.content_type)
            h.send_header("Content-Length", str(len(resp.body)))
            for k, v in resp.headers.items():
                h.send_header(k, v)
            h.end_headers()
            if h.command != "HEAD":
                h.wfile.write(resp.body)
        except (BrokenPipeError, ConnectionResetError):
            pass


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_key(key_file) -> str | None:
    """The server's key: ``SDXLCN_SERVE_KEY``, else the first line of ``key_file``; None when neither is set."""
    value = os.environ.get(KEY_ENV, "").strip()
    if value:
        return value
    if key_file:
        from ..errors import SDXLCNError

        try:
            lines = [ln.strip() for ln in Path(key_file).read_text(encoding="utf-8-sig").splitlines()]
        except OSError as exc:
            raise SDXLCNError(f"--key-file: {key_file} cannot be read ({type(exc).__name__}); it must be a text file "
                              "with the key on its first line") from None
        lines = [ln for ln in lines if ln and not ln.startswith("#")]
        if not lines:
            raise SDXLCNError(f"--key-file: {key_file} holds no key; put the key on its first line")
        return lines[0]
    return None


def add_serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve fal's queue API for fal-ai/fast-sdxl-controlnet-canny/image-to-image on "
                                     "this machine's GPU(s) (fal's own clients work against it)")
    p.add_argument("--checkpoint", required=True, help="SDXL base model: a .safetensors file or a diffusers folder")
    p.add_argument("--controlnet", required=True, help="SDXL Canny ControlNet: a diffusers folder or its file")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1; any other needs a key: SDXLCN_SERVE_KEY or --key-file)")
    p.add_argument("--port", type=int, default=8443, help="port (default 8443)")
    p.add_argument("--key-file", default=None,
                   help=f"file whose first line is the key clients must send (Authorization: Key ...); or set {KEY_ENV}")
    p.add_argument("--tls-cert", default=None, help="TLS certificate (PEM); fal's Python client speaks HTTPS only")
    p.add_argument("--tls-key", default=None, help="TLS private key (PEM) of --tls-cert")
    p.add_argument("--data-dir", default="sdxlcn-serve",
                   help="folder for the queue (queue.sqlite3) and results; kept across restarts (default ./sdxlcn-serve)")
    p.add_argument("--device", action="append", default=[],
                   help="a device to run on (repeatable: one worker each, e.g. --device cuda:0 --device cuda:1; "
                        "default: the best available)")
    p.add_argument("--dtype", choices=["auto", "fp32", "fp16", "bf16"], default="auto", help="weights precision")
    p.add_argument("--memory-mode", default="auto", help="as for generate (auto, none, model_cpu_offload, ...)")
    p.add_argument("--max-queue", type=int, default=100, help="waiting requests before new ones get HTTP 429 (100)")
    p.add_argument("--max-body-mb", type=float, default=64.0, help="largest request body in MiB (64)")
    p.add_argument("--max-image-mb", type=float, default=32.0, help="largest input image, decoded or downloaded (32)")
    p.add_argument("--public-url", default=None,
                   help="base URL clients reach this server at, for the URLs it answers (behind a load balancer: "
                        "this server's own address); default: from each request's Host header")
    p.set_defaults(func=cmd_serve)


def build_app(store, backend, args, key) -> ServeApp:
    limits = Limits(max_body_bytes=int(args.max_body_mb * 1024 * 1024),
                    max_image_bytes=int(args.max_image_mb * 1024 * 1024), max_waiting=args.max_queue)
    return ServeApp(store, backend, key=key, limits=limits, public_url=args.public_url)


def cmd_serve(args) -> int:
    from ..errors import SDXLCNError

    key = read_key(args.key_file)
    if key is None and not is_loopback(args.host):
        raise SDXLCNError(f"--host {args.host}: refusing to listen beyond this machine without a key; set "
                          f"{KEY_ENV} (or --key-file FILE) to a secret clients send as 'Authorization: Key ...', or "
                          "leave --host at 127.0.0.1")
    if (args.tls_cert is None) != (args.tls_key is None):
        raise SDXLCNError("--tls-cert and --tls-key go together: give both (PEM files) or neither")
    from ..local.loading import LoadOptions, build_pipeline, check_sources
    from .store import Store
    from .webhook import Webhooks
    from .worker import LocalWorkers

    devices = args.device or [None]
    opts = [LoadOptions(device=d, dtype=args.dtype, memory_mode=args.memory_mode).resolved() for d in devices]
    check_sources(args.checkpoint, args.controlnet, opts[0])
    pipes = {}
    for o in opts:
        print(f"loading the models on {o.device} ...", file=sys.stderr, flush=True)
        pipes[o.device] = build_pipeline(args.checkpoint, args.controlnet, o)
    store = Store(args.data_dir)
    again = store.requeue_interrupted()
    if again:
        print(f"{len(again)} request(s) that were running at the last stop are queued again", file=sys.stderr)
    workers = LocalWorkers(store, pipes)
    app = build_app(store, workers, args, key)
    hooks = Webhooks(store, app.payload_for).start()
    server = StandaloneServer(app, args.host, args.port, args.tls_cert, args.tls_key)
    workers.start()
    server.start()
    if key is None:
        print(f"no key set ({KEY_ENV} or --key-file): listening on {args.host} only; any program on this machine "
              "may use it", file=sys.stderr)
    print(f"serving {len(pipes)} worker(s) at {server.url} (fal's queue API for fal-ai/fast-sdxl-controlnet-canny/"
          f"image-to-image); data in {Path(args.data_dir).resolve()}", file=sys.stderr, flush=True)
    print(f"READY {server.url}", flush=True)
    if threading.current_thread() is threading.main_thread():  # SIGTERM (systemd, docker stop) stops as Ctrl-C does
        signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        while server.thread.is_alive():  # a timed wait: the kernel may hand SIGINT to another thread, and Python
            server.thread.join(0.5)      # raises KeyboardInterrupt only when the main thread next runs
    except KeyboardInterrupt:
        print("stopping: running requests are queued again at the next start", file=sys.stderr, flush=True)
    finally:
        server.stop()
        workers.stop()
        hooks.stop()
        store.close()
    return 0
