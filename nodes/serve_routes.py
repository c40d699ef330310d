"""fal's queue API for ``fal-ai/fast-sdxl-controlnet-canny/image-to-image`` on ComfyUI's own port, under
``/sdxlcn/fal`` (e.g. ``http://host:8188/sdxlcn/fal``; fal.js: ``proxyUrl`` ``http://host:8188/sdxlcn/fal/proxy``).

Each request runs through ComfyUI's prompt queue as the shipped API workflow (its prompt id is the request id), so
it shares the GPU under ComfyUI's model management, shows in ComfyUI's queue, and ComfyUI's Cancel stops it. Status,
queue position and log lines come from ComfyUI's queue and progress events; results are copied into the pack's store
(``user/sdxl_controlnet_img2img/serve``), so a finished result stays fetchable after a restart, and requests that had
not finished are queued again.

Server-side settings (environment, never a workflow): ``SDXLCN_SERVE_KEY`` or ``user/sdxl_controlnet_img2img/
serve_key.txt`` (the key clients send; without one only this machine may call), ``SDXLCN_SERVE_CHECKPOINT`` and
``SDXLCN_SERVE_CONTROLNET`` (names in ComfyUI's model folders; default: the shipped workflow's),
``SDXLCN_SERVE_CORS_ORIGINS``, ``SDXLCN_SERVE_PUBLIC_URL``, ``SDXLCN_SERVE_TRUSTED_PROXIES`` (as ``serve``'s
``--cors-origin``, ``--public-url``, ``--trusted-proxy``). Without a key the API refuses every call while ComfyUI
listens beyond loopback. The calls run through the same adapter as ``serve`` (``pipeline/serve/web.py``), on a few
threads of their own.
"""

from __future__ import annotations

import copy
import json
import os
import threading
import time
from pathlib import Path

from .comfy_hooks import log, prompt_server

PREFIX = "/sdxlcn/fal"
CORS_ENV = "SDXLCN_SERVE_CORS_ORIGINS"  # web page origins allowed to call it (with a key), comma-separated
PUBLIC_URL_ENV = "SDXLCN_SERVE_PUBLIC_URL"  # the API's base as clients reach it, e.g. https://gpu-box/sdxlcn/fal
PROXIES_ENV = "SDXLCN_SERVE_TRUSTED_PROXIES"  # reverse proxies whose X-Forwarded-Proto/-Host are believed
THREADS = 4
HELD: list = []  # the serve folder's lock, held while ComfyUI runs
WORKFLOW = Path(__file__).resolve().parent.parent / "workflows" / "api" / "sdxl_controlnet_img2img.json"
# the shipped workflow's nodes the served request reads back: the sampler, the SaveImage after it, and two of ComfyUI's
# own Preview as Text nodes added for the request, showing the sampler's seed and has_nsfw_concepts outputs in history
SAMPLER_NODE, SAVE_NODE, CONTROL_NODE, SEED_NODE, FLAGS_NODE = "4", "5", "6", "7", "8"
SAMPLER_FIELDS = ("prompt", "negative_prompt", "controlnet_conditioning_scale", "num_inference_steps",
                  "guidance_scale", "strength", "seed", "num_images", "enable_safety_checker", "expand_prompt")


