"""The stand-alone server's backend: one worker thread per device, each with its own loaded pipeline, taking the
oldest waiting request from the store, running it with the local pipeline and storing its result.

Progress goes to the request's logs (``step i/n``), which fal's clients read with ``logs=1``; a cancel is seen at
the next denoising step. Errors are stored in fal's shapes: a request the pipeline refuses answers 422 naming the
field, anything else 500 with the error's text.
"""

from __future__ import annotations

import logging
import threading

from ..errors import GenerationCancelled, ImageInputError, RequestError
from ..images import encode_image
from .inputs import field_loc, run_request
from .store import INPUT_NAMES, Job, Store

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


def store_failure(store: Store, job_id: str, exc: BaseException) -> None:
    """A failed run in fal's shapes: cancelled (400), refused input (422 naming the field), other (500)."""
    if isinstance(exc, GenerationCancelled):
        store.fail(job_id, "Request cancelled", "request_cancelled", 400, "Request cancelled")
    elif isinstance(exc, (RequestError, ImageInputError)):
        text = str(exc)
        msg = text[len(exc.field) + 2:] if text.startswith(f"{exc.field}: ") else text
        store.fail(job_id, text, "validation_error", 422,
                   [{"loc": field_loc(exc.field), "msg": msg, "type": "value_error"}])
    else:
        store.fail(job_id, f"generation failed: {type(exc).__name__}: {exc}", "runner_error", 500)


class LocalWorkers:
    """``pipes``: one loaded pipeline per device (``{device name: pipeline}``); one thread each."""

    def __init__(self, store: Store, pipes: dict, generate=None):
        if generate is None:
            from ..local.generate import generate
        self.store = store
        self.pipes = pipes
        self.generate = generate
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self._loop, args=(name, pipe), name=f"sdxlcn-serve-{name}",
                                         daemon=True) for name, pipe in pipes.items()]

    # Backend
    def queued(self, job: Job) -> None:
        with self.store.changed:
            self.store.changed.notify_all()

    def cancel(self, job: Job) -> None:
        log.info("serve: cancel asked for running request %s (stops at its next step)", job.id)

    def hooks(self) -> frozenset:
        return frozenset()

    def start(self) -> "LocalWorkers":
        for t in self.threads:
            t.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self.stopping.set()
        with self.store.changed:
            self.store.changed.notify_all()
        for t in self.threads:
            t.join(timeout)

    def _loop(self, device: str, pipe) -> None:
        while not self.stopping.is_set():
            job = self.store.claim()
            if job is None:
                self.store.wait(lambda: self.stopping.is_set() or self.store.waiting() > 0, 5.0)
                continue
            self.run_one(device, pipe, job)

    def run_one(self, device: str, pipe, job: Job) -> None:
        store = self.store
        store.log(job.id, f"running on {device}")

        def on_step(step, total, _latents=None):
            store.log(job.id, f"step {step}/{total}")
            if store.cancel_requested(job.id) or self.stopping.is_set():
                raise GenerationCancelled("cancelled")

        try:
            request = run_request(job.args, {n: store.input_bytes(job.id, n) for n in INPUT_NAMES})
            result = self.generate(pipe, request, on_step=on_step)
            doc, images = result_doc(result)
        except BaseException as exc:  # noqa: BLE001 - stored for the client; a worker must outlive a bad request
            if self.stopping.is_set() and not store.cancel_requested(job.id):
                return  # shutting down: the store requeues it at the next start
            if not isinstance(exc, (GenerationCancelled, RequestError, ImageInputError)):
                log.exception("serve: request %s failed", job.id)
            store_failure(store, job.id, exc)
            if not isinstance(exc, Exception):
                raise
            return
        store.complete(job.id, doc, images)
        store.log(job.id, f"done: {len(images)} image(s), seed {doc['seed']}")
        log.info("serve: request %s done on %s", job.id, device)
