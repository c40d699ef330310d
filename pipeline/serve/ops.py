"""What operators and their tools call (the paths are :data:`.protocol.OPERATOR_PATHS`), answered for
:class:`~.app.ServeApp`:

- ``GET health``: 200 ``{"status": "ok"}`` while the process answers, models loaded or not (a liveness check);
- ``GET ready``: 200 ``{"ready": true}`` while a submit would be taken and run; else 503 with why: the models are
  still loading (``serve`` answers from before they load), the queue is full, the store cannot be written, every
  worker fails (a readiness check: a load balancer sends no work while it is 503);
- ``GET metrics``: :mod:`.metrics` (needs the key when the server has one: queue sizes are the operator's business);
- ``GET openapi.json``: :mod:`.openapi`; ``GET .well-known/jwks.json``: :mod:`.signing`'s public key.
"""

from __future__ import annotations

import json


class Loading:
    """The backend while ``serve`` loads its models: not ready (submits get 503), then, after :meth:`become`, every
    call goes to the real backend."""

    limits = None  # the server's limits (set by ServeApp), handed on to the real backend

    def __init__(self):
        self.backend = None

    def become(self, backend) -> None:
        if self.limits is not None and hasattr(backend, "limits"):
            backend.limits = self.limits
        self.backend = backend

    def health(self) -> str | None:
        if self.backend is None:
            return "the models are still loading"
        return getattr(self.backend, "health", lambda: None)()

    def queued(self, job) -> None:
        if self.backend is not None:
            self.backend.queued(job)

    def cancel(self, job) -> None:
        if self.backend is not None:
            self.backend.cancel(job)

    def hooks(self) -> frozenset:
        return frozenset() if self.backend is None else self.backend.hooks()

    def __getattr__(self, name):  # optional backend calls (position, ...), once there is a backend
        backend = self.__dict__.get("backend")
        if backend is None:
            raise AttributeError(name)
        return getattr(backend, name)


def unready(app) -> str | None:
    """Why a submit would not be taken now, or None."""
    why = app.unready()
    if why:
        return why
    waiting = app.store.waiting()
    if waiting >= app.limits.max_waiting:
        return f"the queue is full ({waiting} requests waiting)"
    return None


def answer(app, req, kind: str) -> tuple:
    """An operator's call's answer: (status, body, content type, headers), an :class:`~.app.HttpResponse`'s fields."""
    if kind == "health":
        return _json(200, {"status": "ok"})
    if kind == "ready":
        why = unready(app)
        if why:
            return _json(503, {"ready": False, "detail": why}, {"Retry-After": "10"})
        return _json(200, {"ready": True})
    if kind == "metrics":
        body, content_type = app.metrics.render()
        return 200, body, content_type, {"Cache-Control": "no-store"}
    if kind == "openapi":
        from .openapi import document

        return _json(200, document(app.files_base(req), app.key is not None))
    if kind == "jwks":
        return _json(200, app.signer.jwks(), {"Cache-Control": "public, max-age=3600"})
    raise ValueError(kind)


def _json(status: int, body, headers: dict | None = None) -> tuple:
    return status, json.dumps(body).encode(), "application/json", dict(headers or {})
