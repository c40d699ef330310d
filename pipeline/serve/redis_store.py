"""The queue and its results on Redis (``serve --queue redis://...``), for several servers that are one endpoint: the
same interface as :class:`~.store.Store`, so :class:`~.app.ServeApp`, the webhooks and the workers run unchanged.

The queue itself is RQ's (:data:`~.redis_conn.QUEUES`: one RQ job per request, its job id the request id, JSON only):
RQ hands each request to one worker, keeps queue positions (``LPOS``) and finds jobs whose worker stopped answering
(:mod:`.redis_worker`). What fal's protocol shows (state, logs, result, error, images) is this module's record of the
request (:mod:`.redis_conn` lists the keys), written in one Redis transaction per change:

- a submit writes the record, the input images and the RQ job in one ``MULTI``: all of it or nothing;
- a worker takes a request (:meth:`RedisStore.begin`) only while it waits, or while the run that had it no longer
  renews its lease; a result or failure is written only by the run that holds it (one result per request, even when
  a worker thought dead comes back), and never over an ended request;
- an ended request's input images go at once; its record, logs, token and result images expire ``keep_results_s``
  after it ended (7 days unless set; a webhook still due keeps them until it is delivered).

Redis unreachable: a submit fails within a few seconds with :class:`~.store.StoreUnavailable` (the HTTP layer answers
503), reads too; a worker's result waits in memory and is written when Redis is back (``result_retry_s``).
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
import uuid

from . import disk
from .fal_headers import TIMED_OUT, TIMEOUT_HEADER
from .redis_conn import JOB_FUNC, QUEUES, connect, is_fault, key, shown
from .redis_runs import RedisRuns
from .store import INPUT_NAMES, MAX_LOG_LINES, Job, QueueFull, StoreUnavailable

log = logging.getLogger("sdxl_controlnet_img2img.serve")
RETRIES = 5  # runs a request may lose (a worker killed or stopped) before it ends with an error
HOOK_LEASE_S = 120  # one node delivers a webhook at a time; another takes it over this long after that node stopped


class StoredImage:
    """A result image kept in Redis, read as :meth:`~.store.Store.image_path`'s file is (``read_bytes``)."""

    def __init__(self, store: "RedisStore", request_id: str, index: int):
        self.store, self.request_id, self.index = store, request_id, int(index)

    def read_bytes(self) -> bytes:
        data = self.store._read(lambda: self.store.r.get(key("img", self.request_id, self.index)))
        if data is None:
            raise FileNotFoundError(f"result image {self.index} of {self.request_id} (expired)")
        return data


