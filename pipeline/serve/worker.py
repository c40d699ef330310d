"""The stand-alone server's backend: one worker thread per device, each with its own loaded pipeline, taking the
next waiting request from the store, running it with the local pipeline and storing its result.

A request's image URLs are downloaded ahead of its run by the backend's own download threads (:mod:`.downloads`,
under the server's limits), never by a worker: a worker takes only a request whose inputs are stored, so a slow URL
delays its own request only; a URL that cannot be used ends the request with a 422 naming the field. Progress goes
to the request's logs (``step i/n``), which fal's clients read with ``logs=1``; a cancel is seen at the next
denoising step. Errors are stored in fal's shapes: a request the pipeline refuses answers 422 naming the field,
anything else 500 with the error's text.

A worker outlives its store: every turn of its loop is guarded, the store retries a transient error (a lock held
elsewhere, a full disk) with back-off, and a turn that fails anyway costs a pause, not the thread. While a worker's
turns fail, :meth:`LocalWorkers.health` says why (the HTTP layer answers ``/ready`` and submits with 503), and a
request a failed turn left IN_PROGRESS is settled as soon as the store takes writes again: failed with 500 when its
result could not be stored, queued again when it never ran.
"""

from __future__ import annotations

import logging
import sqlite3
import threading

from ..errors import GenerationCancelled, ImageInputError, RequestError
from ..images import encode_image
from .downloads import Prefetch, fetch_inputs
from .extras import Extras
from .inputs import Limits, field_loc, run_request
from .store import INPUT_NAMES, Job, Store, StoreUnavailable

log = logging.getLogger("sdxl_controlnet_img2img.serve")


def result_doc(result) -> tuple[dict, list[bytes]]:
    """(fal's output with file entries instead of URLs, the PNG bytes) of a :class:`GenerationResult`."""
    images, entries = [], []
    for img in result.images:
        data, ctype = encode_image(img, "png")
        images.append(data)
        entries.append({"width": img.width, "height": img.height, "content_type": ctype})
    doc = {"images": entries, "seed": result.seed, "has_nsfw_concepts": list(result.has_nsfw_concepts),
           "prompt": result.prompt, "timings": {k: round(float(v), 4) for k, v in result.timings.items()}}
    if result.expanded_prompt is not None:
        doc["expanded_prompt"] = result.expanded_prompt
    return doc, images


def all_failing(trouble: dict) -> str | None:
    """Why no request can run when every worker (``{device: why, or None when it works}``) fails; None otherwise."""
    bad = {d: why for d, why in trouble.items() if why}
    if bad and len(bad) == len(trouble):
        return "every worker fails: " + "; ".join(f"{d}: {why}" for d, why in bad.items())
    return None


def store_failure(store: Store, job_id: str, exc: BaseException) -> None:
    """A failed run in fal's shapes: cancelled (400), refused input (422 naming the field), other (500)."""
    if isinstance(exc, GenerationCancelled):
        store.fail(job_id, "Request cancelled", "request_cancelled", 400, "Request cancelled")
    elif isinstance(exc, (RequestError, ImageInputError)):
        store.fail(job_id, str(exc), "validation_error", 422,
                   [{"loc": field_loc(exc.field), "msg": exc.detail, "type": "value_error"}])
    else:
        store.fail(job_id, f"generation failed: {type(exc).__name__}: {exc}", "runner_error", 500)


