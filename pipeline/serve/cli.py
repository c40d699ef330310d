"""``serve`` on the command line: the stand-alone server (:mod:`.server`: aiohttp, optional TLS) with local workers.

``python -m sdxl_controlnet_img2img serve --checkpoint ... --controlnet ... --port 8443 --tls-cert C --tls-key K``
answers fal's queue protocol for the pack's endpoint (:data:`..endpoint.ENDPOINT`) with one worker per
``--device``. The key comes from ``SDXLCN_SERVE_KEY`` or ``--key-file``; without one the server listens on loopback
only (and says so). Start-up errors (the key file, the TLS files, the port, the data folder in use or unreadable)
are one line each, before the models load.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
import threading
from pathlib import Path

from ..endpoint import ENDPOINT
from ..key_policy import first_key_line
from ..local.memory.choices import DEFAULT, DTYPES, dtype_help, memory_mode_help
from .access import is_loopback, parse_origins, parse_proxies
from .app import ServeApp
from .extras import add_arguments as add_extras_arguments, from_args as extras_from_args
from .fetch import Policy
from .inputs import Limits
from .server import StandaloneServer
from .shared_queue import add_queue_options, check_queue_options, open_queue_store, queue_workers

KEY_ENV = "SDXLCN_SERVE_KEY"
MIB = 1024 * 1024
__all__ = ["StandaloneServer", "add_serve_parser", "build_app", "cmd_serve", "is_loopback", "read_key"]


def read_key(key_file) -> str | None:
    """The server's key: ``SDXLCN_SERVE_KEY``, else the first line of ``key_file``; None when neither is set."""
    value = os.environ.get(KEY_ENV, "").strip()
    if value:
        return value
    if key_file:
        from ..errors import SDXLCNError

        try:
            key = first_key_line(key_file)
        except (OSError, UnicodeDecodeError) as exc:
            raise SDXLCNError(f"--key-file: {key_file} cannot be read ({type(exc).__name__}); it must be a text file "
                              "with the key on its first line") from None
        if not key:
            raise SDXLCNError(f"--key-file: {key_file} holds no key; put the key on its first line")
        return key
    return None



