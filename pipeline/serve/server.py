"""The stand-alone server: :class:`~.app.ServeApp` through the aiohttp adapter (:mod:`.web`) on an event loop of its
own thread, optionally over TLS.

Its socket is bound (and the TLS files read) when it is made, so a port in use or a missing certificate is one line
before the models load; it starts answering with :meth:`StandaloneServer.start`. No client can hold it: connections
are bounded in all and per client (an IPv4 address, an IPv6 /64: :func:`client_group`); at either bound a new
connection takes the slot of the oldest idle one that never sent the key, else it is closed at once. A request's
headers must arrive whole within ``header_s`` of the connection's start or of the previous answer (which also
closes idle keep-alive connections), and a connection that has sent no request with the key is closed ``header_s``
after its start (at once if idle, else after its answer), however many key-less calls (``/ready``, ``/files/...``)
it makes; a body must come within ``body_s`` at ``body_rate`` or faster, a TLS handshake within
``tls_handshake_s``; the calls run on a few threads of its own; :meth:`StandaloneServer.stop` closes every
connection without waiting for any.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import socket
import ssl
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from .app import ServeApp, log
from .web import BODY_GRACE_S, BODY_RATE, BODY_S, Adapter


@dataclass(frozen=True)
class ConnLimits:
    backlog: int = 1024  # the listen queue (the kernel caps it at net.core.somaxconn)
    max_connections: int = 1024  # open connections in all (then an idle one without the key makes room)
    max_client_connections: int = 256  # open connections from one client (client_group; the same rule)
    header_s: float = 30.0  # a request's headers, whole, from the connection's start or the previous answer
    body_s: float = BODY_S  # a request's body, whole
    body_rate: float = BODY_RATE  # bytes/s a body must average after its first body_grace_s
    body_grace_s: float = BODY_GRACE_S
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


def client_group(peer: str) -> str:
    """What the per-client bound counts: an IPv4 address, or an IPv6 address's /64, the smallest network a site is
    given (RFC 6177; one host may use any address in it, RFC 8981); an IPv4-mapped IPv6 address as its IPv4."""
    try:
        ip = ipaddress.ip_address(peer.split("%")[0])
    except ValueError:
        return peer
    if ip.version == 6:
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


class Slot:
    """One open connection: its client group, when it opened, whether a request of it carried the key (see
    :class:`~.web.Adapter`'s ``on_keyed``), how many of its requests are being answered, and how to close it."""

    def __init__(self, group: str, opened: float):
        self.group, self.opened = group, opened
        self.keyed, self.busy, self.released = False, 0, False
        self.close = lambda: None

    def idle_unkeyed(self) -> bool:
        return not self.keyed and not self.busy


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
        self._open: Counter = Counter()  # open connections per client group
        self._slots: set = set()
        self._tasks: set = set()
        self._refused = self._evicted = 0

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

        def keyed(request):  # a request of this connection passed the headers' checks with the key
            slot = getattr(request.protocol, "slot", None)
            if slot is not None:
                slot.keyed = True

        adapter = Adapter(self.app, executor, body_s=self.limits.body_s, send_continue=True,
                          body_rate=self.limits.body_rate, body_grace_s=self.limits.body_grace_s, on_keyed=keyed)
        header_s = self.limits.header_s

        async def handle(request):
            """A connection is busy (never taken for another's room) until its answer is written; one without the
            key, past its time, closes after it."""
            slot = request.protocol.slot
            slot.busy += 1
            try:
                resp = await adapter(request)
                if not slot.keyed and asyncio.get_running_loop().time() >= slot.opened + header_s:
                    resp.force_close()
                try:
                    await resp.prepare(request)
                    await resp.write_eof()
                except ConnectionError:  # the client left: aiohttp's own writing of it says so again
                    pass
                return resp
            finally:
                slot.busy -= 1

        # keepalive_timeout runs from a connection's start and from each answer until a request's headers are
        # whole: the header deadline (and the idle limit); lingering_time bounds the discarding of an unread body
        # (older aiohttp starts that timer only after a first answer: Connection's own timer covers the first one)
        kwargs = dict(keepalive_timeout=header_s, lingering_time=2.0, logger=HTTP_LOG, access_log=None)
        self._web = web.Server(handle, handler_cancellation=True, **kwargs)
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

    def _room(self, group: str) -> bool:
        """Whether a new connection from ``group`` may open: under both bounds, or once the oldest idle connection
        without the key (of that group, or of any at the overall bound) is closed to make room."""
        for full, mine in ((self._open[group] >= self.limits.max_client_connections, True),
                           (sum(self._open.values()) >= self.limits.max_connections, False)):
            if not full:
                continue
            idle = [s for s in self._slots if s.idle_unkeyed() and (not mine or s.group == group)]
            if not idle:
                return False
            victim = min(idle, key=lambda s: s.opened)
            self._release(victim)
            victim.close()
            self._evicted += 1
            if self._evicted in (1, 10, 100) or self._evicted % 1000 == 0:
                log.warning("serve: %d idle connection(s) that never sent the key closed to make room (at %d open in "
                            "all or %d from one client; last from %s)", self._evicted, self.limits.max_connections,
                            self.limits.max_client_connections, victim.group)
        return True

    def _release(self, slot: Slot) -> None:
        if slot.released:
            return
        slot.released = True
        self._slots.discard(slot)
        self._open[slot.group] -= 1
        if self._open[slot.group] <= 0:
            del self._open[slot.group]

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
            group = client_group(addr[0])
            if not self._room(group):
                conn.close()
                self._refused += 1
                if self._refused in (1, 10, 100) or self._refused % 1000 == 0:
                    log.warning("serve: %d connection(s) closed at once: over %d open in all or %d from one client, "
                                "none of them idle without the key (last from %s)", self._refused,
                                self.limits.max_connections, self.limits.max_client_connections, group)
                continue
            slot = Slot(group, loop.time())
            self._slots.add(slot)
            self._open[group] += 1
            task = asyncio.ensure_future(self._connect(conn, slot))
            slot.close = task.cancel  # until the HTTP connection is made (a TLS handshake may be under way)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            task.add_done_callback(lambda t, conn=conn: conn.close() if t.cancelled() else None)  # even unstarted

    async def _connect(self, conn: socket.socket, slot: Slot) -> None:
        from aiohttp import web

        release = self._release
        server, kwargs, header_s = self._web, self._kwargs, self.limits.header_s

        class Connection(web.RequestHandler):
            due = None

            def connection_made(self, transport):
                super().connection_made(transport)
                self.slot = slot
                slot.close = self.force_close
                self.due = asyncio.get_running_loop().call_at(slot.opened + header_s, self.unkeyed_due)

            def unkeyed_due(self):  # no request with the key yet: idle, it goes now; busy, after its answer
                if slot.idle_unkeyed():
                    self.force_close()

            def connection_lost(self, exc):
                try:
                    if self.due is not None:
                        self.due.cancel()
                    super().connection_lost(exc)
                finally:
                    release(slot)

        loop = asyncio.get_running_loop()
        extra = {"ssl": self.ssl, "ssl_handshake_timeout": self.limits.tls_handshake_s} if self.ssl else {}
        try:
            await loop.connect_accepted_socket(lambda: Connection(server, loop=loop, **kwargs), sock=conn, **extra)
        except BaseException as exc:  # a failed or timed-out handshake, room made for another, or the stop
            log.debug("serve: connection from %s dropped before HTTP: %s", slot.group, exc)
            release(slot)
            conn.close()
            if isinstance(exc, asyncio.CancelledError):
                raise
