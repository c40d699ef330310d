"""Real ComfyUI 0.8.0 serving fal's queue API (nodes/serve_routes.py) through its own prompt queue, on tiny models:
the pack's fal client, pointed at it by SDXLCN_FAL_URL, gets the image; a request accepted before ComfyUI restarts
is run and fetched after the restart, and a finished result stays fetchable."""

from __future__ import annotations

import pytest

from comfyui_harness import SKIP_REASON, comfyui_dir, running_comfyui
from test_serve import APP, KEY, call, fal_input, wait_done

pytestmark = pytest.mark.skipif(comfyui_dir() is None, reason=SKIP_REASON)


def test_comfyui_serves_the_endpoint_and_keeps_requests_over_a_restart(tmp_path, tiny_models, monkeypatch):
    from sdxl_controlnet_img2img.pipeline.fal.client import run_remote
    from sdxl_controlnet_img2img.pipeline.fal.settings import FalSettings
    from sdxl_controlnet_img2img.pipeline.request import GenerationRequest

    models = {"diffusers": {"tiny-sdxl": tiny_models["checkpoint"]},
              "controlnet": {"tiny-controlnet-canny": tiny_models["controlnet"]}}
    monkeypatch.setenv("SDXLCN_SERVE_KEY", KEY)
    monkeypatch.setenv("SDXLCN_SERVE_CHECKPOINT", "tiny-sdxl")
    monkeypatch.setenv("SDXLCN_SERVE_CONTROLNET", "tiny-controlnet-canny")
    base = tmp_path / "comfy"
    with running_comfyui(base, models) as server:
        url = f"{server.url}/sdxlcn/fal"
        assert call("POST", f"{url}/{APP}", fal_input(), key="wrong")[0] == 401
        assert call("POST", f"{url}/{APP}", fal_input(strength=3))[0] == 422
        monkeypatch.setenv("SDXLCN_FAL_URL", url)
        monkeypatch.setenv("FAL_KEY", KEY)
        statuses = []
        result = run_remote(GenerationRequest.from_dict(fal_input()), on_status=statuses.append, timeout_s=240,
                            settings=FalSettings(http_timeout_s=20.0, max_retries=1, poll_interval_s=0.1))
        assert result.images[0].size == (64, 64) and result.seed == 7
        first = statuses[0].request_id
        history = server.get(f"/history/{first}")  # it ran as a ComfyUI prompt, under the request's id
        assert history[first]["status"]["status_str"] == "success"
        # accepted, then ComfyUI stops before it is done: it runs after the restart
        code, pending, _ = call("POST", f"{url}/{APP}", fal_input(seed=9))
        assert code == 200
    with running_comfyui(base, models) as server:
        url = f"{server.url}/sdxlcn/fal"
        done, _seen = wait_done(f"{url}/fal-ai/fast-sdxl-controlnet-canny/requests/{pending['request_id']}/status",
                                deadline_s=240)
        assert "error" not in done, done
        code, res, _ = call("GET", f"{url}/fal-ai/fast-sdxl-controlnet-canny/requests/{pending['request_id']}")
        assert code == 200 and res["seed"] == 9 and res["images"][0]["width"] == 64
        code, res, _ = call("GET", f"{url}/fal-ai/fast-sdxl-controlnet-canny/requests/{first}")
        assert code == 200 and res["seed"] == 7
        assert call("GET", res["images"][0]["url"], key=None, raw=True)[0] == 200
        assert KEY not in server.log()
