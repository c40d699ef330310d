"""Put the example workflows' input picture into ComfyUI's input folder, so they run as shipped."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from .comfy_hooks import folder_paths, log

EXAMPLES = {"sdxlcn_fortress.png": Path(__file__).resolve().parent.parent / "workflows" / "inputs" / "fortress.png"}


def install_example_inputs() -> None:
    """Copy each example input into ComfyUI's input folder unless a file of that name is already there."""
    fp = folder_paths()
    if fp is None:
        return
    try:
        input_dir = fp.get_input_directory()
        os.makedirs(input_dir, exist_ok=True)
        for name, src in EXAMPLES.items():
            dst = os.path.join(input_dir, name)
            if src.is_file() and not os.path.exists(dst):
                shutil.copyfile(src, dst)
    except OSError as exc:  # never let a convenience stop the pack from loading
        log.warning("could not copy the example input images: %s", exc)
