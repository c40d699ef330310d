""":class:`~.app.ServeApp` on aiohttp: the one adapter both servers run (the stand-alone :mod:`.server` and ComfyUI's
routes, ``nodes/serve_routes.py``).

aiohttp frames the requests (chunked bodies; 400 on a conflicting, duplicated or malformed ``Content-Length`` or a
line that is not HTTP). Here, per request: the headers are judged first (:meth:`ServeApp.precheck`: Host, Origin,
the key, a declared length over the limit), and only then the body is read, under a size cap and one total
deadline (408 past it); the call itself runs on the server's own small thread pool (never asyncio's default one,
which ComfyUI's static files use); a synchronous run waits here without holding a thread.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import Executor

from .app import HttpRequest, HttpResponse, ServeApp
from .protocol import HttpError

BODY_S = 300.0  # a whole request body (64 MiB at 2 Mbit/s needs ~270 s)
RUN_POLL_S = 0.25  # how often a waiting synchronous run looks at its request


class TooLarge(Exception):
    pass


async def read_body(request, limit: int, deadline_s: float) -> bytes:
    """The whole body (chunked or not), at most ``limit`` bytes (:class:`TooLarge` past it), within ``deadline_s``
    in all (``asyncio.TimeoutError`` past it)."""
    chunks, size = [], 0

    async def read():
        nonlocal size
        while True:
            chunk = await request.content.readany()
            if not chunk:
                return
            size += len(chunk)
            if size > limit:
                raise TooLarge(size)
            chunks.append(chunk)

    await asyncio.wait_for(read(), deadline_s)
    return b"".join(chunks)


class Adapter:
    """``await adapter(request)`` answers one aiohttp request. ``prefix``: the path the API is mounted under
    (``/sdxlcn/fal`` in ComfyUI, empty stand-alone). ``send_continue``: answer ``Expect: 100-continue`` once the
    headers passed (aiohttp's low-level server does not; a ``web.Application`` such as ComfyUI's already has)."""

    def __init__(self, app: ServeApp, executor: Executor, prefix: str = "", body_s: float = BODY_S,
                 send_continue: bool = False):
        self.app = app
        self.executor = executor
        self.prefix = prefix
        self.body_s = body_s
        self.send_continue = send_continue

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
            return self.response(web, early, close=request.body_exists)
        if request.body_exists:
            if self.send_continue and request.version >= (1, 1) and \
                    request.headers.get("Expect", "").lower() == "100-continue":
                await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            try:
                req.body = await read_body(request, self.app.limits.max_body_bytes, self.body_s)
            except TooLarge:
                return self.refuse(web, req, 413, [{"loc": ["body"], "msg": "the body is over this server's limit "
                                                    f"of {self.app.limits.max_body_bytes} bytes; send images as URLs",
                                                    "type": "value_error.too_large"}])
            except asyncio.TimeoutError:
                return self.refuse(web, req, 408, f"the request body did not arrive within {self.body_s:g} s")
            except Exception as exc:  # noqa: BLE001 - aiohttp's payload errors (a broken chunked body, a cut)
                return self.refuse(web, req, 400, f"the request body could not be read ({type(exc).__name__})")
        loop = asyncio.get_running_loop()
        resp = await loop.run_in_executor(self.executor, self.app.handle, req)
        while resp.wait is not None:
            await asyncio.sleep(RUN_POLL_S)
            resp = await loop.run_in_executor(self.executor, self.app.run_answer, req, resp.wait)
        return self.response(web, resp)

    def refuse(self, web, req: HttpRequest, status: int, detail):
        return self.response(web, self.app.error(req, HttpError(status, detail)), close=True)

    @staticmethod
    def response(web, resp: HttpResponse, close: bool = False):
        out = web.Response(status=resp.status, body=resp.body, content_type=resp.content_type.split(";")[0],
                           headers=resp.headers)
        if close:  # a body left unread (or half read): the connection cannot carry another request
            out.force_close()
        return out
