"""A request's image URLs, downloaded by whoever runs it, never by the submit (which answers at once).

The stand-alone worker calls :func:`fetch_inputs` before it generates; ComfyUI's backend asks :class:`Prefetch`,
which downloads on a few threads of its own, so that its watcher never waits on the network. The rules are
:mod:`.fetch`'s (nothing inside the network, a size cap, one deadline per download) and the images are checked as
a submitted data URI is (:func:`.inputs.check_images`). A URL the server may not or cannot fetch, or whose image is
refused, ends the request as fal does: COMPLETED with an error naming the field, the result route answering 422 with
fal's ``detail`` list.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor

from .inputs import Limits, check_images, download
from .protocol import HttpError
from .store import INPUT_NAMES, Job, Store, StoreUnavailable

log = logging.getLogger("sdxl_controlnet_img2img.serve")
THREADS = 4  # :class:`Prefetch`'s downloads at once


def pending(store: Store, job: Job) -> list[str]:
    """The inputs of ``job`` given as URLs whose bytes are not stored yet."""
    return [name for name in INPUT_NAMES if job.args.get(name) and not store.has_input(job.id, name)]


def fetch_inputs(store: Store, job: Job, limits: Limits) -> bool:
    """Downloads and checks ``job``'s image URLs, then stores their bytes: True when every input is stored, False when
    the request ended instead (refused: failed with 422 naming the field; or it ended meanwhile, e.g. cancelled).
    :class:`StoreUnavailable` when the store cannot take them (the request is tried again later)."""
    names = pending(store, job)
    if not names:
        return True
    fetched = {}
    try:
        for name in names:
            store.log(job.id, f"downloading {name}")
            fetched[name] = download(name, job.args[name], limits)
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
        if not store.put_input(job.id, name, data):
            return False
    return True


class Prefetch:
    """Downloads waiting requests' image URLs on ``threads`` threads of its own; ``on_done()`` is called after each
    request's downloads (ComfyUI's backend: its watcher wakes and hands the request to ComfyUI's queue)."""

    def __init__(self, store: Store, limits: Limits | None = None, on_done=None, threads: int = THREADS):
        self.store = store
        self.limits = limits or Limits()
        self.on_done = on_done
        self._busy: set[str] = set()
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="sdxlcn-serve-fetch")

    def ready(self, job: Job) -> bool:
        """True when every input of ``job`` is stored; else its downloads start (once) and False."""
        if not pending(self.store, job):
            return True
        with self._lock:
            if job.id in self._busy:
                return False
            self._busy.add(job.id)
        self._pool.submit(self._fetch, job)
        return False

    def _fetch(self, job: Job) -> None:
        try:
            fetch_inputs(self.store, job, self.limits)
        except StoreUnavailable as exc:  # stored at a later try
            log.warning("serve: the images of request %s could not be stored (%s); trying again", job.id, exc)
        finally:
            with self._lock:
                self._busy.discard(job.id)
            if self.on_done is not None:
                self.on_done()
