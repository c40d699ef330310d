"""Our pipeline under ComfyUI's own model management (imported from the ComfyUI checkout, as ComfyUI runs it with
--cpu): registered as a ComfyUI model, loaded before sampling without unloading ComfyUI's other models, unloaded
and freed by ComfyUI's "Unload models" and by a large free_memory request, and loaded again transparently."""

from __future__ import annotations

import pytest

from comfyui_harness import SKIP_REASON, comfyui_dir, run_probe

pytestmark = pytest.mark.skipif(comfyui_dir() is None, reason=SKIP_REASON)


def test_comfyui_model_management_governs_our_pipeline(tmp_path):
    found = run_probe("comfy_memory_probe.py", tmp_path)  # builds the tiny models in tmp_path
    assert found.pop("device_dtype") == ["cpu", "torch.float32"]  # ComfyUI's --cpu decision
    assert found.pop("placement") == "host"  # ComfyUI, not diffusers, places the weights
    assert all(found.values()), found
