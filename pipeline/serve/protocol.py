"""fal's queue protocol as this server lays it out: which URL is which call, ids, and fal's JSON shapes.

Paths, relative to the server's base (``https://host:port`` stand-alone, ``http://host:8188/sdxlcn/fal`` in ComfyUI):

- ``POST <app>[?fal_webhook=URL]`` submit: ``{request_id, status_url, response_url, cancel_url, queue_position}``;
- ``GET <owner>/<alias>[/image-to-image]/requests/<id>/status[?logs=1]`` status; ``GET .../requests/<id>`` result;
  ``PUT .../requests/<id>/cancel`` cancel (fal's clients leave the ``/image-to-image`` sub-path out of these);
- ``POST run/<app>`` fal's synchronous run (``fal.run``): waits and answers the result;
- ``GET files/<token>/<n>.png`` a result image (no key: the token is random, as fal's CDN URLs are);
- ``GET ready`` 200 while requests are taken and run, 503 saying why not (no key: for load balancers' checks);
  ``GET health`` 200 while the process answers (no key); ``GET metrics`` Prometheus's text format (the key, when the
  server has one); ``GET openapi.json`` the endpoint's schema and ``GET .well-known/jwks.json`` the public key its
  webhooks are signed with (no key: both are public, as fal's are). :mod:`.ops` answers these.

- ``POST storage/upload/initiate``, ``PUT storage/upload/<token>``, ``GET storage/files/<token>`` fal's storage
  (``fal.storage.upload``, the JS client's auto-upload): :mod:`.uploads` answers them (the PUT and the file need no
  key: their tokens are random).

A call through a proxy (``x-fal-target-url``, what the JS client sends with ``proxyUrl``) is routed by its target:
``queue.fal.run`` is the queue, ``fal.run`` the synchronous run, ``rest.fal.ai`` fal's storage (answered here).
Every other target is refused with 404: nothing is ever forwarded to fal.
"""

from __future__ import annotations

import re
import urllib.parse
from dataclasses import dataclass

from ..endpoint import ENDPOINT as APP, ENDPOINT_BASE as APP_BASE  # APP_BASE: fal's clients' status, result, cancel

TARGET_HEADER = "x-fal-target-url"
QUEUE_HOSTS = ("queue.fal.run",)
RUN_HOSTS = ("fal.run",)
STORAGE_HOSTS = ("rest.fal.ai", "rest.alpha.fal.ai", "v3.fal.media", "fal.media")
UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
TOKEN_RE = re.compile(r"^[0-9a-f]{32}$")
CORS_HEADERS = {  # for an origin the operator listed (see access.py); never "*"
    "Access-Control-Allow-Methods": "GET, POST, PUT, OPTIONS",
    "Access-Control-Allow-Headers": "authorization, content-type, accept, x-fal-target-url, x-fal-queue-priority, "
                                    "x-fal-request-timeout, x-fal-no-retry, x-fal-runner-hint, "
                                    "x-fal-object-lifecycle, x-fal-app-context, x-fal-store-io",
    "Access-Control-Expose-Headers": "x-fal-request-id, x-fal-request-timeout-type, x-fal-error-type",
    "Access-Control-Max-Age": "600",
}
LOG_LEVELS = ("STDERR", "STDOUT", "ERROR", "INFO", "WARN", "DEBUG")  # fal's log levels (@fal-ai/client's types)
# the operator's calls (path: kind); all GET, never through a proxy. PUBLIC_ROUTES need no key.
OPERATOR_PATHS = {"ready": "ready", "health": "health", "metrics": "metrics", "openapi.json": "openapi",
                  ".well-known/jwks.json": "jwks"}
PUBLIC_ROUTES = ("file", "ready", "health", "openapi", "jwks", "upload", "upload_file")
STORAGE_ROUTES = ("storage", "storage_multipart", "upload", "upload_file")  # :mod:`.uploads` answers these
NOT_HERE = (f"this server serves only {APP} and forwards nothing to fal; point other endpoints at fal itself")


class HttpError(Exception):
    """An answer in fal's error shape: ``{"detail": ...}`` (a list of ``{loc, msg, type}`` for 422)."""

    def __init__(self, status: int, detail, headers: dict | None = None):
        self.status = status
        self.detail = detail
        self.headers = headers or {}
        super().__init__(f"HTTP {status}: {detail}")

    def body(self) -> dict:
        return {"detail": self.detail}


def invalid(loc: list, msg: str, kind: str = "value_error") -> HttpError:
    """HTTP 422 for one field, in fal's (FastAPI's) shape: ``{"detail": [{"loc": [...], "msg": ..., "type": ...}]}``."""
    return HttpError(422, [{"loc": list(loc), "msg": msg, "type": kind}])


@dataclass(frozen=True)
class Route:
    kind: str  # submit, run, status, result, cancel, file, one of STORAGE_ROUTES or of OPERATOR_PATHS' kinds
    request_id: str | None = None
    token: str | None = None
    index: int | None = None
    query: dict | None = None
    via_proxy: bool = False


def _query(qs: str) -> dict:
    return {k: v[-1] for k, v in urllib.parse.parse_qs(qs or "", keep_blank_values=True).items()}


