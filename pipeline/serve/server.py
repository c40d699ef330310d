"""The stand-alone server: :class:`~.app.ServeApp` through the aiohttp adapter (:mod:`.web`) on an event loop of its
own thread, optionally over TLS.

Its socket is bound (and the TLS files read) when it is made, so a port in use or a missing certificate is one line
before the models load; it starts answering with :meth:`StandaloneServer.start`. No client can hold it: connections
are bounded in all and per client address (more are closed at once), a request's headers must arrive whole within
``header_s`` of the connection's start or of the previous answer (which also closes idle keep-alive connections),
its body within ``body_s``, a TLS handshake within ``tls_handshake_s``; the calls run on a few threads of its own;
:meth:`StandaloneServer.stop` closes every connection without waiting for any.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import ssl
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from .app import ServeApp, log
from .web import BODY_S, Adapter


@dataclass(frozen=True)
class ConnLimits:
    backlog: int = 1024  # the listen queue (the kernel caps it at net.core.somaxconn)
    max_connections: int = 1024  # open connections in all; more are closed as soon as accepted
    max_client_connections: int = 256  # open connections from one address
    header_s: float = 30.0  # a request's headers, whole, from the connection's start or the previous answer
    body_s: float = BODY_S  # a request's body, whole
    tls_handshake_s: float = 15.0
    threads: int = 8  # the calls (store, checks, image downloads) run on these


class _QuietParseErrors(logging.Filter):
    """aiohttp logs each malformed request (answered 400) with a traceback: one debug line instead."""

    def filter(self, record):
        if record.getMessage().startswith("Error handling request"):
            log.debug("serve: %s", record.getMessage())
            return False
        return True


HTTP_LOG = logging.getLogger("sdxl_controlnet_img2img.serve.http")
HTTP_LOG.addFilter(_QuietParseErrors())


def tls_context(cert, key) -> ssl.SSLContext | None:
    """The server's TLS context; ``SDXLCNError`` naming the option and file when one cannot be used."""
    from ..errors import SDXLCNError

    if cert is None:
        return None
    for option, path in (("--tls-cert", cert), ("--tls-key", key)):
        if not Path(path).is_file():
            raise SDXLCNError(f"{option} {path}: no such file; give the PEM file's path")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.load_cert_chain(str(cert), str(key))
    except (ssl.SSLError, OSError) as exc:
        raise SDXLCNError(f"--tls-cert {cert} / --tls-key {key}: not a PEM certificate and its private key "
                          f"({getattr(exc, 'reason', None) or exc})") from None
    return ctx


def listen(host: str, port: int, backlog: int) -> socket.socket:
    """A listening socket on ``host``:``port`` (IPv4 or IPv6); ``SDXLCNError`` naming the option otherwise."""
    from ..errors import SDXLCNError

    try:
        family, kind, proto, _name, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                              flags=socket.AI_PASSIVE)[0]
    except (socket.gaierror, UnicodeError) as exc:
        raise SDXLCNError(f"--host {host}: not an address of this machine ({exc}); give an IP address such as "
                          "127.0.0.1, ::1 or 0.0.0.0") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise SDXLCNError(f"--port {port}: {host} port {port} is already in use (another server, or serve already "
                              "running?); stop it or choose another --port") from None
        if exc.errno == errno.EADDRNOTAVAIL:
            raise SDXLCNError(f"--host {host}: not an address of this machine; give one of its addresses, 127.0.0.1 "
                              "or 0.0.0.0") from None
        if exc.errno == errno.EACCES:
            raise SDXLCNError(f"--port {port}: not allowed to listen there (ports below 1024 need privileges); "
                              "choose a port above 1024") from None
        raise SDXLCNError(f"--host {host} --port {port}: cannot listen there ({exc.strerror})") from None
    sock.setblocking(False)
    return sock


