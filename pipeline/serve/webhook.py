"""fal's webhooks: when a request submitted with ``?fal_webhook=URL`` ends, its outcome is POSTed to the URL.

The body is fal's: ``{request_id, gateway_request_id, status: "OK"|"ERROR", payload, error}``, the payload being the
result (or ``{"detail": ...}``). Deliveries run on a few threads of their own, each with one deadline of 15 s for the
whole call (fal's timeout), so a slow receiver holds only its own delivery; each is tried up to 10 times with growing
pauses, as fal does. Each delivery carries fal's signature headers, made with the server's own key
(:mod:`.signing`; its public key at ``/.well-known/jwks.json``). The URL goes through :mod:`.fetch`: no address
inside the network (unless the operator allows it), redirects not followed. A delivery still due when the process
stops is made after a restart (the store keeps it), so receivers must be idempotent per request id, as fal asks of
them.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from . import fetch
from .protocol import webhook_body
from .signing import Signer
from .store import Store

log = logging.getLogger("sdxl_controlnet_img2img.serve")
TIMEOUT_S = 15.0
TRIES = 10
PAUSES_S = (1, 2, 5, 10, 30, 60, 120, 300, 600)
SENDERS = 4  # deliveries at once
ANSWER_BYTES = 64 * 1024  # what is read of a receiver's answer


def deliver_once(url: str, body: dict, timeout_s: float = TIMEOUT_S, policy: fetch.Policy | None = None,
                 signer: Signer | None = None) -> bool:
    """POST ``body`` to ``url`` within ``timeout_s`` in all, signed by ``signer`` as fal signs; True on a 2xx answer."""
    data = json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if signer is not None:
        headers.update(signer.headers(body["request_id"], data))
    try:
        status, _answer = fetch.request(url, method="POST", body=data, headers=headers,
                                        max_bytes=ANSWER_BYTES, timeout_s=timeout_s, policy=policy,
                                        follow_redirects=False)
    except fetch.FetchError as exc:
        log.info("serve: webhook for %s not delivered: the URL %s", body.get("request_id"), exc)
        return False
    if not 200 <= status < 300:
        log.info("serve: webhook for %s answered HTTP %d", body.get("request_id"), status)
    return 200 <= status < 300


class Webhooks:
    """Delivers the webhooks of finished requests (``payload_for(job, base)`` builds the payload).

    ``policy``: the internal addresses webhooks may reach (default: from ``SDXLCN_SERVE_ALLOW_INTERNAL_URLS``);
    ``signer``: the key they are signed with (default: the store folder's, :mod:`.signing`)."""

    def __init__(self, store: Store, payload_for, policy: fetch.Policy | None = None, timeout_s: float = TIMEOUT_S,
                 senders: int = SENDERS, signer: Signer | None = None):
        self.store = store
        self.payload_for = payload_for
        self.policy = policy if policy is not None else fetch.Policy.from_env()
        self.signer = signer if signer is not None else Signer.for_folder(store.folder)
        self.timeout_s = timeout_s
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self._tries: dict[str, tuple[int, float]] = {}  # request id -> (tries made, next try at)
        self._busy: set[str] = set()  # being delivered now
        self._pool = ThreadPoolExecutor(max_workers=senders, thread_name_prefix="sdxlcn-serve-webhook")
        self.thread = threading.Thread(target=self._loop, name="sdxlcn-serve-webhooks", daemon=True)

    def start(self) -> "Webhooks":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        with self.store.changed:
            self.store.changed.notify_all()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _loop(self) -> None:
        pause = 1.0
        while not self.stopping.is_set():
            try:  # a store error (a lock, a full disk) costs a pause, never the thread
                wait = self._dispatch()
                pause = 1.0
            except Exception:  # noqa: BLE001
                log.exception("serve: reading the webhooks due failed; trying again in %g s", pause)
                wait, pause = pause, min(pause * 2, 30.0)
            try:
                self.store.wait(lambda: self.stopping.is_set() or self._fresh(), wait)
            except Exception:  # noqa: BLE001
                self.stopping.wait(wait)

    def _fresh(self) -> bool:
        """A finished request whose webhook was never tried (the wait's wake-up test)."""
        due = self.store.webhooks_due()
        with self._lock:  # never held while the store is called (the store's lock comes first)
            return any(j.id not in self._tries and j.id not in self._busy for j in due)

    def _dispatch(self) -> float:
        """Hands the due deliveries to the senders; the seconds until the next one is due."""
        now = time.monotonic()
        waiting = self.store.webhooks_due()
        with self._lock:
            due = [j for j in waiting if j.id not in self._busy and self._tries.get(j.id, (0, 0.0))[1] <= now]
            for job in due:
                if self.stopping.is_set():
                    return 0.0
                self._busy.add(job.id)
                self._pool.submit(self._deliver, job)
            later = [t for rid, (_n, t) in self._tries.items() if rid not in self._busy]
        return min(5.0, max(0.05, min(later) - now)) if later else 5.0

    def _deliver(self, job) -> None:
        ok = False
        try:
            hook = json.loads(job.webhook)
            payload = self.payload_for(job, hook["base"])
            ok = deliver_once(hook["url"], webhook_body(job, payload), self.timeout_s, self.policy, self.signer)
        except Exception:  # noqa: BLE001 - a bad payload must not stop the other deliveries
            log.exception("serve: building the webhook of %s failed", job.id)
        try:
            with self._lock:
                tries = self._tries.get(job.id, (0, 0.0))[0] + 1
                self._tries[job.id] = (tries, time.monotonic() + PAUSES_S[min(tries - 1, len(PAUSES_S) - 1)])
            if ok or tries >= TRIES:
                if not ok:
                    log.warning("serve: gave up delivering the webhook of %s after %d tries", job.id, tries)
                self.store.webhook_delivered(job.id)
                with self._lock:
                    self._tries.pop(job.id, None)
        except Exception:  # noqa: BLE001 - not recorded: it is tried again (receivers are idempotent)
            log.exception("serve: recording the webhook of %s failed", job.id)
        finally:
            with self._lock:
                self._busy.discard(job.id)
            with self.store.changed:
                self.store.changed.notify_all()
