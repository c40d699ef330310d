"""Our pipeline under ComfyUI's own model management (imported from the ComfyUI checkout, as ComfyUI runs it with
--cpu): registered as a ComfyUI model, loaded before sampling without unloading ComfyUI's other models, unloaded
and freed by ComfyUI's "Unload models" and by a large free_memory request, and loaded again transparently."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from comfyui_harness import SKIP_REASON, comfyui_dir

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(comfyui_dir() is None, reason=SKIP_REASON)


def test_comfyui_model_management_governs_our_pipeline(tmp_path):
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    out = subprocess.run(
        [python, str(ROOT / "tests" / "comfy_memory_probe.py"), str(comfyui_dir()), str(ROOT), str(tmp_path / "tiny")],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
        env=dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1"))
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("PROBE ")]
    assert out.returncode == 0 and lines, out.stdout[-2000:] + out.stderr[-4000:]
    found = json.loads(lines[-1][len("PROBE "):])
    assert found.pop("device_dtype") == ["cpu", "torch.float32"]  # ComfyUI's --cpu decision
    assert found.pop("placement") == "host"  # ComfyUI, not diffusers, places the weights
    assert all(found.values()), found