class RedisStore(RedisRuns):
    """``url``: the queue (``redis://[:password@]host:6379/0``, ``rediss://`` for TLS); ``folder``: this node's
    data folder (its webhook signing key, shared through Redis: :func:`~.redis_node.share_signing_key`)."""

    def __init__(self, url: str, folder, *, keep_results_s: float | None = None, result_retry_s: float = 600.0,
                 lease_s: float = 60.0):
        from pathlib import Path

        from rq import Queue
        from rq.serializers import JSONSerializer

        self.url, self.shown = url, shown(url)
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.r = connect(url)
        self.queues = {p: Queue(name, connection=self.r, serializer=JSONSerializer) for p, name in QUEUES.items()}
        if keep_results_s is None:
            keep_results_s = disk.setting(disk.KEEP_ENV, disk.KEEP_HOURS) * 3600
        self.keep_results_s, self.min_free_bytes = keep_results_s, 0  # no disk of ours holds requests
        self.result_retry_s, self.lease_s = result_retry_s, lease_s
        self.node = uuid.uuid4().hex  # this process, for the webhook leases
        self._problem: str | None = None
        self._dropping = False  # log lines are being dropped (Redis unreachable)
        self._down_at = self._probed = 0.0
        self._lock = threading.RLock()
        self.changed = threading.Condition(self._lock)  # notified on this process's changes (others: by polling)
        self.listeners: list = []  # fn(event, request_id), as :mod:`.queue_rules` calls them
        self._acting = threading.local()  # the run this thread works for (see acting)
        self.lost: set[str] = set()  # runs whose request another run took over (their heartbeat found it)

    def close(self) -> None:
        self.r.close()

    # ---- resilience -----------------------------------------------------------------------------
    def _do(self, what: str, fn, retry_s: float = 0.0):
        """``fn()``, retried with growing pauses while Redis is unreachable; :class:`StoreUnavailable` after
        ``retry_s`` (0: one try, which redis-py itself retries for a few seconds)."""
        end, pause, warned = time.monotonic() + retry_s, 0.2, False
        while True:
            try:
                out = fn()
            except Exception as exc:  # noqa: BLE001 - only Redis's "not now" faults are retried
                if not is_fault(exc):
                    raise
                self._problem = f"the shared queue at {self.shown} cannot be reached ({type(exc).__name__}: {exc})"
                self._down_at = time.monotonic()
                if time.monotonic() + pause > end:
                    raise StoreUnavailable(f"{self._problem}; try again later") from None
                if not warned:
                    log.warning("serve: %s failed (%s); retrying for up to %.0f s", what, self._problem,
                                end - time.monotonic())
                    warned = True
                time.sleep(pause)
                pause = min(pause * 2, 5.0)
            else:
                if self._problem is not None:
                    log.warning("serve: the shared queue at %s answers again (%s)", self.shown, what)
                    self._problem, self._dropping = None, False
                return out

    def _read(self, fn):
        return self._do("read", fn)

    def redis_call(self, what: str, fn, retry_s: float = 0.0):
        """``fn()`` (which uses :attr:`r`) with Redis's faults as :class:`StoreUnavailable`, as every call here."""
        return self._do(what, fn, retry_s)

    def _quick(self, what: str, fn):
        """As :meth:`_do`, but failing at once while Redis was found unreachable in the last 2 s (a progress line or
        a cancel check must not hold a running request for the client's retries)."""
        if self._problem is not None and time.monotonic() - self._down_at < 2.0:
            raise StoreUnavailable(f"{self._problem}; try again later")
        return self._do(what, fn)

    def health(self) -> str | None:
        """None while Redis answers (asked at most once a second), else why not."""
        if time.monotonic() - self._probed > 1.0:
            self._probed = time.monotonic()
            try:
                self._do("a health check", self.r.ping)
            except StoreUnavailable:
                pass
        return self._problem

    def ready(self) -> bool:
        return self.health() is None

    def _tx(self, fn, *watch):
        """``fn(pipe)`` as one transaction over the ``watch`` keys (redis-py runs it again when one changed)."""
        return self.r.transaction(fn, *watch, value_from_callable=True)

    # ---- the record ---------------------------------------------------------------------------
    @staticmethod
    def _dec(raw: dict) -> dict:
        return {k.decode(): json.loads(v) for k, v in raw.items()}

    @staticmethod
    def _enc(fields: dict) -> dict:
        return {k: json.dumps(v) for k, v in fields.items()}

    def _job(self, request_id: str, rec: dict, logs: list) -> Job | None:
        if not rec or "state" not in rec:
            return None
        return Job(seq=0, id=request_id, token=rec["token"], state=rec["state"], args=rec["args"],
                   created=rec["created"], started=rec.get("started"), finished=rec.get("finished"),
                   logs=[json.loads(x) for x in logs], result=rec.get("result"), error=rec.get("error"),
                   error_type=rec.get("error_type"), error_status=rec.get("error_status"),
                   error_detail=rec.get("error_detail"), cancel=bool(rec.get("cancel")), webhook=rec.get("webhook"),
                   webhook_done=bool(rec.get("webhook_done")), external=rec.get("external"),
                   priority=rec.get("priority", 0), deadline=rec.get("deadline"))

    def _get(self, request_id: str) -> Job | None:
        with self.r.pipeline(transaction=False) as p:
            p.hgetall(key("req", request_id))
            p.lrange(key("logs", request_id), 0, -1)
            raw, logs = p.execute()
        return self._job(request_id, self._dec(raw), logs)

    def _tell(self, event: str, request_id: str) -> None:
        with self.changed:
            self.changed.notify_all()
        for listener in list(self.listeners):
            try:
                listener(event, request_id)
            except Exception:  # noqa: BLE001 - a listener's fault never undoes or stops a state change
                log.exception("serve: a listener of %s %s failed", event, request_id)

    # ---- reading --------------------------------------------------------------------------------
    def get(self, request_id: str) -> Job | None:
        return self._read(lambda: self._get(request_id))

    def by_token(self, token: str) -> Job | None:
        rid = self._read(lambda: self.r.get(key("token", token)))
        return self.get(rid.decode()) if rid else None

    def position(self, job: Job) -> int:
        """Requests waiting ahead of ``job`` (0: next): those of a higher priority, then those ahead in its queue."""
        def ahead():
            count = 0
            for priority, queue in self.queues.items():
                if priority > job.priority:
                    count += queue.count
                elif priority == job.priority:
                    at = queue.get_job_position(job.id)
                    return count + (at or 0)
            return count

        return self._read(ahead)

    def waiting(self) -> int:
        return self._read(lambda: sum(q.count for q in self.queues.values()))

    def jobs(self, state: str) -> list[Job]:
        """The requests running now (``IN_PROGRESS``) or waiting (``IN_QUEUE``), on every node."""
        if state == "IN_PROGRESS":
            ids = sorted(x.decode() for x in self._read(lambda: self.r.smembers(key("running"))))
        elif state == "IN_QUEUE":
            ids = [i for q in self.queues.values() for i in self._read(lambda q=q: q.get_job_ids())]
        else:
            raise ValueError(f"{state}: only IN_PROGRESS and IN_QUEUE are listed")
        found = [self.get(i) for i in ids]
        return [j for j in found if j is not None and j.state == state]

    def input_bytes(self, request_id: str, name: str) -> bytes:
        if name not in INPUT_NAMES:
            raise ValueError(name)
        data = self._read(lambda: self.r.get(key("in", request_id, name)))
        if data is None:
            raise FileNotFoundError(f"the input {name} of {request_id} is not stored")
        return data

    def has_input(self, request_id: str, name: str) -> bool:
        if name not in INPUT_NAMES:
            raise ValueError(name)
        return bool(self._read(lambda: self.r.exists(key("in", request_id, name))))

    def image_path(self, request_id: str, index: int) -> StoredImage:
        return StoredImage(self, request_id, index)

    def cancel_requested(self, request_id: str) -> bool:
        """Whether the request's run is to stop: cancel was asked, or this thread's run lost it to another."""
        if getattr(self._acting, "run", None) in self.lost:
            return True
        raw = self._quick("reading a cancel", lambda: self.r.hget(key("req", request_id), "cancel"))
        return bool(raw and json.loads(raw))

    # ---- submitting and cancelling --------------------------------------------------------------------
    def add(self, args: dict, images: dict, webhook: str | None = None, max_waiting: int | None = None,
            priority: int = 0, deadline: float | None = None) -> Job:
        """Queue a request: its record, input images and RQ job in one transaction. :class:`QueueFull` past
        ``max_waiting``, :class:`StoreUnavailable` when Redis does not answer (nothing is written then)."""
        from rq import Retry

        if any(name not in INPUT_NAMES for name in images):
            raise ValueError(sorted(set(images) - set(INPUT_NAMES)))
        queue = self.queues.get(priority, self.queues[min(QUEUES)])
        rid, token = str(uuid.uuid4()), secrets.token_hex(16)
        record = {"token": token, "state": "IN_QUEUE", "args": args, "created": time.time(), "webhook": webhook,
                  "priority": priority, "deadline": deadline}

        def write():
            waiting = sum(q.count for q in self.queues.values())
            if max_waiting is not None and waiting >= max_waiting:
                raise QueueFull(waiting)
            with self.r.pipeline() as p:
                p.multi()
                p.hset(key("req", rid), mapping=self._enc(record))
                p.set(key("token", token), rid)
                for name, data in images.items():
                    p.set(key("in", rid, name), data)
                if deadline is not None:
                    p.zadd(key("deadlines"), {rid: deadline})
                queue.enqueue_call(JOB_FUNC, args=(rid,), job_id=rid, timeout=-1, result_ttl=0,
                                   failure_ttl=int(self.keep_results_s), description=f"fal request {rid}",
                                   retry=Retry(max=RETRIES, enqueue_at_front=True), pipeline=p)
                p.execute()

        self._do("queueing a request", write)
        self._tell("queued", rid)
        return self._job(rid, record, [])

    def cancel(self, request_id: str) -> str:
        """"cancelled" (it was waiting: it never runs), "requested" (running: stopped at its next step), "done"."""
        def write(p):
            job = self._job(request_id, self._dec(p.hgetall(key("req", request_id))), [])
            if job is None or job.state == "COMPLETED":
                return "done"
            p.multi()
            p.hset(key("req", request_id), "cancel", "true")
            if job.state == "IN_PROGRESS":
                return "requested"
            self._end(p, job, {"error": "Request cancelled", "error_type": "request_cancelled", "error_status": 400,
                               "error_detail": "Request cancelled"})
            return "cancelled"

        outcome = self._do("cancelling a request", lambda: self._tx(write, key("req", request_id)))
        if outcome == "cancelled":
            self._tell("failed", request_id)
        return outcome

    def expire_waiting(self, now: float | None = None) -> list[str]:
        """Ends the waiting requests whose ``x-fal-request-timeout`` passed (504, ``request_timeout``); their ids."""
        now = time.time() if now is None else now
        due = [x.decode() for x in self._read(lambda: self.r.zrangebyscore(key("deadlines"), "-inf", now))]
        ended = []
        for rid in due:
            def write(p, rid=rid):
                job = self._job(rid, self._dec(p.hgetall(key("req", rid))), [])
                p.multi()
                p.zrem(key("deadlines"), rid)
                if job is None or job.state != "IN_QUEUE":
                    return False
                why = f"Request timed out: it waited {job.deadline - job.created:g} s without starting (its " \
                      f"{TIMEOUT_HEADER})"
                self._end(p, job, {"error": why, "error_type": TIMED_OUT, "error_status": 504, "error_detail": why})
                return True

            if self._do("ending a request past its timeout", lambda w=write, rid=rid: self._tx(w, key("req", rid))):
                ended.append(rid)
                self._tell("failed", rid)
        return ended

    def _end(self, p, job: Job, fields: dict, images: list[bytes] = ()) -> None:
        """In the open transaction ``p``: ``job`` COMPLETED with ``fields``; its inputs deleted, its keys set to
        expire (or kept for a webhook still due)."""
        rid = job.id
        keys = [key("req", rid), key("logs", rid), key("token", job.token)]
        for i, data in enumerate(images):
            p.set(key("img", rid, i), data)
            keys.append(key("img", rid, i))
        p.hset(key("req", rid), mapping=self._enc({"state": "COMPLETED", "finished": time.time(), "owner": None,
                                                   "images": len(images), **fields}))
        p.delete(*(key("in", rid, name) for name in INPUT_NAMES), key("lease", rid))
        p.srem(key("running"), rid)
        p.zrem(key("deadlines"), rid)
        if job.state == "IN_QUEUE":  # a waiting request leaves RQ's queue, and RQ's job goes (nothing is left to run)
            for queue in self.queues.values():
                queue.remove(rid, pipeline=p)
            from rq.job import Job as RQJob

            p.delete(RQJob.key_for(rid))
        if job.webhook:
            p.sadd(key("hooks"), rid)
        else:
            for k in keys:
                p.expire(k, max(1, int(self.keep_results_s)))

    def log(self, request_id: str, message: str, level: str = "INFO") -> None:
        """A log line for the request's status; best effort (dropped while Redis does not answer)."""
        entry = json.dumps({"message": str(message), "level": level, "source": "user",
                            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + "Z"})

        def write():
            with self.r.pipeline() as p:
                p.rpush(key("logs", request_id), entry)
                p.ltrim(key("logs", request_id), -MAX_LOG_LINES, -1)
                p.execute()

        try:
            self._quick("log", write)
        except StoreUnavailable as exc:
            if not self._dropping:  # said once per outage
                log.info("serve: log lines of requests are dropped while %s", exc)
            self._dropping = True

    # ---- webhooks and expiry ------------------------------------------------------------------------
    def purge_expired(self, force: bool = False) -> int:
        return 0  # Redis deletes expired keys itself

    def webhooks_due(self) -> list[Job]:
        """Ended requests whose webhook was not delivered, that this node delivers: each is leased to one node at a
        time (another takes it over once that node stops renewing). Also ends waiting requests past their timeout."""
        self.expire_waiting()
        ids = sorted(x.decode() for x in self._read(lambda: self.r.smembers(key("hooks"))))
        mine = []
        for rid in ids:
            lease = key("hook", rid)
            if self._read(lambda lease=lease: self.r.set(lease, self.node, nx=True, ex=HOOK_LEASE_S)) or \
                    self._read(lambda lease=lease: self.r.get(lease)) == self.node.encode():
                self._read(lambda lease=lease: self.r.expire(lease, HOOK_LEASE_S))
                job = self.get(rid)
                if job is not None:
                    mine.append(job)
        return mine

    def webhook_delivered(self, request_id: str) -> None:
        def write(p):
            raw = self._dec(p.hgetall(key("req", request_id)))
            job = self._job(request_id, raw, [])
            p.multi()
            p.srem(key("hooks"), request_id)
            p.delete(key("hook", request_id))
            if job is None:
                return
            p.hset(key("req", request_id), "webhook_done", "true")
            keep = max(1, int(self.keep_results_s))
            for k in [key("req", request_id), key("logs", request_id), key("token", job.token),
                      *(key("img", request_id, i) for i in range(raw.get("images", 0)))]:
                p.expire(k, keep)

        self._do("recording a webhook", lambda: self._tx(write, key("req", request_id)), 30.0)

    def wait(self, predicate, timeout: float) -> bool:
        """Block until ``predicate()`` is true (checked at each change made here) or ``timeout`` seconds pass."""
        with self.changed:
            return self.changed.wait_for(predicate, timeout)
