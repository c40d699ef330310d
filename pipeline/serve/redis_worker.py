"""Workers on the shared queue (``serve --queue redis://...``): one RQ ``SimpleWorker`` per device, each in a thread of
this process with its pipeline loaded once (no fork), taking requests from RQ's queues (``normal`` before ``low``).

A request runs as :class:`~.worker.LocalWorkers` runs it on one box (its downloads, progress lines, cancel at the next
step, fal's error shapes), inside :meth:`RedisWorkers.run`, which RQ calls with the request id:

- **heartbeats**: while a request runs, a side thread renews every ``lease_s / 6`` seconds both RQ's entry for the
  job (its started-job registry, which expires ``lease_s`` after the last beat) and the run's lease on the request
  (:mod:`.redis_runs`);
- **abandoned runs**: every node (API nodes too) looks every ``lease_s / 4`` seconds for entries that expired (a
  worker killed, powered off or frozen) with RQ's own ``StartedJobRegistry.cleanup``; RQ queues such a job again at
  the front (``Retry``), and the request shows ``IN_QUEUE`` with a log line saying why. With the default
  ``lease_s`` of 60 a killed worker's request runs again within about 75 s. It runs to one result: a worker thought
  dead that comes back writes nothing; a webhook may be delivered twice, as fal's may;
- **a stop** (Ctrl-C, SIGTERM) cancels the running request at its next step and queues it again at the front;
- **Redis unreachable**: an idle worker waits and reconnects (RQ's own loop, and this module's around it); a finished
  request's result waits in memory until Redis answers (``result_retry_s``), or its run is found abandoned later.

A request may lose :data:`~.redis_store.RETRIES` runs this way; then it ends with HTTP 500 saying so.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import socket
import threading
import time
import uuid

from rq import SimpleWorker, get_current_job
from rq.exceptions import AbandonedJobError
from rq.job import Job as RQJob
from rq.registry import StartedJobRegistry
from rq.serializers import JSONSerializer
from rq.timeouts import BaseDeathPenalty

from .redis_conn import QUEUES, connect, key
from .store import StoreUnavailable
from .worker import LocalWorkers, all_failing

log = logging.getLogger("sdxl_controlnet_img2img.serve")
WORKER_TTL = 60  # an RQ worker's own registration expires this long (plus 60 s) after its last heartbeat
POLL_S = 2  # an idle worker's wait for a job, in turns this long: a stop waits at most that long
_here = threading.local()  # the run function of this thread's worker (RQ calls it through RequestJob.func)
_TAKES_EXECUTION = len(inspect.signature(SimpleWorker.maintain_heartbeats).parameters) > 2  # RQ 3: (job, execution)


class Interrupted(Exception):
    """The worker stopped while the request ran: RQ queues its job again (at the front)."""


class RequestJob(RQJob):
    """An RQ job whose function is the running worker's (``JOB_FUNC`` is only a name): RQ never imports code named
    in the queue, and a ComfyUI and a ``serve`` run the same job though the pack's module path differs."""

    @property
    def func(self):
        run = getattr(_here, "run", None)
        if run is None:
            raise RuntimeError("a shared-queue job ran outside a serve worker thread")
        return run


class NoDeathPenalty(BaseDeathPenalty):
    """No alarm signal (a worker thread cannot set one); a request's time is bounded by its steps."""

    def setup_death_penalty(self):
        pass

    def cancel_death_penalty(self):
        pass


class ServeWorker(SimpleWorker):
    death_penalty_class = NoDeathPenalty
    job_class = RequestJob
    lease_s = 60
    on_job = staticmethod(lambda worker, job, execution: None)  # the heartbeat thread's registration
    ready_for_work = staticmethod(lambda: True)  # RedisWorkers.ready_for_work

    def _install_signal_handlers(self):  # the server's main thread handles Ctrl-C and SIGTERM
        pass

    def get_heartbeat_ttl(self, job, working_time: float = 0.0) -> int:
        return int(self.lease_s)

    def perform_job(self, job, queue, *execution) -> bool:  # RQ 3 passes the execution, RQ 2 keeps it on self
        self.on_job(self, job, execution[0] if execution else getattr(self, "execution", None))
        try:
            return super().perform_job(job, queue, *execution)
        finally:
            self.on_job(self, None, None)

    def beat(self, job, execution) -> None:
        """RQ's heartbeat of a running job: the worker, the job and its started-job entry, renewed for ``lease_s``."""
        if _TAKES_EXECUTION:
            self.maintain_heartbeats(job, execution)
        else:
            self.maintain_heartbeats(job)

    def dequeue_job_and_maintain_ttl(self, timeout, max_idle_time=None):
        """RQ's wait for a job, in turns of :data:`POLL_S` seconds: a stop (no signal reaches a worker thread) ends
        an idle worker within one turn."""
        while True:
            if not self.ready_for_work():  # busy with work of its own (ComfyUI's queue): no request is taken
                if self._stop_requested:
                    return None
                self.heartbeat()
                time.sleep(POLL_S / 4)
                continue
            result = super().dequeue_job_and_maintain_ttl(timeout, max_idle_time=POLL_S)
            if result is not None or self._stop_requested:
                return result

    def handle_exception(self, job, *exc_info):
        if exc_info and exc_info[0] is Interrupted:  # said once in the server's log already
            return
        super().handle_exception(job, *exc_info)


