"""fal's webhooks: when a request submitted with ``?fal_webhook=URL`` ends, its outcome is POSTed to the URL.

The body is fal's: ``{request_id, gateway_request_id, status: "OK"|"ERROR", payload, error}``, the payload being the
result (or ``{"detail": ...}``). Each delivery waits at most 15 s for an answer and is tried up to 10 times with
growing pauses, as fal does; a delivery still due when the process stops is made after a restart (the store keeps
it), so receivers must be idempotent per request id, as fal asks of them.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.error
import urllib.request

from .protocol import webhook_body
from .store import Store

log = logging.getLogger("sdxl_controlnet_img2img.serve")
TIMEOUT_S = 15.0
TRIES = 10
PAUSES_S = (1, 2, 5, 10, 30, 60, 120, 300, 600)


def deliver_once(url: str, body: dict) -> bool:
    data = json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="POST", headers={"Content-Type": "application/json",
                                                                         "User-Agent": "sdxlcn-serve-webhook"})
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT_S) as resp:
            return 200 <= resp.status < 300
    except (urllib.error.URLError, OSError, ValueError) as exc:
        log.info("serve: webhook for %s failed (%s)", body.get("request_id"), type(exc).__name__)
        return False


class Webhooks:
    """A thread that delivers the webhooks of finished requests (``payload_for(job, base)`` builds the payload)."""

    def __init__(self, store: Store, payload_for):
        self.store = store
        self.payload_for = payload_for
        self.stopping = threading.Event()
        self._tries: dict[str, tuple[int, float]] = {}  # request id -> (tries made, next try at)
        self.thread = threading.Thread(target=self._loop, name="sdxlcn-serve-webhooks", daemon=True)

    def start(self) -> "Webhooks":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        with self.store.changed:
            self.store.changed.notify_all()

    def _loop(self) -> None:
        while not self.stopping.is_set():
            now = time.monotonic()
            due = [j for j in self.store.webhooks_due() if self._tries.get(j.id, (0, 0.0))[1] <= now]
            for job in due:
                if self.stopping.is_set():
                    return
                self._deliver(job)
            later = [t for _n, t in self._tries.values()]
            wait = max(0.05, min(later) - time.monotonic()) if later else 5.0
            self.store.wait(lambda: self.stopping.is_set() or bool(
                [j for j in self.store.webhooks_due() if j.id not in self._tries]), min(wait, 5.0))

    def _deliver(self, job) -> None:
        try:
            hook = json.loads(job.webhook)
            payload = self.payload_for(job, hook["base"])
            ok = deliver_once(hook["url"], webhook_body(job, payload))
        except Exception:  # noqa: BLE001 - a bad payload must not stop the other deliveries
            log.exception("serve: building the webhook of %s failed", job.id)
            ok = False
        tries = self._tries.get(job.id, (0, 0.0))[0] + 1
        if ok or tries >= TRIES:
            if not ok:
                log.warning("serve: gave up delivering the webhook of %s after %d tries", job.id, tries)
            self.store.webhook_delivered(job.id)
            self._tries.pop(job.id, None)
            return
        self._tries[job.id] = (tries, time.monotonic() + PAUSES_S[min(tries - 1, len(PAUSES_S) - 1)])