def workflow_for(args: dict, image_name: str, control_name: str, checkpoint: str | None = None,
                 controlnet: str | None = None) -> dict:
    """The shipped API workflow for a stored request: its own LoadImage for each image, fal's Canny on the control
    image (unless ``apply_canny`` is false), the sampler's widgets from the request's fields."""
    wf = json.loads(WORKFLOW.read_text(encoding="utf-8"))
    wf["1"]["inputs"]["image"] = image_name
    wf[CONTROL_NODE] = {"class_type": "LoadImage", "inputs": {"image": control_name}}
    wf["2"]["inputs"]["image"] = [CONTROL_NODE, 0]
    if checkpoint:
        wf["3"]["inputs"]["checkpoint"] = checkpoint
    if controlnet:
        wf["3"]["inputs"]["controlnet"] = controlnet
    s = wf[SAMPLER_NODE]["inputs"]
    for name in SAMPLER_FIELDS:
        if name in args:
            s[name] = args[name]
    size = args.get("image_size")
    if isinstance(size, dict):
        s["image_size"], s["width"], s["height"] = "custom", int(size["width"]), int(size["height"])
    else:
        s["image_size"] = size or "none"
    s["scheduler"] = args.get("local_scheduler", s["scheduler"])
    s["control_start"] = args.get("local_control_start", s["control_start"])
    s["control_end"] = args.get("local_control_end", s["control_end"])
    s["timesteps"] = ", ".join(str(t) for t in args.get("local_timesteps") or ())
    if args.get("apply_canny", True) is False:
        s["control_image"] = [CONTROL_NODE, 0]
    s["image"] = ["1", 0]
    wf[SAVE_NODE]["inputs"]["filename_prefix"] = "sdxlcn_serve"
    wf[SEED_NODE] = {"class_type": "PreviewAny", "inputs": {"source": [SAMPLER_NODE, 1]}}
    wf[FLAGS_NODE] = {"class_type": "PreviewAny", "inputs": {"source": [SAMPLER_NODE, 2]}}
    return wf


def served_outputs(outputs: dict) -> tuple[list[dict], int | None, list | None]:
    """What a finished served prompt gave fal's caller, from its history ``outputs``: the generated images only (the
    SaveImage node's files, in order; never the Canny node's edge-map preview), the seed the sampler used and its
    ``has_nsfw_concepts``, as shown by the two Preview as Text nodes (None where absent)."""
    images = [item for item in outputs.get(SAVE_NODE, {}).get("images", []) if item.get("type") == "output"]

    def shown(node):
        text = outputs.get(node, {}).get("text") or [None]
        try:
            return json.loads(text[0]) if text[0] is not None else None
        except ValueError:
            return None

    seed, flags = shown(SEED_NODE), shown(FLAGS_NODE)
    return images, seed if isinstance(seed, int) else None, flags if isinstance(flags, list) else None