def route_path(method: str, path: str, query: str = "", via_proxy: bool = False) -> Route:
    """The call a path (relative to the server's base) makes; :class:`HttpError` 404/405 for anything else."""
    parts = [p for p in urllib.parse.unquote(path).split("/") if p]
    q = _query(query)
    if parts[:1] == ["files"]:
        if method != "GET" or len(parts) != 3 or not TOKEN_RE.match(parts[1]) or not re.fullmatch(r"\d{1,2}\.png",
                                                                                                   parts[2]):
            raise HttpError(404, "no such result file")
        return Route("file", token=parts[1], index=int(parts[2].split(".")[0]))
    if parts[:1] == ["storage"]:
        return storage_route(method, parts[1:], via_proxy)
    operator = OPERATOR_PATHS.get("/".join(parts))
    if operator is not None and not via_proxy:
        if method != "GET":
            raise HttpError(405, f"{method} is not allowed on {'/'.join(parts)}; use GET")
        return Route(operator)
    run = parts[:1] == ["run"]
    if run:
        parts = parts[1:]
    joined = "/".join(parts)
    if joined == APP:
        if method != "POST":
            raise HttpError(405, f"{method} is not allowed on {APP}; submit with POST")
        return Route("run" if run else "submit", query=q, via_proxy=via_proxy)
    if "requests" in parts and not run:
        at = parts.index("requests")
        app = "/".join(parts[:at])
        rest = parts[at + 1:]
        if app in (APP, APP_BASE) and 1 <= len(rest) <= 2:
            rid = rest[0].lower()
            if not UUID_RE.match(rid):
                raise HttpError(404, f"Request {rest[0][:60]!r} not found: request ids are UUIDs")
            tail = rest[1] if len(rest) == 2 else ""
            want = {"": ("GET", "result"), "status": ("GET", "status"), "cancel": ("PUT", "cancel")}.get(tail)
            if want is None:
                raise HttpError(404, f"no such call: .../requests/<id>/{tail[:40]}")
            if method != want[0]:
                raise HttpError(405, f"{method} is not allowed here; use {want[0]}")
            return Route(want[1], request_id=rid, query=q, via_proxy=via_proxy)
    raise HttpError(404, NOT_HERE)


def storage_route(method: str, rest: list, via_proxy: bool = False) -> Route:
    """fal's storage calls (``storage/<rest>``): the initiate calls of ``@fal-ai/client``'s storage.js, an upload's
    PUT, an uploaded file."""
    call = "/".join(rest)
    if call in ("upload/initiate", "upload/initiate-multipart"):
        if method != "POST":
            raise HttpError(405, f"{method} is not allowed on storage/{call}; use POST")
        return Route("storage" if call == "upload/initiate" else "storage_multipart", via_proxy=via_proxy)
    want = {"upload": "PUT", "files": "GET"}.get(rest[0] if rest else "")
    if want is None or len(rest) != 2 or not TOKEN_RE.match(rest[1]):
        raise HttpError(404, "no such storage call or file")
    if method != want:
        raise HttpError(405, f"{method} is not allowed here; use {want}")
    return Route("upload" if want == "PUT" else "upload_file", token=rest[1], via_proxy=via_proxy)


def route_target(method: str, target: str) -> Route:
    """The call a proxied request makes, from its ``x-fal-target-url``."""
    try:  # urllib raises ValueError for some malformed URLs (an unclosed '[', a bad port): not a URL either
        parts = urllib.parse.urlsplit(target.strip())
        host = (parts.hostname or "").lower()
    except ValueError:
        parts, host = None, ""
    if parts is None or parts.scheme not in ("https", "http") or not host:
        raise HttpError(404, f"{TARGET_HEADER} is not a URL; {NOT_HERE}")
    if host in STORAGE_HOSTS:
        route = route_path(method, parts.path, parts.query, via_proxy=True)
        if route.kind not in STORAGE_ROUTES:
            raise HttpError(404, NOT_HERE)
        return route
    if host in QUEUE_HOSTS:
        return route_path(method, parts.path, parts.query, via_proxy=True)
    if host in RUN_HOSTS:
        route = route_path(method, "/run" + parts.path, parts.query, via_proxy=True)
        if route.kind != "run":
            raise HttpError(404, NOT_HERE)
        return route
    raise HttpError(404, NOT_HERE)


def request_urls(base: str, request_id: str) -> dict:
    """fal's three URLs of a request, under ``base`` (no trailing slash)."""
    root = f"{base}/{APP_BASE}/requests/{request_id}"
    return {"status_url": root + "/status", "response_url": root, "cancel_url": root + "/cancel"}


def status_body(job, base: str, position: int | None, with_logs: bool) -> dict:
    """fal's status object for a job (``IN_QUEUE`` with ``queue_position``, ``IN_PROGRESS``, ``COMPLETED``)."""
    body = {"status": job.state, "request_id": job.id, **request_urls(base, job.id)}
    body["logs"] = [log_item(entry) for entry in job.logs] if with_logs else None
    if job.state == "IN_QUEUE":
        body["queue_position"] = position if position is not None else 0
    if job.state == "COMPLETED":
        if job.started and job.finished:
            body["metrics"] = {"inference_time": round(job.finished - job.started, 4)}
        if job.error:
            body["error"] = job.error
            body["error_type"] = job.error_type
    return body


def log_item(entry: dict) -> dict:
    """A stored log line as fal's clients type it: ``{message, level, source: "USER", timestamp}``, the level one of
    fal's (``STDERR``, ``STDOUT``, ``ERROR``, ``INFO``, ``WARN``, ``DEBUG``; Python's ``WARNING`` is ``WARN``)."""
    level = str(entry.get("level") or "INFO").upper()
    level = {"WARNING": "WARN", "CRITICAL": "ERROR"}.get(level, level)
    return {"message": str(entry.get("message", "")), "level": level if level in LOG_LEVELS else "INFO",
            "source": "USER", "timestamp": entry.get("timestamp")}


def webhook_body(job, payload) -> dict:
    """What fal POSTs to a webhook when a request ends."""
    ok = not job.error
    return {"request_id": job.id, "gateway_request_id": job.id, "status": "OK" if ok else "ERROR",
            "payload": payload, "error": None if ok else job.error}