def add_serve_parser(sub) -> None:
    p = sub.add_parser("serve", help=f"serve fal's queue API for {ENDPOINT} on "
                                     "this machine's GPU(s) (fal's own clients work against it)")
    p.add_argument("--checkpoint", help="SDXL base model: a .safetensors file or a diffusers folder (required, "
                                        "except for an API node: --queue ... --workers 0)")
    p.add_argument("--controlnet", help="SDXL Canny ControlNet: a diffusers folder or its file (required, likewise)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on, IPv4 or IPv6 (default 127.0.0.1; any but loopback needs a key: "
                        "SDXLCN_SERVE_KEY or --key-file, and TLS, or the key travels in clear text)")
    p.add_argument("--port", type=int, default=8443, help="port (default 8443)")
    p.add_argument("--key-file", default=None,
                   help=f"file whose first line is the key clients must send (Authorization: Key ...); or set {KEY_ENV}")
    p.add_argument("--tls-cert", default=None, help="TLS certificate (PEM); fal's Python client speaks HTTPS only")
    p.add_argument("--tls-key", default=None, help="TLS private key (PEM) of --tls-cert")
    p.add_argument("--data-dir", default="sdxlcn-serve",
                   help="folder for the queue (queue.sqlite3) and results; kept across restarts, one server per "
                        "folder (default ./sdxlcn-serve)")
    p.add_argument("--device", action="append", default=[],
                   help="a device to run on (repeatable: one worker each, e.g. --device cuda:0 --device cuda:1; "
                        "default: the best available)")
    p.add_argument("--dtype", choices=list(DTYPES), default=DEFAULT, help=dtype_help())
    p.add_argument("--memory-mode", default=DEFAULT, help=memory_mode_help())
    limits = {f.name: f.default for f in dataclasses.fields(Limits)}  # the server's own defaults (no env read)
    waiting, body_mb, image_mb = limits["max_waiting"], limits["max_body_bytes"] / MIB, limits["max_image_bytes"] / MIB
    p.add_argument("--max-queue", type=int, default=waiting,
                   help=f"waiting requests before new ones get HTTP 429 ({waiting})")
    p.add_argument("--max-body-mb", type=float, default=body_mb, help=f"largest request body in MiB ({body_mb:g})")
    p.add_argument("--max-image-mb", type=float, default=image_mb,
                   help=f"largest input image, decoded or downloaded ({image_mb:g})")
    p.add_argument("--public-url", default=None,
                   help="base URL clients reach this server at, for the URLs it answers (behind a load balancer or "
                        "a TLS proxy: e.g. https://gpu-3.example:443); default: the scheme of each request's "
                        "connection and its Host header")
    p.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="a web page origin allowed to call this server from a browser (repeatable, e.g. "
                        "https://app.example.com); needs a key. Default: none (no CORS headers)")
    p.add_argument("--trusted-proxy", action="append", default=[], metavar="ADDRESS",
                   help="address of a reverse proxy in front of this server whose X-Forwarded-Proto and "
                        "X-Forwarded-Host are believed for the URLs it answers (repeatable); others are ignored")
    p.add_argument("--allow-internal-urls", nargs="?", const="all", default=None, metavar="NETWORKS",
                   help="let image URLs and webhooks reach addresses inside the network (loopback, private, "
                        "link-local): all of them, or only the networks listed (e.g. 10.0.0.0/8,192.168.1.20). "
                        "Default: none, or SDXLCN_SERVE_ALLOW_INTERNAL_URLS")
    p.add_argument("--keep-results-hours", type=float, default=None,
                   help="hours a finished request's result stays fetchable before it is deleted (default 168, 7 days, "
                        "or SDXLCN_SERVE_KEEP_RESULTS_HOURS)")
    p.add_argument("--keep-uploads-hours", type=float, default=None,
                   help="hours a file uploaded with fal's storage calls (fal.storage.upload, the JS client's "
                        "auto-upload) stays fetchable and usable in requests (default 24, or "
                        "SDXLCN_SERVE_KEEP_UPLOADS_HOURS)")
    p.add_argument("--min-free-mb", type=float, default=None,
                   help="free disk space in MiB below which submits get HTTP 507 (default 256, or "
                        "SDXLCN_SERVE_MIN_FREE_MB)")
    add_extras_arguments(p)  # loras, enable_safety_checker, expand_prompt
    add_queue_options(p)  # --queue, --workers, --worker-lease (shared_queue.py)
    p.set_defaults(func=cmd_serve)


def outbound_policy(args) -> Policy:
    """``--allow-internal-urls`` (else ``SDXLCN_SERVE_ALLOW_INTERNAL_URLS``); one error line naming a bad entry."""
    if getattr(args, "allow_internal_urls", None) is None:
        return Policy.from_env()
    try:
        return Policy.parse(args.allow_internal_urls)
    except ValueError as exc:
        from ..errors import SDXLCNError

        raise SDXLCNError(f"--allow-internal-urls: {exc}") from None


def build_app(store, backend, args, key) -> ServeApp:
    limits = Limits(max_body_bytes=int(args.max_body_mb * MIB),
                    max_image_bytes=int(args.max_image_mb * MIB), max_waiting=args.max_queue,
                    outbound=outbound_policy(args))
    app = ServeApp(store, backend, key=key, limits=limits, public_url=args.public_url,
                   cors_origins=parse_origins(args.cors_origin, "--cors-origin"),
                   trusted_proxies=parse_proxies(args.trusted_proxy, "--trusted-proxy"))
    if getattr(args, "keep_uploads_hours", None) is not None:
        app.uploads.keep_s = args.keep_uploads_hours * 3600
    return app