class StandaloneServer:
    """``app`` may be set after construction, before :meth:`start`; ``port=0`` picks a free port (:attr:`port`)."""

    def __init__(self, app: ServeApp | None = None, host: str = "127.0.0.1", port: int = 0, tls_cert=None,
                 tls_key=None, limits: ConnLimits | None = None):
        self.app = app
        self.limits = limits or ConnLimits()
        self.ssl = tls_context(tls_cert, tls_key)
        self.tls = self.ssl is not None
        self.sock = listen(host, port, self.limits.backlog)
        self.host = host
        self.port = self.sock.getsockname()[1]
        self.thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._open: Counter = Counter()  # open connections per client address
        self._tasks: set = set()
        self._refused = 0

    @property
    def url(self) -> str:
        host = self.host if ":" not in self.host else f"[{self.host}]"
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}"

    def start(self) -> "StandaloneServer":
        assert self.app is not None, "set the server's app before starting it"
        ready = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(ready,), name="sdxlcn-serve-http", daemon=True)
        self.thread.start()
        ready.wait(30)
        return self

    def stop(self) -> None:
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(stop.set)
            except RuntimeError:  # the loop closed meanwhile
                pass
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join(10)
        self.sock.close()

    # ---- the loop's thread ----------------------------------------------------------------------
    def _run(self, ready: threading.Event) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        executor = ThreadPoolExecutor(self.limits.threads, thread_name_prefix="sdxlcn-serve-call")
        try:
            loop.run_until_complete(self._serve(executor, ready))
        finally:
            ready.set()
            executor.shutdown(wait=False, cancel_futures=True)
            loop.close()

    async def _serve(self, executor, ready: threading.Event) -> None:
        from aiohttp import web

        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        adapter = Adapter(self.app, executor, body_s=self.limits.body_s, send_continue=True)
        # keepalive_timeout runs from a connection's start and from each answer until a request's headers are
        # whole: the header deadline (and the idle limit); lingering_time bounds the discarding of an unread body
        # (older aiohttp starts that timer only after a first answer: Connection below covers the first request)
        kwargs = dict(keepalive_timeout=self.limits.header_s, lingering_time=2.0, logger=HTTP_LOG, access_log=None)
        self._web = web.Server(adapter, handler_cancellation=True, **kwargs)
        made = self._web.request_factory

        def request_factory(message, payload, protocol, writer, task):  # a request's headers are whole
            protocol.requests = getattr(protocol, "requests", 0) + 1
            return made(message, payload, protocol, writer, task)

        self._web.request_factory = request_factory
        self._kwargs = kwargs
        accept = asyncio.ensure_future(self._accept())
        ready.set()
        try:
            await self._stop.wait()
        finally:
            accept.cancel()
            self.sock.close()  # new connections are refused from here
            for handler in self._web.connections:
                handler.force_close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, addr = await loop.sock_accept(self.sock)
            except (OSError, ValueError) as exc:  # out of file descriptors, or the socket closed at stop
                if self.sock.fileno() < 0:
                    return
                log.warning("serve: accepting a connection failed: %s", exc)
                await asyncio.sleep(0.1)
                continue
            peer = addr[0]
            if sum(self._open.values()) >= self.limits.max_connections or \
                    self._open[peer] >= self.limits.max_client_connections:
                conn.close()
                self._refused += 1
                if self._refused in (1, 10, 100) or self._refused % 1000 == 0:
                    log.warning("serve: %d connection(s) closed at once: over %d open in all or %d from one address "
                                "(last from %s)", self._refused, self.limits.max_connections,
                                self.limits.max_client_connections, peer)
                continue
            self._open[peer] += 1
            task = asyncio.ensure_future(self._connect(conn, peer))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _connect(self, conn: socket.socket, peer: str) -> None:
        from aiohttp import web

        released = []

        def release():
            if not released:
                released.append(True)
                self._open[peer] -= 1
                if self._open[peer] <= 0:
                    del self._open[peer]

        server, kwargs, header_s = self._web, self._kwargs, self.limits.header_s

        class Connection(web.RequestHandler):
            requests = 0
            first_due = None

            def connection_made(self, transport):
                super().connection_made(transport)
                self.first_due = asyncio.get_running_loop().call_later(header_s, self.first_headers_due)

            def first_headers_due(self):
                if not self.requests:
                    self.force_close()

            def connection_lost(self, exc):
                try:
                    if self.first_due is not None:
                        self.first_due.cancel()
                    super().connection_lost(exc)
                finally:
                    release()

        loop = asyncio.get_running_loop()
        extra = {"ssl": self.ssl, "ssl_handshake_timeout": self.limits.tls_handshake_s} if self.ssl else {}
        try:
            await loop.connect_accepted_socket(lambda: Connection(server, loop=loop, **kwargs), sock=conn, **extra)
        except BaseException as exc:  # a failed or timed-out handshake (or the stop)
            log.debug("serve: connection from %s dropped before HTTP: %s", peer, exc)
            release()
            conn.close()
            if isinstance(exc, asyncio.CancelledError):
                raise