class ComfyQueueBackend:
    """Runs the store's requests through ComfyUI's prompt queue; a watcher thread follows them there."""

    def __init__(self, instance, store):
        self.instance = instance
        self.store = store
        self.wake = threading.Event()
        from ..pipeline.serve.downloads import Prefetch

        self.prefetch = Prefetch(store, on_done=self.wake.set)  # image URLs, downloaded before ComfyUI gets the prompt
        self.thread = threading.Thread(target=self._loop, name="sdxlcn-serve-comfy", daemon=True)
        original = instance.send_sync

        def send_sync(event, data, sid=None):  # ComfyUI's progress events, as log lines of our requests
            try:
                if isinstance(data, dict) and event == "progress" and self._ours(data.get("prompt_id")):
                    self.store.log(data["prompt_id"], f"step {data.get('value')}/{data.get('max')}")
            except Exception:  # noqa: BLE001 - never break ComfyUI's messages
                pass
            return original(event, data, sid)

        instance.send_sync = send_sync

    def _ours(self, prompt_id) -> bool:
        job = self.store.get(prompt_id) if isinstance(prompt_id, str) and len(prompt_id) == 36 else None
        return job is not None and job.state != "COMPLETED"

    # Backend
    def queued(self, job) -> None:
        self.wake.set()

    def cancel(self, job) -> None:
        queue = self.instance.prompt_queue
        running, _pending = queue.get_current_queue()
        if any(item[1] == job.id for item in running):
            import comfy.model_management  # type: ignore

            comfy.model_management.interrupt_current_processing(True)  # what ComfyUI's Cancel does
        self.wake.set()

    def hooks(self) -> frozenset:
        return frozenset({"enable_safety_checker", "expand_prompt"})  # ComfyUI's sampler node finds their models

    def position(self, job):
        _running, pending = self.instance.prompt_queue.get_current_queue()
        ahead = sorted(item[0] for item in pending)
        mine = [item[0] for item in pending if item[1] == job.id]
        return ahead.index(mine[0]) if mine else None

    def start(self) -> "ComfyQueueBackend":
        self.thread.start()
        return self

    # ---- the watcher ----------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            self.wake.wait(0.25)
            self.wake.clear()
            try:
                self._step()
            except Exception:  # noqa: BLE001 - the watcher must keep watching
                log.exception("SDXL ControlNet serve: following ComfyUI's queue failed")

    def _step(self) -> None:
        loop = getattr(self.instance, "loop", None)
        if loop is None or not loop.is_running():
            return
        for job in self.store.jobs("IN_QUEUE"):
            if job.external is None and self.prefetch.ready(job):
                self._put(job, loop)
        queue = self.instance.prompt_queue
        running, _pending = queue.get_current_queue()
        for item in running:
            if self._ours(item[1]):
                self.store.start(item[1], external=item[1])
        for job in self.store.jobs("IN_QUEUE") + self.store.jobs("IN_PROGRESS"):
            if job.external is None:
                continue
            hist = queue.get_history(prompt_id=job.id).get(job.id)
            if hist and hist.get("status", {}).get("completed") is not None:
                self._finish(job, hist)

    def _put(self, job, loop) -> None:
        import asyncio

        import execution  # type: ignore
        import folder_paths  # type: ignore

        names = {}
        for field in ("image_url", "control_image_url"):
            names[field] = f"sdxlcn_serve_{job.id}_{field.split('_')[0]}.png"
            (Path(folder_paths.get_input_directory()) / names[field]).write_bytes(self.store.input_bytes(job.id, field))
        wf = workflow_for(job.args, names["image_url"], names["control_image_url"],
                          os.environ.get("SDXLCN_SERVE_CHECKPOINT"), os.environ.get("SDXLCN_SERVE_CONTROLNET"))
        valid = asyncio.run_coroutine_threadsafe(execution.validate_prompt(job.id, wf, None), loop).result(60)
        if not valid[0]:
            self._cleanup(job.id)
            err = valid[1] if isinstance(valid[1], dict) else {"message": str(valid[1])}
            self.store.fail(job.id, f"ComfyUI refused the workflow: {err.get('message')} {err.get('details', '')}"
                            f" {json.dumps(valid[3])[:500]}", "runner_error", 500)
            return
        number = self.instance.number
        self.instance.number += 1
        extra = {"create_time": int(time.time() * 1000)}
        self.store.set_external(job.id, job.id)
        self.instance.prompt_queue.put((number, job.id, wf, extra, valid[2], {}))
        self.store.log(job.id, "queued in ComfyUI")

    def _finish(self, job, hist: dict) -> None:
        import folder_paths  # type: ignore

        from ..pipeline.serve.worker import store_failure

        status = hist.get("status", {})
        self._cleanup(job.id)
        if status.get("status_str") != "success":
            kinds = {m[0]: m[1] for m in status.get("messages", []) if isinstance(m, (list, tuple)) and len(m) == 2}
            if "execution_interrupted" in kinds or self.store.cancel_requested(job.id):
                from ..pipeline.errors import GenerationCancelled

                store_failure(self.store, job.id, GenerationCancelled("cancelled"))
                return
            err = kinds.get("execution_error", {})
            self.store.fail(job.id, f"{err.get('exception_type', 'error')}: {err.get('exception_message', '')}".strip(),
                            "runner_error", 500)
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

    @staticmethod
    def _cleanup(request_id: str) -> None:
        import folder_paths  # type: ignore

        for part in ("image", "control"):
            p = Path(folder_paths.get_input_directory()) / f"sdxlcn_serve_{request_id}_{part}.png"
            try:
                p.unlink()
            except OSError:
                pass


def comfy_listen_beyond_loopback() -> str | None:
    """An address ComfyUI listens on (``--listen``) that is not loopback, or None."""
    from ..pipeline.serve.access import is_loopback

    try:
        from comfy.cli_args import args  # type: ignore
    except ImportError:
        return None
    for address in str(getattr(args, "listen", "") or "").split(","):
        if address.strip() and not is_loopback(address.strip()):
            return address.strip()
    return None