def queues(connection) -> list:
    from rq import Queue

    return [Queue(QUEUES[p], connection=connection, serializer=JSONSerializer, job_class=RequestJob,
                  death_penalty_class=NoDeathPenalty) for p in sorted(QUEUES, reverse=True)]


def no_generation(pipe, request, on_step=None):
    raise RuntimeError("an API node (--workers 0) runs no requests")


class RedisWorkers:
    """The backend of a node on the shared queue: ``pipes`` (``{device: pipeline}``, none on an API node) each run by
    a :class:`ServeWorker`; the heartbeats and the search for abandoned runs on a side thread."""

    def __init__(self, store, pipes: dict, generate=None, lease_s: float | None = None, extras=None):
        self.store = store
        self.lease_s = float(lease_s or store.lease_s)
        self.sweep_s = max(1.0, self.lease_s / 4)
        store.lease_s = self.lease_s
        if generate is None and not pipes:  # an API node: nothing to generate with, and torch is not imported
            generate = no_generation
        more = {} if extras is None else {"extras": extras}  # loras, safety checker, prompt expansion (extras.py)
        self.local = LocalWorkers(store, pipes, generate=generate, **more)  # runs one request; its threads never start
        self.stopping = self.local.stopping
        self.trouble: dict[str, str | None] = {name: None for name in pipes}
        self._held: dict[int, tuple] = {}  # worker thread -> (rq worker, rq job, execution, request id, run id)
        self._rq: dict[str, ServeWorker] = {}
        self.threads = [threading.Thread(target=self._loop, args=(name, pipe), name=f"sdxlcn-queue-{name}",
                                         daemon=True) for name, pipe in pipes.items()]
        self.side = threading.Thread(target=self._side, name="sdxlcn-queue-heartbeat", daemon=True)

    # ---- Backend ------------------------------------------------------------------------------------
    @property
    def limits(self):
        return self.local.limits

    @limits.setter
    def limits(self, value) -> None:
        self.local.limits = value

    @property
    def extras(self):
        return self.local.extras

    def queued(self, job) -> None:
        pass  # RQ hands it to a worker

    def cancel(self, job) -> None:
        log.info("serve: cancel asked for running request %s (its worker stops it at its next step)", job.id)

    def hooks(self) -> frozenset:
        return self.local.hooks()

    def refuse(self, args: dict) -> None:
        refuse = getattr(self.local, "refuse", None)
        if refuse is not None:
            refuse(args)

    def health(self) -> str | None:
        problem = self.store.health()
        if problem:
            return problem
        return all_failing(self.trouble)

    def ready(self) -> bool:
        return self.health() is None

    def start(self) -> "RedisWorkers":
        for t in [*self.threads, self.side]:
            t.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self.stopping.set()
        for worker in list(self._rq.values()):
            worker._stop_requested = True
        for t in self.threads:
            if t.ident is not None:
                t.join(timeout)

    # ---- the workers ----------------------------------------------------------------------------------
    def _loop(self, device: str, pipe) -> None:
        _here.run = functools.partial(self.run, device, pipe)
        pause = 1.0
        while not self.stopping.is_set():
            try:
                conn = connect(self.store.url, socket_timeout=None)  # RQ sets its own, above its blocking wait
                name = f"{socket.gethostname()}.{os.getpid()}.{device}.{uuid.uuid4().hex[:8]}"
                worker = ServeWorker(queues(conn), name=name, connection=conn, serializer=JSONSerializer,
                                     job_class=RequestJob, worker_ttl=WORKER_TTL)
                worker.lease_s, worker.on_job, worker.ready_for_work = self.lease_s, self._on_job, self.ready_for_work
                self._rq[device] = worker
                if self.stopping.is_set():
                    break
                self.trouble[device] = None
                worker.work(logging_level="WARNING")  # returns at a stop, or when it lost Redis mid-job
                if self.stopping.is_set():
                    break
                why = "RQ's worker loop ended (Redis unreachable?)"
            except Exception as exc:  # noqa: BLE001 - a worker outlives Redis's outages
                why = f"{type(exc).__name__}: {exc}"
            self.trouble[device] = why
            log.warning("serve: the worker on %s lost the shared queue (%s); trying again in %g s", device, why, pause)
            self.stopping.wait(pause)
            pause = min(pause * 2, 30.0)

    def _on_job(self, worker, job, execution) -> None:
        ident = threading.get_ident()
        if job is None:
            self._held.pop(ident, None)
        else:
            self._held[ident] = (worker, job, execution, None, None)

    def run(self, device: str, pipe, request_id: str):
        """RQ's job function: the request run once, as one box runs it (:meth:`LocalWorkers.run_one`)."""
        run_id = uuid.uuid4().hex
        job = self.store.begin(request_id, run_id)
        if job is None:
            return None  # it ended, is gone, or a live run holds it
        ident = threading.get_ident()
        worker, rq_job, execution, _, _ = self._held.get(ident, (None, None, None, None, None))
        self._held[ident] = (worker, rq_job, execution, request_id, run_id)
        try:
            with self.store.acting(run_id):
                try:
                    self.execute(device, pipe, job)
                except StoreUnavailable:
                    self.local._unstored.pop(request_id, None)  # its run is found abandoned and runs again
                    log.error("serve: the outcome of request %s could not be stored; it runs again once the shared "
                              "queue answers", request_id)
                    raise
                except Exception as exc:  # noqa: BLE001 - a fault of this worker ends the request, said in its result
                    log.exception("serve: request %s failed", request_id)
                    self.store.fail(request_id, f"the worker failed: {type(exc).__name__}: {exc}", "runner_error",
                                    500)
                    return None
                if self.store.held_by(request_id) == run_id:  # no outcome: this worker is stopping
                    left = (get_current_job() or rq_job).retries_left
                    if not left:
                        self.store.fail(request_id, "this request's run was interrupted too many times (its "
                                        "workers stopped or were lost); submit it again", "runner_error", 500)
                        return None
                    self.store.requeue(request_id, "the server running this request stopped; it is queued again")
                    raise Interrupted(request_id)
        finally:
            self.store.lost.discard(run_id)
            self._held[ident] = (worker, rq_job, execution, None, None)
        return None

    def execute(self, device: str, pipe, job) -> None:
        """One request run to its outcome in the store (or left without one when stopping): the local pipeline's
        run; ComfyUI's backend runs it as a prompt of its own queue instead (``nodes/serve_shared.py``)."""
        self.local.run_one(device, pipe, job)

    def ready_for_work(self) -> bool:
        """Whether a worker may take a request now (ComfyUI's: only while its own queue is idle)."""
        return True

    # ---- heartbeats and abandoned runs ------------------------------------------------------------
    def _side(self) -> None:
        beat, next_sweep = max(0.5, self.lease_s / 6), 0.0
        while not self.stopping.wait(beat):
            try:
                self._beat()
            except Exception as exc:  # noqa: BLE001 - a missed beat is made up at the next turn
                log.info("serve: a heartbeat failed (%s)", exc)
            if time.monotonic() >= next_sweep:
                next_sweep = time.monotonic() + self.sweep_s
                try:
                    self.sweep()
                except StoreUnavailable:
                    pass  # the store says so in health(); the next turn tries again
                except Exception:  # noqa: BLE001
                    log.exception("serve: looking for abandoned requests failed")

    def _beat(self) -> None:
        for worker, job, execution, request_id, run_id in list(self._held.values()):
            if job is not None:
                worker.beat(job, execution)
            if request_id is not None and not self.store.renew(request_id, run_id):
                log.warning("serve: request %s was taken over by another worker; this run stops", request_id)
                self.store.lost.add(run_id)

    def sweep(self) -> None:
        """RQ's cleanup of expired started-job entries, on one node at a time, with :meth:`_abandoned` told of each
        (its request queued again, or failed after :data:`~.redis_store.RETRIES` lost runs); and the waiting
        requests past their timeout ended."""
        self.store.expire_waiting()
        if not self.store.redis_call("looking for abandoned requests", lambda: self.store.r.set(
                key("sweep"), self.store.node, nx=True, ex=max(1, int(self.sweep_s)))):
            return  # another node looked less than sweep_s ago
        for queue in queues(self.store.r):
            registry = StartedJobRegistry(queue=queue, job_class=RequestJob, serializer=JSONSerializer)
            self.store.redis_call("looking for abandoned requests",
                                  lambda r=registry: r.cleanup(exception_handlers=[self._abandoned]))

    def _abandoned(self, job, exc_type, exc_value, tb) -> bool:
        if exc_type is not AbandonedJobError:
            return True
        rid = job.id
        if job.retries_left:
            if self.store.requeue(rid, f"the worker running this request stopped answering (no heartbeat for "
                                       f"{self.lease_s:g} s); it is queued again"):
                log.warning("serve: request %s: its worker stopped answering; queued again", rid)
        else:
            self.store.fail(rid, "the workers running this request stopped answering too many times; submit it "
                                 "again", "runner_error", 500)
        return True
