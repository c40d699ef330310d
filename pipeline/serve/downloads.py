"""A request's image URLs, downloaded ahead of its run by a few threads of their own (never by the submit, which
answers at once, nor by a worker, which a slow URL would hold while other requests wait).

:class:`Prefetch` downloads the inputs of the next few waiting requests (:data:`AHEAD`, in the order they run), so
that a URL that never answers holds one download thread and its own request, no one else's: the stand-alone
workers claim only requests whose inputs are stored (:meth:`.store.Store.claim`), ComfyUI's backend hands a request
to ComfyUI's queue once they are. All of a request's downloads share one deadline (``download_timeout_s``). The
rules are :mod:`.fetch`'s (nothing inside the network, a size cap) and the images are checked as a submitted data URI
is (:func:`.inputs.check_images`). A URL the server may not or cannot fetch, or whose image is refused, ends the
request as fal does: COMPLETED with an error naming the field, the result route answering 422 with fal's ``detail``
list; an image the server's disk has no room for (below its free-space floor) ends it with 507 naming the field.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from .disk import LowDisk
from .inputs import Limits, check_images, download
from .protocol import HttpError
from .store import Job, Store, StoreUnavailable, pending_inputs

log = logging.getLogger("sdxl_controlnet_img2img.serve")
THREADS = 4  # downloads at once
AHEAD = 4  # only the next this many waiting requests have their images downloaded (and stored) before they run


def pending(store: Store, job: Job) -> list[str]:
    """The inputs of ``job`` given as URLs whose bytes are not stored yet."""
    return pending_inputs(store, job)


def fetch_inputs(store: Store, job: Job, limits: Limits) -> bool:
    """Downloads and checks ``job``'s image URLs, then stores their bytes: True when every input is stored, False when
    the request ended instead (refused: failed with 422 naming the field, or 507 when the disk has no room for it; or
    it ended meanwhile, e.g. cancelled). :class:`StoreUnavailable` when the store cannot take them (the request is
    tried again later)."""
    names = pending(store, job)
    if not names:
        return True
    fetched = {}
    deadline = time.monotonic() + limits.download_timeout_s  # one for all of the request's images
    try:
        for name in names:
            store.log(job.id, f"downloading {name}")
            fetched[name] = download(name, job.args[name], limits, deadline)
        check_images(fetched, job.args.get("image_size"), limits)
    except HttpError as exc:  # one field refused, in fal's shape
        item = exc.detail[0]
        where = ".".join(str(part) for part in item["loc"][1:])
        store.fail(job.id, f"{where}: {item['msg']}", "validation_error", exc.status, exc.detail)
        log.info("serve: request %s refused: %s could not be used", job.id, where)
        return False
    except Exception as exc:  # noqa: BLE001 - a fault of this server: the request ends, it is not tried forever
        log.exception("serve: downloading the images of request %s failed", job.id)
        store.fail(job.id, f"downloading the input images failed: {type(exc).__name__}", "runner_error", 500)
        return False
    for name, data in fetched.items():
        try:
            if not store.put_input(job.id, name, data):
                return False
        except LowDisk as exc:
            msg = f"the downloaded image could not be stored: {exc}"
            store.fail(job.id, f"{name}: {msg}", "runner_error", 507,
                       [{"loc": ["body", name], "msg": msg, "type": "value_error.disk_full"}])
            log.warning("serve: request %s ended: its %s could not be stored (%s)", job.id, name, exc)
            return False
    return True


class Prefetch:
    """Downloads the image URLs of the next ``ahead`` waiting requests on ``threads`` threads of its own;
    ``on_done()`` is called after each request's downloads (ComfyUI's backend: its watcher wakes and hands the
    request to ComfyUI's queue). :meth:`watch` (the stand-alone server) or the caller's own loop (:meth:`ready`)
    finds the requests."""

    def __init__(self, store: Store, limits: Limits | None = None, on_done=None, threads: int = THREADS,
                 ahead: int = AHEAD):
        self.store = store
        self.limits = limits or Limits()
        self.on_done = on_done
        self.ahead = ahead
        self._busy: set[str] = set()
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="sdxlcn-serve-fetch")

    def ready(self, job: Job) -> bool:
        """True when every input of ``job`` is stored; else False, and its downloads start (once) if it is among the
        next ``ahead`` requests to run."""
        if not pending(self.store, job):
            return True
        with self._lock:
            if job.id in self._busy:
                return False
        if self.store.position(job) >= self.ahead:  # its turn to download comes as those before it run
            return False
        with self._lock:
            if job.id in self._busy:
                return False
            self._busy.add(job.id)
        self._pool.submit(self._fetch, job)
        return False

    def watch(self, stopping: threading.Event) -> None:
        """Starts the downloads of waiting requests as they come and move up, until ``stopping`` is set."""
        while not stopping.is_set():
            seen = self.store.changed.count
            try:
                for job in self.store.jobs("IN_QUEUE"):
                    self.ready(job)
            except Exception as exc:  # noqa: BLE001 - the store's trouble: looked at again after a pause
                log.warning("serve: looking for image URLs to download failed (%s); trying again", exc)
                stopping.wait(1.0)
            self.store.wait(lambda: stopping.is_set() or self.store.changed.count != seen, 5.0)

    def stop(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _fetch(self, job: Job) -> None:
        try:
            fetch_inputs(self.store, job, self.limits)
        except StoreUnavailable as exc:  # stored at a later try
            log.warning("serve: the images of request %s could not be stored (%s); trying again", job.id, exc)
        except Exception:  # noqa: BLE001 - a thread of the pool: said, and the request looked at again
            log.exception("serve: the downloads of request %s failed", job.id)
        finally:
            with self._lock:
                self._busy.discard(job.id)
            if self.on_done is not None:
                self.on_done()
