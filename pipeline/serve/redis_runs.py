"""How a worker's run holds a request on the shared queue (mixed into :class:`~.redis_store.RedisStore`).

A run takes a request with :meth:`RedisRuns.begin` only while it waits, or while the run that had it no longer renews
its lease (its worker was killed, lost its power or froze: the lease lapses ``lease_s`` after the last heartbeat,
:mod:`.redis_worker`). The run then holds it: within :meth:`RedisRuns.acting`, its result, its failure and its
downloaded inputs are written only while it still holds the request, so a worker thought dead that comes back writes
nothing over the run that took its request over: a request has one result, even when it ran twice.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from contextlib import contextmanager

from .redis_conn import key
from .store import INPUT_NAMES, Job

log = logging.getLogger("sdxl_controlnet_img2img.serve")


class RedisRuns:
    """For :class:`~.redis_store.RedisStore` (its ``r``, ``_do``, ``_tx``, ``_job``, ``_dec``, ``_enc``, ``_end``,
    ``_tell``, ``log``, ``expire_waiting``, ``lease_s``, ``result_retry_s``, ``_acting``)."""


    @contextmanager
    def acting(self, run_id: str):
        """While in this block, this thread's :meth:`complete`, :meth:`fail` and :meth:`put_input` write only while
        the run ``run_id`` holds the request (see :meth:`begin`)."""
        self._acting.run = run_id
        try:
            yield
        finally:
            self._acting.run = None

    def begin(self, request_id: str, run_id: str) -> Job | None:
        """The request, now IN_PROGRESS and held by ``run_id`` (its lease renewed by :meth:`renew`); None when it is
        not to be run: it ended (cancelled, timed out, done), it is gone, or a live run holds it."""
        self.expire_waiting()  # a request past its x-fal-request-timeout ends instead

        def write(p):
            job = self._job(request_id, self._dec(p.hgetall(key("req", request_id))), [])
            if job is None or job.state == "COMPLETED":
                return None, False
            lease = p.get(key("lease", request_id))
            again = job.state == "IN_PROGRESS"
            if again and lease is not None and lease.decode() != run_id:
                return None, False
            p.multi()
            p.hset(key("req", request_id), mapping=self._enc({"state": "IN_PROGRESS", "started": time.time(),
                                                              "owner": run_id}))
            p.set(key("lease", request_id), run_id, ex=int(self.lease_s))
            p.sadd(key("running"), request_id)
            p.zrem(key("deadlines"), request_id)
            return job.id, again

        rid, again = self._do("taking a request", lambda: self._tx(write, key("req", request_id),
                                                                    key("lease", request_id)))
        if rid is None:
            return None
        if again:
            self.log(rid, "the worker running this request stopped answering; it runs again")
        self._tell("started", rid)
        return self.get(rid)

    def renew(self, request_id: str, run_id: str) -> bool:
        """The heartbeat of a run: its lease on the request renewed; False when another run took it over."""
        def write(p):
            if (p.get(key("lease", request_id)) or b"").decode() not in ("", run_id):
                return False
            p.multi()
            p.set(key("lease", request_id), run_id, ex=int(self.lease_s))
            return True

        return self._do("renewing a lease", lambda: self._tx(write, key("lease", request_id)))

    def _holds(self, job: Job | None, rec_owner) -> bool:
        """Whether this thread may write the outcome of ``job``: it has not ended, and it is this thread's run."""
        run = getattr(self._acting, "run", None)
        return job is not None and job.state != "COMPLETED" and (run is None or rec_owner == run)

    def _finish(self, what: str, request_id: str, fields: dict, images: list[bytes] = (),
                retry_s: float | None = None) -> bool:
        def write(p):
            raw = self._dec(p.hgetall(key("req", request_id)))
            job = self._job(request_id, raw, [])
            if not self._holds(job, raw.get("owner")):
                return False
            p.multi()
            self._end(p, job, fields, images)
            return True

        done = self._do(what, lambda: self._tx(write, key("req", request_id)),
                        self.result_retry_s if retry_s is None else retry_s)
        if not done:
            log.info("serve: the outcome of %s from this run was not stored: the request ended or another run "
                     "holds it", request_id)
        return done

    def complete(self, request_id: str, result: dict, images: list[bytes]) -> None:
        """The result and its images, in one transaction, unless the request ended or another run holds it."""
        if self._finish("storing a result", request_id, {"result": result}, images):
            self._tell("completed", request_id)

    def fail(self, request_id: str, error: str, error_type: str, status: int = 500, detail=None) -> None:
        """The request ends with an error (unless it ended, or another run holds it); its input images go."""
        fields = {"error": error, "error_type": error_type, "error_status": status,
                  "error_detail": detail if detail is not None else error}
        if self._finish("storing a failure", request_id, fields):
            self._tell("failed", request_id)

    def put_input(self, request_id: str, name: str, data: bytes) -> bool:
        """A downloaded input image for a request that has not ended; False (nothing kept) when it ended."""
        if name not in INPUT_NAMES:
            raise ValueError(name)

        def write(p):
            raw = self._dec(p.hgetall(key("req", request_id)))
            if not self._holds(self._job(request_id, raw, []), raw.get("owner")):
                return False
            p.multi()
            p.set(key("in", request_id, name), data)
            return True

        return self._do("storing a downloaded input", lambda: self._tx(write, key("req", request_id)),
                        self.result_retry_s)

    def requeue(self, request_id: str, why: str) -> bool:
        """A request IN_PROGRESS goes back to waiting (its RQ job is queued again by RQ: :mod:`.redis_worker`), with
        ``why`` in its logs; the run that held it may write nothing more. True when it did."""
        def write(p):
            job = self._job(request_id, self._dec(p.hgetall(key("req", request_id))), [])
            if job is None or job.state != "IN_PROGRESS":
                return False
            p.multi()
            p.hset(key("req", request_id), mapping=self._enc({"state": "IN_QUEUE", "started": None, "owner": None,
                                                              "external": None}))
            p.delete(key("lease", request_id))
            p.srem(key("running"), request_id)
            return True

        again = self._do("requeueing a request", lambda: self._tx(write, key("req", request_id)), 30.0)
        if again:
            self.log(request_id, why)
            self._tell("requeued", request_id)
        return again

    def start(self, request_id: str, external: str | None = None) -> None:
        """A host's own queue took the request (ComfyUI's backend)."""
        if self.begin(request_id, external or uuid.uuid4().hex) is not None and external:
            self.set_external(request_id, external)

    def set_external(self, request_id: str, external: str) -> None:
        self._do("recording a request's work item",
                 lambda: self.r.hset(key("req", request_id), "external", json.dumps(external)))


    def held_by(self, request_id: str) -> str | None:
        """The run that holds the request now (None: none does)."""
        raw = self._read(lambda: self.r.hget(key("req", request_id), "owner"))
        return json.loads(raw) if raw else None
