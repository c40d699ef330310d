""":class:`~.app.ServeApp` on aiohttp: the one adapter both servers run (the stand-alone :mod:`.server` and ComfyUI's
routes, ``nodes/serve_routes.py``).

aiohttp frames the requests (chunked bodies; 400 on a conflicting, duplicated or malformed ``Content-Length`` or a
line that is not HTTP). Here, per request: the headers are judged first (:meth:`ServeApp.precheck`: Host, Origin,
the key, a declared length over the limit), and only then the body is read, and only for a POST
(:data:`BODY_METHODS`) or an upload's PUT: any other call declaring one is 413. A refused request's answer is sent
with the connection's end, its body unread. A body is read under a size cap, one total deadline and a minimum rate
(408 past either); the call itself runs on the server's own small thread pool (never asyncio's default one, which
ComfyUI's static files use); a synchronous run waits here without holding a thread.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import Executor

from .app import HttpRequest, HttpResponse, ServeApp, check_key
from .protocol import HttpError

BODY_S = 300.0  # a whole request body (64 MiB at 2 Mbit/s needs ~270 s)
BODY_RATE = 64 * 1024  # bytes/s a body must average after its first BODY_GRACE_S (a 1 MB body: 10 s + 16 s)
BODY_GRACE_S = 10.0
# the calls that take a body are POSTs (submit, run, fal's storage initiate) and a live upload's PUT (Uploads.upload_put):
# of the calls ServeApp.precheck lets through, every other one (status, result, cancel, files, the operator's GETs,
# OPTIONS) takes none, so a body there is never read
BODY_METHODS = ("POST",)
RUN_POLL_S = 0.25  # how often a waiting synchronous run looks at its request


class TooLarge(Exception):
    pass


async def read_body(request, limit: int, deadline_s: float, rate: float = BODY_RATE,
                    grace_s: float = BODY_GRACE_S) -> bytes:
    """The whole body (chunked or not), at most ``limit`` bytes (:class:`TooLarge` past it), within ``deadline_s``
    in all and at ``rate`` bytes/s or faster after its first ``grace_s`` (``asyncio.TimeoutError`` past either: a
    declared length gets at most ``grace_s + length / rate``, and a trickle is cut as soon as it falls behind)."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    chunks, size = [], 0
    while True:
        due = min(start + deadline_s, start + grace_s + size / rate)
        chunk = await asyncio.wait_for(request.content.readany(), max(0.0, due - loop.time()))
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > limit:
            raise TooLarge(size)
        chunks.append(chunk)


