"""ComfyUI-only hooks, imported lazily so the node classes also work (and test) without ComfyUI.

Every function degrades to a no-op (or a plain default) when ComfyUI is not importable.
"""

from __future__ import annotations

import logging

log = logging.getLogger("sdxl_controlnet_img2img")

CATEGORY = "SDXL ControlNet"


def folder_paths():
    """ComfyUI's ``folder_paths`` module, or None outside ComfyUI."""
    try:
        import folder_paths as fp  # type: ignore

        return fp
    except ImportError:
        return None


def processing_interrupted() -> bool:
    """Whether the user pressed Cancel in ComfyUI (False outside ComfyUI)."""
    try:
        import comfy.model_management as mm  # type: ignore
    except ImportError:
        return False
    try:
        return bool(mm.processing_interrupted())
    except Exception:  # noqa: BLE001
        return False


def throw_if_interrupted() -> None:
    """Raise ComfyUI's own interruption when the user pressed Cancel (a no-op outside ComfyUI)."""
    try:
        import comfy.model_management as mm  # type: ignore
    except ImportError:
        return
    mm.throw_exception_if_processing_interrupted()


class Progress:
    """ComfyUI's progress bar (with step previews) over ``total`` steps; a no-op outside ComfyUI."""

    def __init__(self, total: int, node_id=None):
        self.total = max(int(total), 1)
        self.bar = None
        self._rgb_factors = None
        try:
            import comfy.utils  # type: ignore

            self.bar = comfy.utils.ProgressBar(self.total, node_id=node_id) if node_id is not None else comfy.utils.ProgressBar(self.total)
        except ImportError:
            pass

    def update(self, value: int, latents=None) -> None:
        """Set the bar to ``value`` (with a preview of ``latents``); raises ComfyUI's interruption on Cancel."""
        throw_if_interrupted()
        if self.bar is None:
            return
        self.bar.update_absolute(min(value, self.total), self.total, self._preview(latents))

    def _preview(self, latents):
        """A cheap preview: ComfyUI's linear SDXL latent-to-RGB approximation of the first latent."""
        if latents is None:
            return None
        try:
            import torch
            from PIL import Image

            if self._rgb_factors is None:
                from comfy.latent_formats import SDXL  # type: ignore

                fmt = SDXL()
                self._rgb_factors = (torch.tensor(fmt.latent_rgb_factors), torch.tensor(fmt.latent_rgb_factors_bias or [0, 0, 0]))
            factors, bias = self._rgb_factors
            lat = latents[0].detach().float().cpu()
            rgb = torch.einsum("chw,cr->hwr", lat, factors) + bias
            rgb = ((rgb + 1.0) / 2.0).clamp(0, 1).mul(255).round().to(torch.uint8).numpy()
            try:
                from comfy.cli_args import args  # type: ignore

                size = args.preview_size
            except Exception:
                size = 512
            return ("JPEG", Image.fromarray(rgb), size)
        except Exception:  # a preview must never break a run
            return None


def send_status(event: str, data: dict) -> None:
    """A custom websocket message to the frontend (``api.addEventListener(event, ...)``), sent only to the client
    that queued the running prompt (it carries request ids and fal's logs)."""
    try:
        from server import PromptServer  # type: ignore

        client = PromptServer.instance.client_id
        if client is not None:
            PromptServer.instance.send_sync(event, data, client)
    except Exception:
        pass


def prompt_server():
    """``(aiohttp.web, PromptServer.instance)`` inside a running ComfyUI server, else None (tests, scripts)."""
    try:
        from aiohttp import web
        from server import PromptServer  # type: ignore
    except ImportError:
        return None
    instance = getattr(PromptServer, "instance", None)
    return None if instance is None else (web, instance)
