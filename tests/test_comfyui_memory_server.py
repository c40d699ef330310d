"""One pipeline in memory in a real ComfyUI server, whatever ComfyUI's output cache keeps (skipped without
COMFYUI_DIR). The models are widened tiny ones (~700 MB in fp32), big enough to show in the server's RSS."""

from __future__ import annotations

import json
import time

import pytest

from comfyui_harness import ROOT, SKIP_REASON, comfyui_dir, running_comfyui

pytestmark = pytest.mark.skipif(comfyui_dir() is None, reason=SKIP_REASON)


@pytest.fixture(scope="module")
def medium_models(tmp_path_factory):
    from sdxl_controlnet_img2img.pipeline.local.tiny_models import build_tiny_models

    models = build_tiny_models(tmp_path_factory.mktemp("medium-models"), seed=1, scale=8)
    size = sum(f.stat().st_size for d in models.values() for f in d.rglob("*.safetensors"))
    return models, size


def _workflow(vae_tiling: bool, seed: int = 1) -> dict:
    wf = json.loads((ROOT / "workflows" / "api" / "sdxl_controlnet_img2img_tiny.json").read_text())
    for node in wf.values():
        if node["class_type"] == "SDXLCNLoader":
            node["inputs"].update(checkpoint="medium-sdxl", controlnet="medium-controlnet", vae_tiling=vae_tiling)
        if node["class_type"] == "SDXLCNImg2Img":
            node["inputs"].update(num_inference_steps=2, strength=1.0, seed=seed)
    return wf


def _run(server, wf):
    entry = server.wait_history(server.queue_prompt(wf), deadline_s=300)
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[-2000:]


def _settled_rss(server, below: float | None = None, deadline_s: float = 30) -> int:
    """RSS once it stops falling (ComfyUI frees between prompts), or as soon as it is ``below``."""
    end = time.monotonic() + deadline_s
    last = server.rss_bytes()
    while time.monotonic() < end:
        time.sleep(0.5)
        now = server.rss_bytes()
        if below is not None and now < below:
            return now
        if below is None and abs(now - last) < 5e6:
            return now
        last = now
    return server.rss_bytes()


@pytest.mark.parametrize("cache_args", [(), ("--cache-lru", "8")], ids=["default-cache", "cache-lru"])
def test_changing_a_loader_option_keeps_one_pipeline_and_free_gives_it_back(tmp_path, medium_models, cache_args):
    models, size = medium_models
    links = {"diffusers": {"medium-sdxl": models["checkpoint"]}, "controlnet": {"medium-controlnet": models["controlnet"]}}
    with running_comfyui(tmp_path / "base", links, extra_args=cache_args) as server:
        _run(server, _workflow(vae_tiling=False))
        one = _settled_rss(server)
        _run(server, _workflow(vae_tiling=True, seed=2))  # another loader option: another pipeline
        _run(server, _workflow(vae_tiling=False, seed=3))  # and back
        after = _settled_rss(server)
        assert after - one < 0.5 * size, f"RSS grew by {(after - one) / size:.2f} pipelines ({size / 1e6:.0f} MB each)"
        status, _ = server.post("/free", {"unload_models": True, "free_memory": True})
        assert status == 200
        freed = _settled_rss(server, below=after - 0.7 * size)
        assert after - freed > 0.7 * size, f"/free gave back {(after - freed) / size:.2f} of a pipeline"
        print(f"\n{cache_args or 'default cache'}: pipeline files {size / 1e6:.0f} MB; RSS after one run "
              f"{one / 1e6:.0f} MB, after option changed and back {after / 1e6:.0f} MB "
              f"({(after - one) / size:+.2f} pipelines), after /free {freed / 1e6:.0f} MB "
              f"({(freed - after) / size:+.2f} pipelines)")
        _run(server, _workflow(vae_tiling=False, seed=4))  # the next run loads it again
        assert "ComfyUI unloaded the pipeline" in server.log()