class LocalWorkers:
    """``pipes``: one loaded pipeline per device (``{device name: pipeline}``); one thread each."""

    def __init__(self, store: Store, pipes: dict, generate=None, extras: Extras | None = None):
        if generate is None:
            from ..local.generate import generate
        self.store = store
        self.extras = extras or Extras()  # loras, safety checker, prompt expansion: what this server runs
        self.pipes = pipes
        self.generate = generate
        self.prefetch = Prefetch(store, Limits())
        self.stopping = threading.Event()
        self.trouble: dict[str, str | None] = {name: None for name in pipes}  # device -> why its last turn failed
        self._claiming = threading.Lock()  # claiming a request and marking it running are one step for the sweep
        self._running: set[str] = set()  # ids a thread runs now
        self._unstored: dict[str, tuple] = {}  # id -> (why its outcome was not stored, result doc, PNGs) or no result
        self._sweep = False  # a turn failed: look for requests left IN_PROGRESS
        self.threads = [threading.Thread(target=self._loop, args=(name, pipe), name=f"sdxlcn-serve-{name}",
                                         daemon=True) for name, pipe in pipes.items()]
        self._watcher = threading.Thread(target=self.prefetch.watch, args=(self.stopping,),
                                         name="sdxlcn-serve-prefetch", daemon=True)

    @property
    def limits(self) -> Limits:
        return self.prefetch.limits

    @limits.setter
    def limits(self, limits: Limits) -> None:  # the server's (ServeApp sets them): image URLs are downloaded under them
        self.prefetch.limits = limits

    # Backend
    def queued(self, job: Job) -> None:
        with self.store.changed:
            self.store.changed.notify_all()

    def cancel(self, job: Job) -> None:
        log.info("serve: cancel asked for running request %s (stops at its next step)", job.id)

    def hooks(self) -> frozenset:
        return self.extras.hooks()

    def refuse(self, args: dict) -> None:
        self.extras.refuse(args, self.limits.outbound)

    def health(self) -> str | None:
        """None while requests can be taken and run; else why not (the store, or every worker failing)."""
        problem = self.store.health()
        if problem:
            return problem
        alive = [t.name.rsplit("-", 1)[-1] for t in self.threads if t.is_alive()]
        if self.threads and self.threads[0].ident is not None and not alive:
            return "no worker thread is running; restart the server"
        return all_failing(self.trouble)

    def ready(self) -> bool:
        return self.health() is None

    def start(self) -> "LocalWorkers":
        self._watcher.start()
        for t in self.threads:
            t.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self.stopping.set()
        with self.store.changed:
            self.store.changed.notify_all()
        self.prefetch.stop()
        for t in self.threads:
            t.join(timeout)

    def _loop(self, device: str, pipe) -> None:
        pause = 1.0
        while not self.stopping.is_set():
            try:  # a turn that fails (the store unreachable past its retries) costs a pause, never the thread
                if self._sweep or self._unstored:
                    self._settle()
                seen = self.store.changed.count
                with self._claiming:
                    job = self.store.claim()
                    if job is not None:
                        self._running.add(job.id)
                if job is None:
                    self.trouble[device] = None
                    self.store.wait(lambda: self.stopping.is_set() or self.store.changed.count != seen, 5.0)
                    continue
                try:
                    self.run_one(device, pipe, job)
                finally:
                    self._running.discard(job.id)
                self.trouble[device] = None
                pause = 1.0
            except Exception as exc:  # noqa: BLE001
                self.trouble[device] = f"{type(exc).__name__}: {exc}"
                self._sweep = True
                log.error("serve: the worker on %s failed a turn (%s); trying again in %g s", device,
                          self.trouble[device], pause)
                self.stopping.wait(pause)
                pause = min(pause * 2, 30.0)

    def _settle(self) -> None:
        """Requests a failed turn left IN_PROGRESS: a result kept in memory is stored (failed with 500 when its files
        cannot be written), a failure stored, others queued again. Raises (the store still failing) to be tried at
        the next turn."""
        for rid, (why, doc, images) in list(self._unstored.items()):
            if doc is not None:  # the result is still here: stored now, if the store takes it
                try:
                    self.store.complete(rid, doc, images)
                    self._unstored.pop(rid, None)
                    log.warning("serve: the result of %s is stored after all", rid)
                    continue
                except StoreUnavailable as exc:
                    if isinstance(exc.__cause__, sqlite3.DatabaseError):
                        raise  # the database refused, not the files: the result is stored at a later turn
                    why = str(exc)
            self.store.fail(rid, f"the server could not store this request's outcome ({why}); submit it again",
                            "runner_error", 500)
            self._unstored.pop(rid, None)
        with self._claiming:
            for job in self.store.jobs("IN_PROGRESS"):
                if job.id not in self._running and self.store.requeue(
                        job.id, "a server fault interrupted this request before it ran; it is queued again"):
                    log.warning("serve: request %s was left in progress by a failed turn; queued again", job.id)
        self._sweep = False

    def run_one(self, device: str, pipe, job: Job) -> None:
        store = self.store
        store.log(job.id, f"running on {device}")

        def on_step(step, total, _latents=None):
            store.log(job.id, f"step {step}/{total}")
            try:
                cancelled = store.cancel_requested(job.id)
            except StoreUnavailable:  # a store fault does not stop a run: its cancel is seen at a later step
                cancelled = False
            if cancelled or self.stopping.is_set():
                raise GenerationCancelled("cancelled")

        # this box's workers take only requests whose inputs are stored (:meth:`Store.claim`); a runner without a
        # Prefetch of its own (the shared queue's, redis_worker.py) downloads them here
        if not fetch_inputs(store, job, self.limits):  # a store fault raises: the failed turn queues it again
            return
        try:
            request = run_request(job.args, {n: store.input_bytes(job.id, n) for n in INPUT_NAMES})
            request, hooks = self.extras.prepare(request, device, pipe, self.limits.outbound,
                                                 lambda line: store.log(job.id, line))
            result = self.generate(pipe, request, on_step=on_step, **hooks)
            doc, images = result_doc(result)
        except BaseException as exc:  # noqa: BLE001 - stored for the client; a worker must outlive a bad request
            if self.stopping.is_set() and not store.cancel_requested(job.id):
                return  # shutting down: the store requeues it at the next start
            if not isinstance(exc, (GenerationCancelled, RequestError, ImageInputError)):
                log.exception("serve: request %s failed", job.id)
            try:
                store_failure(store, job.id, exc)
            except StoreUnavailable as unstored:
                self._unstored[job.id] = (str(unstored), None, None)
                raise
            if not isinstance(exc, Exception):
                raise
            return
        try:
            store.complete(job.id, doc, images)
        except StoreUnavailable as exc:  # never left IN_PROGRESS: stored or failed at a later turn
            self._unstored[job.id] = (str(exc), doc, images)
            raise
        store.log(job.id, f"done: {len(images)} image(s), seed {doc['seed']}")  # the server's log line: events.py