def check_options(args, key) -> None:
    """What the options alone rule out, before anything is opened."""
    from ..errors import SDXLCNError

    if key is None and not is_loopback(args.host):
        raise SDXLCNError(f"--host {args.host}: refusing to listen beyond this machine without a key; set "
                          f"{KEY_ENV} (or --key-file FILE) to a secret clients send as 'Authorization: Key ...', or "
                          "leave --host at 127.0.0.1")
    if not 0 <= args.port <= 65535:
        raise SDXLCNError(f"--port {args.port}: not a TCP port; give one from 1 to 65535 (0: any free one)")
    if args.public_url is not None:
        check_public_url(args.public_url)
    if (args.tls_cert is None) != (args.tls_key is None):
        raise SDXLCNError("--tls-cert and --tls-key go together: give both (PEM files) or neither")
    if args.cors_origin and key is None:
        raise SDXLCNError("--cors-origin needs a key: without one no web page may call this server; set "
                          f"{KEY_ENV} or --key-file")
    if getattr(args, "keep_uploads_hours", None) is not None and not args.keep_uploads_hours > 0:
        raise SDXLCNError(f"--keep-uploads-hours {args.keep_uploads_hours:g}: give a number of hours above 0")
    parse_origins(args.cors_origin, "--cors-origin")
    parse_proxies(args.trusted_proxy, "--trusted-proxy")
    outbound_policy(args)
    extras_from_args(args)
    check_queue_options(args)


def check_public_url(url: str) -> None:
    """``--public-url``: an absolute http(s) URL with a host, no query or fragment; one error line else."""
    import urllib.parse

    from ..errors import SDXLCNError

    try:
        parts = urllib.parse.urlsplit(url.strip())
        ok = parts.scheme in ("http", "https") and bool(parts.hostname) and not parts.query and not parts.fragment
        parts.port  # noqa: B018 - raises ValueError for a port out of range
    except ValueError:
        ok = False
    if not ok:
        raise SDXLCNError(f"--public-url {url[:200]}: not a base URL; give the scheme, host and port clients reach "
                          "this server at, e.g. https://gpu-3.example:443 (a path prefix allowed, no query)")


