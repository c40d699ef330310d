"""What a probe run under ComfyUI's interpreter does first: ComfyUI imported from its checkout as ``main.py --cpu``
would set it up, then this pack imported under a folder name (``sdxlcn_pack``), as ComfyUI imports custom nodes."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path


def start(comfy_dir: Path, pack_root: Path):
    """Import ComfyUI (``--cpu``) and the pack; returns the pack module."""
    sys.argv = [str(comfy_dir / "main.py"), "--cpu"]
    sys.path.insert(0, str(comfy_dir))
    import comfy.options

    comfy.options.enable_args_parsing()
    spec = importlib.util.spec_from_file_location("sdxlcn_pack", pack_root / "__init__.py",
                                                  submodule_search_locations=[str(pack_root)])
    pack = importlib.util.module_from_spec(spec)
    sys.modules["sdxlcn_pack"] = pack
    spec.loader.exec_module(pack)
    return pack
