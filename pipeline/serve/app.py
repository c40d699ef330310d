"""The HTTP handling of the queue protocol, independent of the web framework: :class:`ServeApp` takes an
:class:`HttpRequest` and gives an :class:`HttpResponse`. Both servers, the stand-alone one
(:mod:`.server`) and ComfyUI's routes (``nodes/serve_routes.py``), run it through one aiohttp adapter (:mod:`.web`),
which only carries bytes in and out: :meth:`ServeApp.precheck` decides from the request line and headers alone (the
key, Host and Origin, the declared length) before any body is read.

What runs a request is the backend's business (:class:`Backend`): this module queues it in the :class:`~.store.Store`
and answers from there, so status, result and cancel read the same whether the local workers or ComfyUI's prompt
queue run it.
"""

from __future__ import annotations

import base64
import hmac
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Protocol

from . import ops
from .access import Access
from .inputs import Limits, check_submission, check_webhook, refuse_body_size
from .events import RequestEvents
from .fal_headers import queue_options, result_headers
from .metrics import Metrics
from .protocol import (OPERATOR_PATHS, PUBLIC_ROUTES, STORAGE_ROUTES, TARGET_HEADER, HttpError, Route, request_urls,
                       route_path, route_target, status_body)
from .signing import Signer
from .disk import LowDisk
from .store import Job, QueueFull, Store, StoreUnavailable
from .uploads import Uploads

log = logging.getLogger("sdxl_controlnet_img2img.serve")
FAL_QUEUE_BASE = "https://queue.fal.run"  # the URLs a proxied client expects (it sends them through the proxy)


@dataclass
class HttpRequest:
    method: str
    path: str  # relative to the server's base
    query: str
    headers: dict  # lower-case names
    body: bytes
    base: str  # how the client reached the base: scheme://host[:port][/prefix], no trailing slash
    peer: str = ""  # the client's address (a proxy's, behind one)
    scheme: str = "http"  # of the connection itself: https over TLS


@dataclass
class HttpResponse:
    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: dict = field(default_factory=dict)
    wait: tuple | None = None  # (request id, monotonic deadline): a synchronous run still waiting (see run_answer)


class Backend(Protocol):
    def queued(self, job: Job) -> None:
        """A request was queued in the store."""

    def cancel(self, job: Job) -> None:
        """Cancel was asked for a running request (the store already has its flag)."""

    def hooks(self) -> frozenset:
        """The optional models it has: ``enable_safety_checker``, ``expand_prompt``."""

    # optional: ``refuse(args)``, raising :class:`~.protocol.HttpError` for checked arguments it cannot run (a model
    # a field needs is absent), before the request gets an id
    # optional: ``limits``, set to the server's :class:`~.inputs.Limits` (a request's image URLs are downloaded by
    # whatever runs it, :mod:`.downloads`, under them)


def check_key(header: str | None, key: str | None) -> None:
    """fal's ``Authorization: Key <key>``, compared in constant time. The key given is never echoed."""
    if key is None:
        return
    given = (header or "").strip()
    scheme, _, value = given.partition(" ")
    try:  # header bytes that are not UTF-8 arrive surrogate-escaped: they cannot be the key, and must not be a 500
        given_key = value.strip().encode("utf-8")
    except UnicodeEncodeError:
        given_key = None
    ok = scheme.lower() == "key" and given_key is not None and hmac.compare_digest(given_key, key.encode())
    if not ok:
        raise HttpError(401, "missing or wrong key: send 'Authorization: Key <the server's key>' (fal's clients: set "
                             "FAL_KEY, or credentials in fal.config, to the key the server was started with)")


def output(job: Job, store: Store, files_base: str) -> dict:
    """fal's output object for a finished request: images as URLs on this server (data URIs with sync_mode)."""
    res = job.result or {}
    images = []
    for i, entry in enumerate(res.get("images", [])):
        if job.args.get("sync_mode"):
            data = store.image_path(job.id, i).read_bytes()
            url = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
        else:
            url = f"{files_base}/files/{job.token}/{i}.png"
        images.append({"url": url, "width": entry["width"], "height": entry["height"],
                       "content_type": entry.get("content_type", "image/png")})
    doc = {"images": images, "seed": res.get("seed"), "has_nsfw_concepts": res.get("has_nsfw_concepts", []),
           "prompt": res.get("prompt", ""), "timings": res.get("timings", {})}
    if res.get("expanded_prompt") is not None:
        doc["expanded_prompt"] = res["expanded_prompt"]
    return doc