def register_serve_routes() -> None:
    server = prompt_server()
    if server is None:
        return
    web, instance = server
    from concurrent.futures import ThreadPoolExecutor

    import folder_paths  # type: ignore

    from ..pipeline.serve.access import is_loopback, parse_origins, parse_proxies
    from ..pipeline.serve.app import ServeApp
    from ..pipeline.serve.datalock import lock_folder
    from ..pipeline.serve.httpd import read_key
    from ..pipeline.serve.store import Store
    from ..pipeline.serve.web import Adapter
    from ..pipeline.serve.webhook import Webhooks

    folder = Path(folder_paths.get_user_directory()) / "sdxl_controlnet_img2img"
    key_file = folder / "serve_key.txt"
    try:  # a failure here costs the endpoint, never the pack's nodes
        key = read_key(key_file if key_file.is_file() else None)
        options = dict(public_url=os.environ.get(PUBLIC_URL_ENV, "").strip() or None,
                       cors_origins=parse_origins([os.environ.get(CORS_ENV, "")], CORS_ENV),
                       trusted_proxies=parse_proxies([os.environ.get(PROXIES_ENV, "")], PROXIES_ENV))
        HELD.append(lock_folder(folder / "serve", "ComfyUI's serve folder"))  # one ComfyUI per user folder
        store = Store(folder / "serve")
        store.requeue_interrupted()
        backend = ComfyQueueBackend(instance, store).start()
        app = ServeApp(store, backend, key=key, **options)
        Webhooks(store, app.payload_for).start()
    except Exception as exc:  # noqa: BLE001
        from ..pipeline.errors import SDXLCNError

        if isinstance(exc, SDXLCNError):
            log.error("SDXL ControlNet: the fal queue API at %s is unavailable: %s", PREFIX, exc)
        else:
            log.exception("SDXL ControlNet: the fal queue API at %s is unavailable", PREFIX)
        return
    # its own few threads: a slow call (an image download) never holds asyncio's default pool, which serves
    # ComfyUI's own static files
    adapter = Adapter(app, ThreadPoolExecutor(THREADS, thread_name_prefix="sdxlcn-serve-call"), prefix=PREFIX)
    beyond = None if key else comfy_listen_beyond_loopback()

    async def handle(request):
        if key is None and (beyond or not is_loopback(request.remote or "")):
            where = f"ComfyUI listens on {beyond} (--listen)" if beyond else "the call came from another machine"
            return web.json_response({"detail": f"no key is set on this ComfyUI (SDXLCN_SERVE_KEY or user/"
                                                f"sdxl_controlnet_img2img/serve_key.txt) and {where}: set a key to "
                                                "serve beyond this machine"}, status=403)
        return await adapter(request)

    @web.middleware
    async def before_comfy(request, handler):
        """The API's calls skip ComfyUI's CORS and origin middlewares (they answer every OPTIONS themselves): the
        adapter's own rules apply (:mod:`pipeline.serve.access`)."""
        if request.path == PREFIX or request.path.startswith(PREFIX + "/"):
            return await handle(request)
        return await handler(request)

    instance.routes.route("*", PREFIX + "/{tail:.*}")(handle)
    try:
        instance.app.middlewares.insert(0, before_comfy)
    except (AttributeError, RuntimeError):  # already started (frozen): the route alone, behind ComfyUI's middlewares
        log.warning("SDXL ControlNet: %s runs behind ComfyUI's own CORS/origin handling", PREFIX)
    if beyond:
        log.warning("SDXL ControlNet: fal's queue API at %s refuses every call: ComfyUI listens on %s and no key is "
                    "set (SDXLCN_SERVE_KEY or user/sdxl_controlnet_img2img/serve_key.txt)", PREFIX, beyond)
    log.info("SDXL ControlNet: fal's queue API for fal-ai/fast-sdxl-controlnet-canny/image-to-image at %s (%s)",
             PREFIX, "key required" if key else "no key set: this machine only")
