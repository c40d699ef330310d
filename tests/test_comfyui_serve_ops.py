"""The operator's calls (issue 33, items 4 and 5) on a real ComfyUI 0.8.0 with the pack, under ``/sdxlcn/fal``:
``/health`` and ``/ready`` without the key, ``/metrics`` with it (read by prometheus_client's own parser),
``/openapi.json`` (valid for openapi-spec-validator) and the webhook key's JWKS, that key made once in the pack's
``serve`` folder of ComfyUI's user directory with mode 0600."""

from __future__ import annotations

import stat

import pytest

from comfyui_harness import SKIP_REASON, comfyui_dir, running_comfyui
from test_serve import KEY, call

pytestmark = pytest.mark.skipif(comfyui_dir() is None, reason=SKIP_REASON)


def test_operator_calls_under_comfyuis_route(tmp_path):
    from openapi_spec_validator import validate
    from prometheus_client.parser import text_string_to_metric_families

    from sdxl_controlnet_img2img.pipeline.folders import USER_FOLDER

    with running_comfyui(tmp_path, env={"SDXLCN_SERVE_KEY": KEY}) as comfy:
        url = f"http://127.0.0.1:{comfy.port}/sdxlcn/fal"
        assert call("GET", f"{url}/health", key=None)[:2] == (200, {"status": "ok"})
        code, body, _ = call("GET", f"{url}/ready", key=None)
        assert code in (200, 503) and body["ready"] is (code == 200), body
        assert call("GET", f"{url}/metrics", key=None)[0] == 401
        code, text, _ = call("GET", f"{url}/metrics", raw=True)
        assert code == 200
        names = {f.name for f in text_string_to_metric_families(text.decode())}
        assert {"sdxlcn_serve_queue_depth", "sdxlcn_serve_requests_completed"} <= names, names
        code, doc, _ = call("GET", f"{url}/openapi.json", key=None)
        assert code == 200 and doc["servers"] == [{"url": url}], doc.get("servers")
        validate(doc)
        code, jwks, _ = call("GET", f"{url}/.well-known/jwks.json", key=None)
        assert code == 200 and jwks["keys"][0]["crv"] == "Ed25519", jwks
    key_file = tmp_path / "user" / USER_FOLDER / "serve" / "webhook_signing_key.pem"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