def raise_open_files_limit(want: int = 8192) -> None:
    """Connections are file descriptors: lift the soft limit (often 1024) toward ``want`` where the hard one allows."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        target = want if hard == resource.RLIM_INFINITY else min(want, hard)
        if soft != resource.RLIM_INFINITY and soft < target:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ImportError, ValueError, OSError):
        pass


def open_store(folder, wait_s: float = 3.0, what: str = "--data-dir"):
    """The data folder's store (after its lock); a database that cannot be read (damaged: never retried), or whose
    write lock another program holds for more than ``wait_s`` seconds (an ``sqlite3`` shell in a transaction: no
    ``serve``, so the folder's lock file does not tell), is one line naming ``what`` and the file."""
    import sqlite3

    from ..errors import SDXLCNError
    from .store import Store, StoreDamaged, StoreUnavailable

    try:
        probe = sqlite3.connect(str(Path(folder) / "queue.sqlite3"), timeout=wait_s, isolation_level=None)
        try:
            probe.execute("BEGIN IMMEDIATE")  # the write lock every store write takes
            probe.execute("ROLLBACK")
        finally:
            probe.close()
        store = Store(folder)
        store.retry_s, full = wait_s, store.retry_s  # at start, a store that fails is said at once
        try:
            again = store.requeue_interrupted()
        except BaseException:
            store.close()
            raise
        store.retry_s = full
    except (sqlite3.DatabaseError, StoreUnavailable) as exc:
        cause = exc.__cause__ if isinstance(exc, StoreUnavailable) and exc.__cause__ is not None else exc
        db = Path(folder) / "queue.sqlite3"
        if not isinstance(exc, StoreDamaged) and (getattr(cause, "sqlite_errorcode", None) in (5, 6) or
                                                  "locked" in str(cause)):  # SQLITE_BUSY, SQLITE_LOCKED
            raise SDXLCNError(f"{what} {folder}: its queue database (queue.sqlite3) is locked by another program "
                              "(an sqlite3 shell or a backup holding a write transaction?); close it and start again"
                              f"{', or give serve another --data-dir' if what == '--data-dir' else ''}") from None
        raise SDXLCNError(f"{what} {folder}: its queue database {db} cannot be read ({cause}); stop anything using "
                          "it, then move queue.sqlite3 away to start with an empty queue (or put a backup in its "
                          "place)") from None
    except OSError as exc:  # e.g. a file where the store makes its requests folder
        raise SDXLCNError(f"{what} {folder}: {exc.filename or folder} cannot be used ({exc.strerror or exc}); "
                          "give a folder this user may write, holding only this server's files") from None
    if again:
        print(f"{len(again)} request(s) that were running at the last stop are queued again", file=sys.stderr)
    return store


def cmd_serve(args) -> int:
    key = read_key(args.key_file)
    check_options(args, key)
    from .datalock import lock_folder

    lock = lock_folder(args.data_dir)  # held until the process ends
    store = open_queue_store(args) if args.queue else open_store(args.data_dir)
    if args.keep_results_hours is not None:
        store.keep_results_s = args.keep_results_hours * 3600
    if args.min_free_mb is not None:
        store.min_free_bytes = int(args.min_free_mb * 2**20)
    raise_open_files_limit()
    try:
        server = StandaloneServer(None, args.host, args.port, args.tls_cert, args.tls_key)
    except BaseException:
        store.close()
        raise
    if key is not None and not args.tls_cert and not is_loopback(args.host):
        print(f"warning: --host {args.host} without --tls-cert/--tls-key: the key (and every image) travels in "
              "clear text to this server; use TLS, or a TLS proxy in front with --public-url https://...",
              file=sys.stderr, flush=True)
    try:
        return serve_loaded(args, key, store, server)
    finally:
        lock.close()


def serve_loaded(args, key, store, server) -> int:
    from ..local.models.loading import LoadOptions, build_pipeline, check_sources
    from .events import log_to_stderr
    from .ops import Loading
    from .webhook import Webhooks
    from .worker import LocalWorkers

    log_to_stderr()  # one line per request state change (events.py)
    try:
        loading = Loading()  # /health answers and /ready (and a submit) says 503 while the models load
        server.app = build_app(store, loading, args, key)
        server.start()
        devices = (args.device or [None]) if args.workers != 0 else []  # --workers 0: an API node loads nothing
        opts = [LoadOptions(device=d, dtype=args.dtype, memory_mode=args.memory_mode).resolved() for d in devices]
        if opts:
            check_sources(args.checkpoint, args.controlnet, opts[0])
        pipes = {}
        for o in opts:
            print(f"loading the models on {o.device} ...", file=sys.stderr, flush=True)
            pipes[o.device] = build_pipeline(args.checkpoint, args.controlnet, o)
    except BaseException:
        server.stop()
        store.close()
        raise
    workers = (queue_workers(store, pipes, args, extras=extras_from_args(args)) if args.queue else
               LocalWorkers(store, pipes, extras=extras_from_args(args)))
    loading.become(workers)
    hooks = Webhooks(store, server.app.payload_for, server.app.limits.outbound, signer=server.app.signer).start()
    workers.start()
    if key is None:
        print(f"no key set ({KEY_ENV} or --key-file): listening on {args.host} only; any program on this machine "
              "may use it", file=sys.stderr)
    print(f"optional fields: {workers.extras.summary()}", file=sys.stderr)
    print(f"serving {len(pipes)} worker(s) at {server.url} (fal's queue API for {ENDPOINT}); data in "
          f"{Path(args.data_dir).resolve()}", file=sys.stderr, flush=True)
    if threading.current_thread() is threading.main_thread():  # SIGTERM (systemd, docker stop) stops as Ctrl-C does
        signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        print(f"READY {server.url}", flush=True)  # inside the try: a stop signal may come right after it
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
