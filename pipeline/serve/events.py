"""One log line per request state change, and the metrics that follow them: a listener of the store
(:mod:`.queue_rules`), so both servers (``serve`` and ComfyUI's route) log and count the same way.

A line names the request's id, its time in the queue, its generation time and its outcome (fal's error type); never
the key, the prompt or an image (the log is for operators, and may be shipped elsewhere)::

    serve: request 0b5c... queued (priority low, 3 waiting)
    serve: request 0b5c... started after 12.4 s in the queue
    serve: request 0b5c... completed in 8.1 s (12.4 s in the queue)
    serve: request 0b5c... failed: request_timeout (HTTP 504) after 30.0 s in the queue
"""

from __future__ import annotations

import logging
import sys

from .fal_headers import PRIORITIES

log = logging.getLogger("sdxl_controlnet_img2img.serve")
PRIORITY_NAMES = {value: name for name, value in PRIORITIES.items()}


class RequestEvents:
    """``fn(event, request_id)`` for ``store.listeners``: logs the change and feeds ``metrics``."""

    def __init__(self, store, metrics=None):
        self.store = store
        self.metrics = metrics

    def __call__(self, event: str, request_id: str) -> None:
        job = self.store.get(request_id)
        if job is None:
            return
        if self.metrics is not None:
            self.metrics.observe(event, job)
        log.info("serve: request %s %s", job.id, describe(event, job, self.store))


def describe(event: str, job, store) -> str:
    waited = job.started - job.created if job.started is not None else None
    ran = job.finished - job.started if job.started is not None and job.finished is not None else None
    queued = f"{waited:.1f} s in the queue" if waited is not None else None
    if event == "queued":
        extra = "" if not job.priority else f"priority {PRIORITY_NAMES.get(job.priority, job.priority)}, "
        return f"queued ({extra}{store.waiting()} waiting)"
    if event == "started":
        return f"started after {queued}"
    if event == "requeued":
        return "queued again (its run was interrupted)"
    if event == "completed":
        return f"completed in {ran:.1f} s ({queued})" if ran is not None else "completed"
    if event == "failed":
        if ran is not None:
            where = f"after {ran:.1f} s running ({queued})"
        else:
            where = f"after {(job.finished or job.created) - job.created:.1f} s in the queue"
        return f"failed: {job.error_type or 'error'} (HTTP {job.error_status or 500}) {where}"
    return event


def log_to_stderr() -> None:
    """``serve``'s own log (ComfyUI already shows INFO lines): the serve logger's INFO lines on stderr, once."""
    if not any(getattr(h, "_sdxlcn_serve", False) for h in log.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        handler._sdxlcn_serve = True
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
