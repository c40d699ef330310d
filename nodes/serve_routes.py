"""fal's queue API for the pack's endpoint (``pipeline/endpoint.py``) on ComfyUI's own port, under
``/sdxlcn/fal`` (e.g. ``http://host:8188/sdxlcn/fal``; fal.js: ``proxyUrl`` ``http://host:8188/sdxlcn/fal/proxy``).

Each request runs through ComfyUI's prompt queue as the shipped API workflow (its prompt id is the request id), so
it shares the GPU under ComfyUI's model management, shows in ComfyUI's queue, and ComfyUI's Cancel stops it. Status,
queue position and log lines come from ComfyUI's queue and progress events (``serve_queue.py``: a request taken
out of that queue, by fal's cancel or ComfyUI's Clear Queue, ends cancelled); results are copied into the pack's store
(``serve`` in the pack's folder of ComfyUI's ``user/``), so a finished result stays fetchable after a restart, and
requests that had not finished are queued again.

Server-side settings (environment, never a workflow): ``SDXLCN_SERVE_KEY`` or ``serve_key.txt`` in that folder
(the key clients send; without one only this machine may call), ``SDXLCN_SERVE_CHECKPOINT``,
``SDXLCN_SERVE_CONTROLNET`` and ``SDXLCN_SERVE_VAE`` (names in ComfyUI's model folders; default: the shipped
workflow's; checked at every submit, as is any model a field needs: ``serve_models.py``),
``SDXLCN_SERVE_QUEUE`` (a Redis URL, as ``serve --queue``: this ComfyUI joins that shared queue, ``serve_shared.py``),
``SDXLCN_SERVE_CORS_ORIGINS``, ``SDXLCN_SERVE_PUBLIC_URL``, ``SDXLCN_SERVE_TRUSTED_PROXIES`` (as ``serve``'s
``--cors-origin``, ``--public-url``, ``--trusted-proxy``), ``SDXLCN_SERVE_KEEP_UPLOADS_HOURS`` (hours files
uploaded through fal's storage calls are kept, 24 unless set: ``pipeline/serve/uploads.py``). Without a key the API
refuses every call while ComfyUI listens beyond loopback. The calls run through the same adapter as ``serve``
(``pipeline/serve/web.py``), on a few threads of their own.
"""

from __future__ import annotations

import os
from pathlib import Path

from .comfy_hooks import log, prompt_server

PREFIX = "/sdxlcn/fal"
CORS_ENV = "SDXLCN_SERVE_CORS_ORIGINS"  # web page origins allowed to call it (with a key), comma-separated
PUBLIC_URL_ENV = "SDXLCN_SERVE_PUBLIC_URL"  # the API's base as clients reach it, e.g. https://gpu-box/sdxlcn/fal
PROXIES_ENV = "SDXLCN_SERVE_TRUSTED_PROXIES"  # reverse proxies whose X-Forwarded-Proto/-Host are believed
THREADS = 4
HELD: list = []  # the serve folder's lock, held while ComfyUI runs


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

    from ..pipeline.endpoint import ENDPOINT
    from ..pipeline.folders import USER_FOLDER
    from ..pipeline.serve.access import is_loopback, parse_origins, parse_proxies
    from ..pipeline.serve.app import ServeApp
    from ..pipeline.serve.datalock import lock_folder
    from ..pipeline.serve.cli import open_store, read_key
    from ..pipeline.serve.web import Adapter
    from ..pipeline.serve.webhook import Webhooks
    from .serve_models import ServedModels
    from .serve_queue import ComfyQueueBackend
    from .serve_shared import QUEUE_ENV, SharedComfyBackend, comfy_workers, open_shared

    folder = Path(folder_paths.get_user_directory()) / USER_FOLDER
    key_file = folder / "serve_key.txt"
    try:  # a failure here costs the endpoint, never the pack's nodes
        key = read_key(key_file if key_file.is_file() else None)
        options = dict(public_url=os.environ.get(PUBLIC_URL_ENV, "").strip() or None,
                       cors_origins=parse_origins([os.environ.get(CORS_ENV, "")], CORS_ENV),
                       trusted_proxies=parse_proxies([os.environ.get(PROXIES_ENV, "")], PROXIES_ENV))
        HELD.append(lock_folder(folder / "serve", "ComfyUI's serve folder"))  # one ComfyUI per user folder
        models = ServedModels()
        shared = os.environ.get(QUEUE_ENV, "").strip()
        if shared:  # a node of a shared queue on Redis: serve_shared.py
            store = open_shared(shared, folder / "serve")
            backend = SharedComfyBackend(instance, store, models).start()
            comfy_workers(backend).start()
        else:
            store = open_store(folder / "serve", what="ComfyUI's serve folder")  # locked or damaged: one line, soon
            backend = ComfyQueueBackend(instance, store, models).start()
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
                                                f"{USER_FOLDER}/serve_key.txt) and {where}: set a key to "
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
                    "set (SDXLCN_SERVE_KEY or user/%s/serve_key.txt)", PREFIX, beyond, USER_FOLDER)
    summary = models.summary()  # the models it serves, and what is missing
    (log.warning if models.missing() else log.info)(
        "SDXL ControlNet: fal's queue API for %s at %s (%s); %s", ENDPOINT, PREFIX,
        "key required" if key else "no key set: this machine only", summary)
