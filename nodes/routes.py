"""HTTP routes the pack adds to ComfyUI's server.

``POST /sdxlcn/free`` frees the pack's cached diffusers pipeline, safety checker and prompt expander. ComfyUI's own
"Unload models" (``POST /free``) cannot see the last two, nor a pipeline in an offload mode: they are not ComfyUI
models.

Like ComfyUI's ``/free``, the route frees nothing itself: it runs on the server's thread, while a prompt may be
running on the prompt worker's thread with the very models it would free (ComfyUI 0.8.0, ``server.py`` ``post_free``
and ``main.py`` ``prompt_worker``). It sets a flag on ComfyUI's prompt queue; the worker reads the queue's flags
after each prompt (and at once when idle: setting a flag wakes it), and there, between prompts, on the worker's own
thread, our hook on the queue's ``get_flags`` takes our request and frees.

Setting a flag wakes the worker only while it waits for a prompt: one set while it is still busy after a prompt
(collecting garbage) would be read only after the next prompt, or after ComfyUI's idle timeout of 1000 s (its own
``/free`` alike). So the flag is set again each second until the worker has taken the request.
"""

from __future__ import annotations

import asyncio
import threading

from .comfy_hooks import log, prompt_server

FREE_FLAG = "sdxlcn_free"
_requested = threading.Event()  # set by the route, cleared by the worker when it frees
_renotify: dict = {}  # the task setting the flag again while a request waits (one at a time)


def free_now() -> bool:
    """Free the cached pipeline, safety checker and prompt expander (on the prompt worker's thread, between
    prompts). True if a pipeline was cached."""
    from ..pipeline.local.models.loading import free_cached_pipeline

    freed = free_cached_pipeline()
    log.info("SDXL ControlNet: freed cached models between prompts (pipeline was %s)",
             "loaded" if freed else "not loaded")
    return freed


def install_free_hook(queue) -> bool:
    """Wrap ``queue.get_flags`` (ComfyUI's ``PromptQueue``, read by the prompt worker between prompts) so that it
    takes our request and frees there. False if this queue has no flags to carry it."""
    original = getattr(queue, "get_flags", None)
    if original is None or not callable(getattr(queue, "set_flag", None)):
        return False
    if getattr(original, "sdxlcn_free_hook", False):
        return True

    def get_flags(reset=True):
        flags = original(reset)
        if not reset:
            return flags
        if isinstance(flags, dict):
            flags.pop(FREE_FLAG, None)
        if _requested.is_set():
            _requested.clear()  # before freeing: a request arriving meanwhile frees again at the next read
            try:
                free_now()
            except Exception:  # noqa: BLE001 - an exception here would end ComfyUI's prompt worker
                log.exception("SDXL ControlNet: freeing the cached models failed")
        return flags

    get_flags.sdxlcn_free_hook = True
    queue.get_flags = get_flags
    return True


async def _wake_worker_until_taken(queue) -> None:
    while _requested.is_set():
        queue.set_flag(FREE_FLAG, True)  # wakes the worker if it waits for a prompt
        await asyncio.sleep(1.0)


def request_free(queue) -> None:
    """Ask the prompt worker to free between prompts (on the server's event loop)."""
    _requested.set()
    task = _renotify.get("task")
    if task is None or task.done():
        _renotify["task"] = asyncio.ensure_future(_wake_worker_until_taken(queue))


def register_routes() -> None:
    server = prompt_server()
    if server is None:
        return
    web, instance = server
    queue = getattr(instance, "prompt_queue", None)
    hooked = queue is not None and install_free_hook(queue)
    if not hooked:
        log.warning("SDXL ControlNet: this ComfyUI's prompt queue has no flags; POST /sdxlcn/free is unavailable")

    @instance.routes.post("/sdxlcn/free")
    async def free_models(_request):
        if not hooked:
            return web.json_response({"error": "this ComfyUI's prompt queue has no flags to carry the request; use "
                                               "ComfyUI's 'Unload models'"}, status=503)
        request_free(queue)
        return web.json_response({"scheduled": True})
