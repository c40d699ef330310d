"""The backend of ComfyUI's endpoint (``/sdxlcn/fal``): the store's requests run as prompts of ComfyUI's own queue.

A watcher thread hands each waiting request to ComfyUI's queue (its prompt id is the request id) and follows it
there: running, finished (its history entry, copied into the store), or gone. A request ends as fal's cancel ends it
(COMPLETED, ``request_cancelled``; the result route 400 ``Request cancelled``), its input files deleted, when

- fal's cancel reaches it while it waits in ComfyUI's queue: its prompt is taken out of that queue (and interrupted at
  its first node, should ComfyUI start it meanwhile);
- ComfyUI's user takes it out of the queue (Clear Queue, or Delete on the item: ``POST /queue`` with ``clear`` or
  ``delete``): its prompt is in neither the queue nor the history any more;
- ComfyUI's Cancel interrupts it while it runs.

fal's queue headers (:mod:`pipeline.serve.fal_headers`) hold in ComfyUI's queue too:

- ``x-fal-request-timeout``: the watcher ends the requests past their timeout at each turn (the store's rule,
  ``expire_waiting``), and its turns come at once when ComfyUI's queue changes (its ``status`` event), so a request
  counts as started when the watcher saw ComfyUI take it before its time was up. One whose prompt still waits in
  ComfyUI's queue leaves it as a cancelled one does (``_ended``; interrupted, should ComfyUI have taken it), and a
  result read after its request ended (timed out or cancelled) is dropped: it never replaces that outcome.
- ``x-fal-queue-priority``: requests are handed over in the store's run order (normal ones first), and a prompt's
  number in ComfyUI's queue (which runs the lowest first: ``PromptQueue`` is a heap, and ``POST /prompt`` takes a
  ``number`` as well) is ComfyUI's next one plus ``LOW_NUMBERS`` per priority level below normal, so a normal request
  handed over later, or any prompt ComfyUI numbers itself, still runs before the low ones waiting there.

ComfyUI's queue lives in memory: the prompts this process handed over are all it can hold of ours (``handed``).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

from ..pipeline.serve.downloads import Prefetch
from ..pipeline.serve.fal_headers import PRIORITIES
from ..pipeline.serve.queue_rules import run_key
from ..pipeline.serve.store import StoreUnavailable
from .comfy_hooks import log
from .serve_models import Refusal, ServedModels, comfy_refusal_text, one_line
from .serve_workflow import served_outputs, workflow_for

CLEARED = "removed from ComfyUI's queue there (Clear Queue or Delete); the request is cancelled"
POLL_S = 0.25
LOW_NUMBERS = 10**12  # added to a prompt's number per priority level below normal: after every prompt ComfyUI
# numbers (its counter, one per prompt), in order among their own


def interrupt() -> None:
    import comfy.model_management  # type: ignore

    comfy.model_management.interrupt_current_processing(True)  # what ComfyUI's Cancel does


class ComfyQueueBackend:
    """Runs the store's requests through ComfyUI's prompt queue; a watcher thread follows them there."""

    takes_waiting = True  # hand every waiting request to ComfyUI's queue (on a shared queue RQ hands them over)

    def __init__(self, instance, store, models: ServedModels | None = None):
        self.instance = instance
        self.store = store
        self.models = models or ServedModels()
        self.wake = threading.Event()
        # a request's image URLs are downloaded on threads of their own before it is handed over: never the watcher
        self.prefetch = Prefetch(store, on_done=self.wake.set)
        self.handed: dict[str, bool] = {}  # request id -> interrupted by us: the prompts we put in ComfyUI's queue
        self.thread = threading.Thread(target=self._loop, name="sdxlcn-serve-comfy", daemon=True)
        original = instance.send_sync

        def send_sync(event, data, sid=None):  # ComfyUI's events for our prompts (sent from its worker thread)
            try:
                if event == "status":  # its queue changed (a prompt taken, finished, put or deleted): look at once
                    self.wake.set()
                elif isinstance(data, dict) and data.get("prompt_id") in self.handed:
                    self._event(event, data)
            except Exception:  # noqa: BLE001 - never break ComfyUI's messages
                pass
            return original(event, data, sid)

        instance.send_sync = send_sync

    def _event(self, event: str, data: dict) -> None:
        rid = data["prompt_id"]
        if event == "executing" and data.get("node") is not None:
            job = self.store.get(rid)
            if job is None or job.state == "COMPLETED":  # ended (cancelled) while ComfyUI took it: it runs nothing
                interrupt()
        elif event == "progress":
            self.store.log(rid, f"step {data.get('value')}/{data.get('max')}")

    @property
    def limits(self):
        return self.prefetch.limits

    @limits.setter
    def limits(self, limits) -> None:  # the server's (ServeApp sets them): image URLs are downloaded under them
        self.prefetch.limits = limits

    # Backend
    def queued(self, job) -> None:
        self.wake.set()

    def cancel(self, job) -> None:
        running, _pending = self.instance.prompt_queue.get_current_queue_volatile()
        if any(item[1] == job.id for item in running):
            interrupt()
        self.wake.set()

    def hooks(self) -> frozenset:
        return frozenset({"enable_safety_checker", "expand_prompt", "loras"})  # run when ComfyUI's folders hold
        # their models (refuse() names what is missing)

    def health(self) -> str | None:
        """Why no request can run (the endpoint's own models absent), else None: submits get 503, ``/ready`` too."""
        return self.models.missing()

    def refuse(self, args: dict):
        """The 422 for a field asking for a model this ComfyUI lacks (before the request is given an id)."""
        refusal = self.models.field_refusal(args)
        if refusal is not None:
            raise refusal.http_error()

    def position(self, job):
        _running, pending = self.instance.prompt_queue.get_current_queue_volatile()
        ahead = sorted(item[0] for item in pending)
        mine = [item[0] for item in pending if item[1] == job.id]
        return ahead.index(mine[0]) if mine else None

    def start(self) -> "ComfyQueueBackend":
        self.thread.start()
        return self

    # ---- the watcher ----------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            self.wake.wait(POLL_S)
            self.wake.clear()
            try:
                self._step()
            except Exception:  # noqa: BLE001 - the watcher must keep watching
                log.exception("SDXL ControlNet serve: following ComfyUI's queue failed")

    def _step(self) -> None:
        loop = getattr(self.instance, "loop", None)
        if loop is None or not loop.is_running():
            return
        queue = self.instance.prompt_queue
        if self.takes_waiting:  # past their x-fal-request-timeout: ended, their prompts taken out below
            self.store.expire_waiting()
        waiting = sorted(self.store.jobs("IN_QUEUE"), key=run_key) if self.takes_waiting else ()  # normal first
        for job in waiting:  # (a shared queue's come from RQ: serve_shared.py)
            if job.external is None and job.id not in self.handed and self.prefetch.ready(job):
                try:
                    self._put(job, loop)
                except StoreUnavailable:
                    raise  # the store's trouble: tried again at the next turn
                except Exception as exc:  # noqa: BLE001 - one request that cannot be handed over ends, not the watcher
                    log.exception("SDXL ControlNet serve: request %s could not be queued in ComfyUI", job.id)
                    self._cleanup(job.id)
                    self.store.fail(job.id, one_line(f"it could not be queued in ComfyUI: {type(exc).__name__}: "
                                                     f"{exc}"), "runner_error", 500)
        # one snapshot of the queue, then the history: a prompt moves from the queue to running and from running to
        # the history under the queue's lock, so one in none of the three was taken out by ComfyUI's user
        running, pending = queue.get_current_queue_volatile()
        running_ids, pending_ids = {item[1] for item in running}, {item[1] for item in pending}
        for rid in list(self.handed):
            job = self.store.get(rid)
            if job is None or job.state == "COMPLETED":
                self._ended(rid, queue, rid in running_ids, rid in pending_ids)
            elif rid in running_ids:
                self._started(rid, job)
            elif rid not in pending_ids:
                hist = queue.get_history(prompt_id=rid).get(rid)
                if hist and hist.get("status", {}).get("completed") is not None:
                    self._finish(job, hist)
                else:
                    self._vanished(job)

    def _started(self, rid: str, job=None) -> bool:
        """Marks a request whose prompt ComfyUI took as started, unless it ended first; True when it runs."""
        job = job or self.store.get(rid)
        if job is not None and job.state == "IN_QUEUE":
            self.store.start(rid, external=rid)
            job = self.store.get(rid)
        return job is not None and job.state == "IN_PROGRESS"

    def _ended(self, rid: str, queue, running: bool, pending: bool) -> None:
        """A request that ended in the store while it waited (cancelled, or past its timeout) whose prompt ComfyUI may
        still hold."""
        if pending:
            if queue.delete_queue_item(lambda item: item[1] == rid):
                job = self.store.get(rid)
                log.info("SDXL ControlNet serve: request %s ended (%s); its prompt is out of ComfyUI's queue", rid,
                         job.error_type if job is not None else "gone")
                self._cleanup(rid)
            return  # else ComfyUI took it meanwhile: interrupted at its first node, and at the next turn
        if running:
            if not self.handed.get(rid):
                self.handed[rid] = True
                interrupt()
            return  # its files go once it stops
        self._cleanup(rid)

    def _vanished(self, job) -> None:
        """Its prompt is in none of ComfyUI's queue, running prompts and history: ComfyUI's user removed it."""
        from ..pipeline.errors import GenerationCancelled
        from ..pipeline.serve.worker import store_failure

        self.store.log(job.id, CLEARED, "WARNING")
        if job.state == "IN_QUEUE":
            if self.store.cancel(job.id) == "requested":
                store_failure(self.store, job.id, GenerationCancelled("cancelled"))
        else:  # it ran, and its history entry went before its result was read (History cleared)
            self.store.fail(job.id, "its outcome was removed from ComfyUI's history before it was read; submit it "
                                    "again", "runner_error", 500)
        log.info("SDXL ControlNet serve: request %s was %s", job.id, CLEARED)
        self._cleanup(job.id)

    def _refused(self, job, refusal: Refusal) -> None:
        if refusal.status == 422:
            where = ".".join(str(p) for p in refusal.loc[1:])
            self.store.fail(job.id, f"{where}: {refusal.text}", "validation_error", 422,
                            [{"loc": refusal.loc, "msg": refusal.text, "type": "value_error"}])
        else:
            self.store.fail(job.id, refusal.text, "runner_error", refusal.status, refusal.text)
        log.warning("SDXL ControlNet serve: request %s cannot run: %s", job.id, refusal.text)

    def _put(self, job, loop) -> None:
        import asyncio

        import execution  # type: ignore

        refusal = self.models.refusal(job.args)
        if refusal is not None:  # a model went after the request was accepted
            self._refused(job, refusal)
            return
        names = self._write_inputs(job)
        wf = workflow_for(job.args, names["image_url"], names["control_image_url"], **self.models.names)
        valid = asyncio.run_coroutine_threadsafe(execution.validate_prompt(job.id, wf, None), loop).result(60)
        if not valid[0]:
            self._cleanup(job.id)
            self.store.fail(job.id, comfy_refusal_text(valid[1], valid[3]), "runner_error", 500)
            log.warning("SDXL ControlNet serve: ComfyUI refused the workflow of request %s: %s", job.id, valid[1])
            return
        number = self.instance.number + (PRIORITIES["normal"] - job.priority) * LOW_NUMBERS  # see the module
        self.instance.number += 1
        extra = {"create_time": int(time.time() * 1000)}
        self.store.set_external(job.id, job.id)
        self.handed[job.id] = False
        self.instance.prompt_queue.put((number, job.id, wf, extra, valid[2], {}))
        self.store.log(job.id, "queued in ComfyUI")

    def _write_inputs(self, job) -> dict:
        import folder_paths  # type: ignore

        names = {}
        for field in ("image_url", "control_image_url"):
            names[field] = input_name(job.id, field.split("_")[0])
            (Path(folder_paths.get_input_directory()) / names[field]).write_bytes(self.store.input_bytes(job.id, field))
        return names

    def _finish(self, job, hist: dict) -> None:
        import folder_paths  # type: ignore

        from ..pipeline.serve.worker import store_failure

        status = hist.get("status", {})
        self._cleanup(job.id)
        if not self._started(job.id, job):  # it ran between two turns, and its request ended meanwhile (timed out,
            return  # cancelled): that outcome stays
        if status.get("status_str") != "success":
            kinds = {m[0]: m[1] for m in status.get("messages", []) if isinstance(m, (list, tuple)) and len(m) == 2}
            if "execution_interrupted" in kinds or self.store.cancel_requested(job.id):
                from ..pipeline.errors import GenerationCancelled

                store_failure(self.store, job.id, GenerationCancelled("cancelled"))
                return
            refusal = self.models.refusal(job.args)  # a model removed after the request was handed over
            if refusal is not None:
                self._refused(job, refusal)
                return
            err = kinds.get("execution_error", {})
            self.store.fail(job.id, one_line(f"generation failed in {err.get('node_type', 'ComfyUI')}: "
                                             f"{err.get('exception_message', 'no reason given')}"), "runner_error", 500)
            return
        from PIL import Image

        items, seed, flags = served_outputs(hist.get("outputs", {}))
        images, entries = [], []
        for item in items:
            folder = Path(folder_paths.get_directory_by_type("output"))
            path = (folder / item.get("subfolder", "") / item["filename"]).resolve()
            data = path.read_bytes()
            with Image.open(path) as im:
                entries.append({"width": im.width, "height": im.height, "content_type": "image/png"})
            images.append(data)
        n = len(images)
        if flags is None or len(flags) != n:
            flags = [False] * n  # the safety checker did not run (its flags are one per image when it does)
        doc = {"images": entries, "seed": seed if seed is not None else job.args.get("seed"),
               "has_nsfw_concepts": [bool(f) for f in flags], "prompt": job.args.get("prompt", ""), "timings": {}}
        self.store.complete(job.id, doc, images)

    def _cleanup(self, request_id: str) -> None:
        """The request's input files in ComfyUI's input folder go, and it is no longer followed."""
        import folder_paths  # type: ignore

        for part in ("image", "control"):
            p = Path(folder_paths.get_input_directory()) / input_name(request_id, part)
            try:
                p.unlink()
            except OSError:
                pass
        self.handed.pop(request_id, None)


def input_name(request_id: str, part: str) -> str:
    """A served request's input file in ComfyUI's input folder (``part``: image, control)."""
    return f"sdxlcn_serve_{request_id}_{part}.png"