class ServeApp:
    def __init__(self, store: Store, backend: Backend, *, key: str | None = None, limits: Limits | None = None,
                 public_url: str | None = None, cors_origins=frozenset(), trusted_proxies=frozenset()):
        self.store = store
        self.backend = backend
        self.key = key
        self.limits = limits or Limits()
        if hasattr(backend, "limits"):  # a backend that downloads image URLs does it under the server's limits
            backend.limits = self.limits
        self.public_url = public_url.rstrip("/") if public_url else None
        self.access = Access(key is not None, frozenset(cors_origins), frozenset(trusted_proxies), self.public_url)
        self.signer = Signer.for_folder(store.folder)  # the webhooks' key: its public half at /.well-known/jwks.json
        self.metrics = Metrics(store)
        self.uploads = Uploads(store)  # fal's storage calls; a submit's own file URLs read from disk
        store.listeners.append(RequestEvents(store, self.metrics))  # a log line and the metrics per state change

    # ---- entry ----------------------------------------------------------------------------------
    def precheck(self, req: HttpRequest) -> HttpResponse | None:
        """The answer when the request line and headers alone refuse the call (Host, Origin, the key, a declared
        body over the limit), else None: called before any body is read."""
        try:
            self._admit(req)
        except HttpError as exc:
            return self.error(req, exc)
        return None

    def handle(self, req: HttpRequest) -> HttpResponse:
        try:
            resp = self._handle(req, self._admit(req))
        except HttpError as exc:
            return self.error(req, exc)
        except StoreUnavailable as exc:  # the store (a shared queue's Redis) does not answer: fal's clients retry 503
            resp = self.json(503, {"detail": str(exc)}, {"Retry-After": "10"})
        except Exception:  # noqa: BLE001 - a bug must not take the server down, nor leak a traceback to clients
            log.exception("serve: %s %s failed", req.method, req.path[:200])
            resp = self.json(500, {"detail": "internal server error (see the server log)"})
        return self.finish(req, resp)

    def error(self, req: HttpRequest, exc: HttpError) -> HttpResponse:
        return self.finish(req, self.json(exc.status, exc.body(), exc.headers))

    def finish(self, req: HttpRequest, resp: HttpResponse) -> HttpResponse:
        resp.headers = {**self.access.cors(req.headers), **resp.headers}
        return resp

    @staticmethod
    def json(status: int, body, headers: dict | None = None) -> HttpResponse:
        return HttpResponse(status, json.dumps(body).encode(), "application/json", dict(headers or {}))

    def _admit(self, req: HttpRequest) -> Route | None:
        """The call a request makes, once its headers allow it (None: a CORS preflight); :class:`HttpError` else."""
        refusal = self.access.refusal(req.headers, req.scheme)
        if refusal is not None:
            raise refusal
        if req.method == "OPTIONS":
            if "origin" in req.headers and self.access.allowed_origin(req.headers) is None:
                raise HttpError(403, "this origin is not allowed: the server's operator lists the web pages that may "
                                     "call it (--cors-origin, or SDXLCN_SERVE_CORS_ORIGINS in ComfyUI)")
            return None
        target = req.headers.get(TARGET_HEADER)
        route = route_target(req.method, target) if target else route_path(req.method, req.path, req.query)
        if route.kind not in PUBLIC_ROUTES:
            check_key(req.headers.get("authorization"), self.key)
        declared = req.headers.get("content-length")
        if declared is not None and declared.strip().isdigit():
            refuse_body_size(int(declared), self.limits)
        return route

    def payload_for(self, job: Job, base: str) -> dict:
        """A webhook's payload: the result, or ``{"detail": ...}`` for a failed request."""
        if job.error:
            return {"detail": job.error_detail or job.error}
        return output(job, self.store, self.public_url or base)

    def files_base(self, req: HttpRequest) -> str:
        return self.public_url or req.base

    def _handle(self, req: HttpRequest, route: Route | None) -> HttpResponse:
        if route is None:
            return HttpResponse(204)
        if route.kind == "file":
            return self._file(route)
        if route.kind in OPERATOR_PATHS.values():
            return HttpResponse(*ops.answer(self, req, route.kind))
        if route.kind in STORAGE_ROUTES:
            return HttpResponse(*self.uploads.answer(route, req.body, self.files_base(req), self.limits))
        if route.kind in ("submit", "run"):
            job = self._submit(req, route)
            if route.kind == "run":
                return self._run(req, job)
            base = FAL_QUEUE_BASE if route.via_proxy else (self.public_url or req.base)
            body = {"request_id": job.id, **request_urls(base, job.id), "queue_position": self.store.position(job)}
            if job.webhook:
                body["gateway_request_id"] = job.id
            return self.json(200, body, {"x-fal-request-id": job.id})
        self.store.expire_waiting()  # a request past its x-fal-request-timeout ends before it is shown
        job = self.store.get(route.request_id)
        if job is None:
            raise HttpError(404, f"Request {route.request_id} not found")
        ids = {"x-fal-request-id": job.id}
        if route.kind == "status":
            base = FAL_QUEUE_BASE if route.via_proxy else (self.public_url or req.base)
            with_logs = (route.query or {}).get("logs", "0").lower() in ("1", "true")
            position = self._position(job) if job.state == "IN_QUEUE" else None
            return self.json(200, status_body(job, base, position, with_logs), ids)
        if route.kind == "result":
            return self._result(req, job)
        if route.kind == "cancel":
            outcome = self.store.cancel(job.id)
            if outcome == "done":
                return self.json(400, {"status": "ALREADY_COMPLETED"}, ids)
            if outcome == "requested":
                self.backend.cancel(job)
            return self.json(202, {"status": "CANCELLATION_REQUESTED"}, ids)
        raise HttpError(404, "no such call")

    # ---- calls ----------------------------------------------------------------------------------
    def _position(self, job: Job) -> int:
        ask = getattr(self.backend, "position", None)
        pos = ask(job) if ask is not None else None
        return self.store.position(job) if pos is None else pos

    def unready(self) -> str | None:
        """Why requests cannot be taken now (the store cannot be written, or every worker fails), else None."""
        return self.store.health() or getattr(self.backend, "health", lambda: None)()

    def _submit(self, req: HttpRequest, route) -> Job:
        refuse_body_size(len(req.body), self.limits)
        why = self.unready()  # never accept a request and leave it
        if why:
            raise HttpError(503, f"this server cannot take requests now: {why}", {"Retry-After": "10"})
        args, images = check_submission(req.body, self.limits, self.backend.hooks())
        self.uploads.take_own(args, images, self.files_base(req), self.limits)  # own file URLs: their stored bytes
        refuse = getattr(self.backend, "refuse", None)  # the backend's own refusal (a model a field needs, absent)
        if refuse is not None:
            refuse(args)
        webhook = check_webhook((route.query or {}).get("fal_webhook"), self.limits.outbound)
        hook = json.dumps({"url": webhook, "base": self.files_base(req)}) if webhook else None
        try:
            job = self.store.add(args, images, hook, self.limits.max_waiting, **vars(queue_options(req.headers)))
        except QueueFull as exc:
            raise HttpError(429, str(exc), {"Retry-After": "5"}) from None
        except LowDisk as exc:
            raise HttpError(507, str(exc)) from None
        except StoreUnavailable as exc:
            raise HttpError(503, str(exc), {"Retry-After": "10"}) from None
        self.backend.queued(job)
        return job

    def _result(self, req: HttpRequest, job: Job) -> HttpResponse:
        ids = {"x-fal-request-id": job.id}
        if job.state != "COMPLETED":
            return self.json(400, {"detail": "Request is still in progress"}, ids)
        if job.error:
            return self.json(job.error_status or 500, {"detail": job.error_detail or job.error},
                             {**ids, **result_headers(job)})
        return self.json(200, output(job, self.store, self.files_base(req)), ids)

    def _run(self, req: HttpRequest, job: Job) -> HttpResponse:
        """fal's synchronous run: the adapter waits (without holding a thread) and asks :meth:`run_answer`."""
        return HttpResponse(202, wait=(job.id, time.monotonic() + self.limits.sync_wait_s))

    def run_answer(self, req: HttpRequest, wait: tuple) -> HttpResponse:
        """A synchronous run's answer once its request finished, 504 past its deadline, else a response that still
        waits (same ``wait``)."""
        request_id, deadline = wait
        self.store.expire_waiting()
        job = self.store.get(request_id)
        if job is not None and job.state == "COMPLETED":
            resp = self._result(req, job)
        elif time.monotonic() >= deadline:
            resp = self.json(504, {"detail": f"the request did not finish within {self.limits.sync_wait_s:g} s; it "
                                             f"stays queued as {request_id}: fetch it through the queue API"},
                             {"x-fal-request-id": request_id})
        else:
            return HttpResponse(202, wait=wait)
        return self.finish(req, resp)

    def _file(self, route) -> HttpResponse:
        job = self.store.by_token(route.token)
        if job is None or job.state != "COMPLETED" or not job.result or \
                route.index >= len(job.result.get("images", [])):
            raise HttpError(404, "no such result file")
        data = self.store.image_path(job.id, route.index).read_bytes()
        return HttpResponse(200, data, "image/png", {"Cache-Control": "private, max-age=86400"})
