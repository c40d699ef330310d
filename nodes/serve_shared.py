"""ComfyUI as a node of a shared queue on Redis (``SDXLCN_SERVE_QUEUE=redis://...``, the URL ``serve --queue``
takes): its ``/sdxlcn/fal`` answers for every request of the queue, and it runs requests as a worker does, one at a
time and only while its own prompt queue is idle, each as a prompt of that queue (it shows there, its prompt id is
the request id, ComfyUI's Cancel stops it). Several ComfyUI boxes and plain ``serve`` workers so form one endpoint.

The queue's part is ``pipeline/serve``'s (:mod:`~..pipeline.serve.redis_store`, :mod:`~..pipeline.serve.redis_worker`:
RQ hands the request over, the heartbeats hold it, a ComfyUI that dies loses it to another worker); the prompt's
part is :class:`~.serve_queue.ComfyQueueBackend`'s, which hands a request to ComfyUI's queue and follows it there.
Without the packages (``rq``, ``redis``) the endpoint says so in ComfyUI's log, in one line naming them; the pack's
nodes work either way.
"""

from __future__ import annotations

import time

from ..pipeline.serve.downloads import fetch_inputs
from ..pipeline.serve.shared_queue import QUEUE_ENV
from .comfy_hooks import log
from .serve_queue import POLL_S, ComfyQueueBackend, interrupt

__all__ = ["QUEUE_ENV", "SharedComfyBackend", "comfy_workers", "open_shared"]


class SharedComfyBackend(ComfyQueueBackend):
    """ComfyUI's backend on a shared queue: requests come from RQ (:class:`ComfyWorkers`), not from the store's list
    of waiting requests, and a waiting request's position is the shared queue's."""

    takes_waiting = False

    def __init__(self, instance, store, models=None):
        super().__init__(instance, store, models)
        self.workers = None  # ComfyWorkers, once started

    def health(self) -> str | None:
        return self.store.health() or super().health()

    def position(self, job):
        return None  # the shared queue's (RedisStore.position)

    def idle(self) -> bool:
        """Nothing runs or waits in ComfyUI's own queue, and no request of ours is in it."""
        running, pending = self.instance.prompt_queue.get_current_queue_volatile()
        return not running and not pending and not self.handed

    def run_in_comfy(self, job) -> None:
        """Hands ``job`` (IN_PROGRESS, held by this worker's run) to ComfyUI's queue and waits until the watcher
        stored its outcome; a cancel asked through any node stops it there."""
        loop = getattr(self.instance, "loop", None)
        while loop is None or not loop.is_running():
            time.sleep(POLL_S)
            loop = getattr(self.instance, "loop", None)
        if not fetch_inputs(self.store, job, self.limits):
            return  # an image URL refused: ended with a 422 naming it
        self._put(job, loop)
        self.wake.set()
        stopped = False
        while True:
            current = self.store.get(job.id)
            if current is None or current.state == "COMPLETED":
                return
            if not stopped and current.cancel:
                stopped = True
                running, pending = self.instance.prompt_queue.get_current_queue_volatile()
                if any(item[1] == job.id for item in running):
                    interrupt()  # as ComfyUI's Cancel: its history says interrupted, the watcher ends it cancelled
                elif self.instance.prompt_queue.delete_queue_item(lambda item: item[1] == job.id):
                    from ..pipeline.errors import GenerationCancelled
                    from ..pipeline.serve.worker import store_failure

                    self._cleanup(job.id)
                    store_failure(self.store, job.id, GenerationCancelled("cancelled"))
            time.sleep(POLL_S)


def comfy_workers(backend: SharedComfyBackend):
    """The RQ worker that feeds ComfyUI (one: ComfyUI runs one prompt at a time)."""
    from ..pipeline.serve.redis_worker import RedisWorkers

    class ComfyWorkers(RedisWorkers):
        def execute(self, device, pipe, job) -> None:
            backend.run_in_comfy(job)

        def ready_for_work(self) -> bool:
            return backend.idle()

    workers = ComfyWorkers(backend.store, {"comfyui": None}, generate=lambda *a, **k: None)
    backend.workers = workers
    return workers


def open_shared(url: str, folder):
    """(store, backend, workers started) for ComfyUI on the shared queue ``url``; ``SDXLCNError`` in one line when
    the packages are missing or the URL is not one."""
    from ..pipeline.serve.redis_conn import check_url, require_packages
    from ..pipeline.serve.redis_store import RedisStore
    from ..pipeline.serve.shared_queue import share_signing_key

    check_url(url, QUEUE_ENV)
    require_packages(QUEUE_ENV)
    store = RedisStore(url, folder)
    problem = store.health()
    if problem:
        log.warning("SDXL ControlNet: %s; submits answer 503 and this ComfyUI takes requests once it answers", problem)
    else:
        share_signing_key(store)
    return store
