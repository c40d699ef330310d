"""ComfyUI entry point of the SDXL ControlNet (Canny) img2img pack.

Importing this is cheap: no torch work, no network, no model loading. The node modules
import diffusers lazily, so the pack (and its remote fal node) still loads without it.
"""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