class Adapter:
    """``await adapter(request)`` answers one aiohttp request. ``prefix``: the path the API is mounted under
    (``/sdxlcn/fal`` in ComfyUI, empty stand-alone). ``send_continue``: answer ``Expect: 100-continue`` once the
    headers passed (aiohttp's low-level server does not; a ``web.Application`` such as ComfyUI's already has).
    ``on_keyed(request)``: called for each request that passed the headers' checks with the server's key (every
    such request of a server without one), before its body is read (the stand-alone server trusts its connection)."""

    def __init__(self, app: ServeApp, executor: Executor, prefix: str = "", body_s: float = BODY_S,
                 send_continue: bool = False, body_rate: float = BODY_RATE, body_grace_s: float = BODY_GRACE_S,
                 on_keyed=None):
        self.app = app
        self.executor = executor
        self.prefix = prefix
        self.body_s = body_s
        self.body_rate = body_rate
        self.body_grace_s = body_grace_s
        self.send_continue = send_continue
        self.on_keyed = on_keyed

    def request_of(self, request) -> HttpRequest:
        headers = {k.lower(): v for k, v in request.headers.items()}
        path, _, query = request.raw_path.partition("?")
        path = path[len(self.prefix):] if path.startswith(self.prefix) else path
        scheme = request.scheme  # of the connection (aiohttp reads no X-Forwarded-Proto here)
        peer = request.remote or ""
        base = self.app.access.base(scheme, request.host, peer, headers, self.prefix)
        return HttpRequest(request.method, path or "/", query, headers, b"", base, peer=peer, scheme=scheme)

    async def __call__(self, request):
        from aiohttp import web

        req = self.request_of(request)
        early = self.app.precheck(req)
        if early is not None:  # the body (if any) is never read
            return await self.closing(request, self.response(web, early, True)) if request.body_exists \
                else self.response(web, early)
        upload = self.app.uploads.upload_put(req)
        if upload == "dead":
            return await self.refuse(request, req, 404, "this upload URL is unknown, used or past its hour: ask for "
                                                        "a new one (fal.storage.upload does)")
        declared = request.content_length
        if upload == "live" and declared is not None and declared > self.app.limits.max_image_bytes:
            too_large = self.app.uploads.too_large(declared, self.app.limits)  # the body is never read
            return await self.refuse(request, req, too_large.status, too_large.detail)
        if request.body_exists and req.method not in BODY_METHODS and upload != "live":
            return await self.refuse(request, req, 413, f"{req.method} {req.path[:80]} takes no request body: send "
                                                        "it without one (no Content-Length above 0, no "
                                                        "Transfer-Encoding)")
        if self.on_keyed is not None and self.keyed(req):
            self.on_keyed(request)
        if request.body_exists:
            if self.send_continue and request.version >= (1, 1) and \
                    request.headers.get("Expect", "").lower() == "100-continue":
                await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            limit = self.app.limits.max_body_bytes
            try:
                req.body = await read_body(request, limit, self.body_s, self.body_rate, self.body_grace_s)
            except TooLarge:
                return await self.refuse(request, req, 413, [{
                    "loc": ["body"], "msg": f"the body is over this server's limit of {limit} bytes; send images as "
                                            "URLs", "type": "value_error.too_large"}])
            except asyncio.TimeoutError:
                return await self.refuse(request, req, 408, (
                    f"the request body did not arrive in time: it must come within {self.body_s:g} s in all, at "
                    f"{self.body_rate / 1024:g} KiB/s or faster after its first {self.body_grace_s:g} s"))
            except Exception as exc:  # noqa: BLE001 - aiohttp's payload errors (a broken chunked body, a cut)
                return await self.refuse(request, req, 400, f"the request body could not be read "
                                                            f"({type(exc).__name__})")
        loop = asyncio.get_running_loop()
        resp = await loop.run_in_executor(self.executor, self.app.handle, req)
        while resp.wait is not None:
            await asyncio.sleep(RUN_POLL_S)
            resp = await loop.run_in_executor(self.executor, self.app.run_answer, req, resp.wait)
        return self.response(web, resp)

    def keyed(self, req: HttpRequest) -> bool:
        try:
            check_key(req.headers.get("authorization"), self.app.key)
        except HttpError:
            return False
        return True

    async def refuse(self, request, req: HttpRequest, status: int, detail):
        from aiohttp import web

        return await self.closing(request, self.response(web, self.app.error(req, HttpError(status, detail)), True))

    @staticmethod
    async def closing(request, out):
        """``out`` sent now, then the connection's end (half-closed where the transport can: plain TCP), so the
        client sees the answer and the close at once while the rest of a body stays unread; aiohttp discards what
        still arrives for at most its lingering time (2 s stand-alone, 10 s in ComfyUI), then closes."""
        try:
            await out.prepare(request)
            await out.write_eof()
            transport = request.transport
            if transport is not None and transport.can_write_eof():
                transport.write_eof()
        except (ConnectionError, RuntimeError):  # the client left already: aiohttp's own writing says so again
            pass
        return out

    @staticmethod
    def response(web, resp: HttpResponse, close: bool = False):
        out = web.Response(status=resp.status, body=resp.body, content_type=resp.content_type.split(";")[0],
                           headers=resp.headers)
        if close:  # a body left unread (or half read): the connection cannot carry another request
            out.force_close()
        return out
