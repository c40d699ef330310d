"""HTTP routes the pack adds to ComfyUI's server.

``POST /sdxlcn/free`` frees the pack's cached diffusers pipeline, safety checker and prompt
expander. ComfyUI's own "Unload models" (``POST /free``) cannot see them: they are not ComfyUI models.
"""

from __future__ import annotations

from .comfy_hooks import log


def register_routes() -> None:
    try:
        from aiohttp import web
        from server import PromptServer  # type: ignore
    except ImportError:
        return
    instance = getattr(PromptServer, "instance", None)
    if instance is None:
        return

    @instance.routes.post("/sdxlcn/free")
    async def free_models(_request):
        from ..pipeline.local.loading import free_cached_pipeline

        freed = free_cached_pipeline()
        log.info("SDXL ControlNet: freed cached models (pipeline was %s)", "loaded" if freed else "not loaded")
        return web.json_response({"freed": freed})
