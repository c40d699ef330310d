"""The queue's rules from fal's request headers (:mod:`.fal_headers`), and who hears of a request's state changes:
mixed into :class:`~.store.Store`, which calls them.

- **Order**: waiting requests run highest ``priority`` first (``x-fal-queue-priority``: normal 0, low -1), then
  oldest first; a request's queue position counts the requests that run before it.
- **Deadline**: a request still waiting past its ``deadline`` (``x-fal-request-timeout``) ends, COMPLETED with
  ``error_type`` ``request_timeout`` and HTTP 504, when the queue is next looked at (a worker taking a request, a
  status or result call, the webhook thread's turn).
- **Listeners**: ``store.listeners`` are called as ``fn(event, request_id)`` after each state change is stored:
  ``queued``, ``started``, ``completed``, ``failed`` (cancelled and timed out included), ``requeued``. A listener
  that raises is logged and never stops the change.
"""

from __future__ import annotations

import logging
import time

from .fal_headers import TIMED_OUT, TIMEOUT_HEADER

log = logging.getLogger("sdxl_controlnet_img2img.serve")
COLUMNS = {"priority": "INTEGER NOT NULL DEFAULT 0", "deadline": "REAL"}  # added to an older queue.sqlite3
RUN_ORDER = "priority DESC, seq"
AHEAD = "state='IN_QUEUE' AND (priority>? OR (priority=? AND seq<?))"


def run_key(job) -> tuple:
    """:data:`RUN_ORDER` as a sort key, for requests in hand (ComfyUI's backend hands them over in this order)."""
    return -job.priority, job.seq


class QueueRules:
    """For :class:`~.store.Store` (its ``_db``, ``_do``, ``_tx``, ``_fail``, ``_drop_inputs``)."""

    def _add_rule_columns(self) -> None:
        have = {row[1] for row in self._db.execute("PRAGMA table_info(jobs)")}
        for name, kind in COLUMNS.items():
            if name not in have:
                self._db.execute(f"ALTER TABLE jobs ADD COLUMN {name} {kind}")

    def _ahead(self, job) -> int:
        return self._db.execute(f"SELECT COUNT(*) FROM jobs WHERE {AHEAD}",
                                (job.priority, job.priority, job.seq)).fetchone()[0]

    def expire_waiting(self, now: float | None = None) -> list[str]:
        """Ends the waiting requests whose deadline passed (504, ``request_timeout``); their ids."""
        now = time.time() if now is None else now
        find = "SELECT id, created, deadline FROM jobs WHERE state='IN_QUEUE' AND deadline IS NOT NULL AND deadline<?"
        if not self._read(lambda: self._db.execute(find + " LIMIT 1", (now,)).fetchone()):
            return []  # the usual case takes no write lock

        def write():
            ended = []
            for rid, created, deadline in self._db.execute(find, (now,)).fetchall():
                why = (f"Request timed out: it waited {deadline - created:g} s without starting (its "
                       f"{TIMEOUT_HEADER})")
                self._fail(rid, why, TIMED_OUT, 504, why)
                ended.append(rid)
            return ended

        ended = self._do("ending requests past their timeout", lambda: self._tx(write))
        for rid in ended:
            self._drop_inputs(rid)
            self._tell("failed", rid)
        return ended

    def _tell(self, event: str, request_id: str) -> None:
        for listener in list(getattr(self, "listeners", ())):
            try:
                listener(event, request_id)
            except Exception:  # noqa: BLE001 - a listener's fault never undoes or stops a state change
                log.exception("serve: a listener of %s %s failed", event, request_id)
