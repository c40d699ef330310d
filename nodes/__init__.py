"""ComfyUI node classes: thin adapters from ComfyUI types to the ``pipeline`` library.

Importing this is cheap (no torch, no diffusers); each node imports the heavy parts when it runs.
"""

from .canny_node import SDXLCNCanny
from .loader import SDXLCNLoader
from .lora_node import SDXLCNLoraLoader
from .example_inputs import install_example_inputs
from .model_folders import register_model_folders
from .routes import register_routes
from .serve_routes import register_serve_routes
from .sampler import SDXLCNImg2Img
from .fal_node import SDXLCNFalImg2Img
from .from_comfy_node import SDXLCNFromComfyModels

register_model_folders()
install_example_inputs()
register_routes()
register_serve_routes()

NODE_CLASS_MAPPINGS = {
    "SDXLCNLoader": SDXLCNLoader,
    "SDXLCNLoraLoader": SDXLCNLoraLoader,
    "SDXLCNCanny": SDXLCNCanny,
    "SDXLCNImg2Img": SDXLCNImg2Img,
    "SDXLCNFalImg2Img": SDXLCNFalImg2Img,
    "SDXLCNFromComfyModels": SDXLCNFromComfyModels,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "SDXLCNLoader": "Load SDXL ControlNet Pipeline",
    "SDXLCNLoraLoader": "SDXL ControlNet LoRA",
    "SDXLCNCanny": "Canny Edges (OpenCV)",
    "SDXLCNImg2Img": "SDXL ControlNet Img2Img",
    "SDXLCNFalImg2Img": "SDXL ControlNet Img2Img (fal)",
    "SDXLCNFromComfyModels": "SDXL ControlNet Pipeline from ComfyUI Models",
}
