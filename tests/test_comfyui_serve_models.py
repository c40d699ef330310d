"""What a real ComfyUI's endpoint cannot run is refused before a request id is given (issue 33 item 2), read through
fal's own Python client (``fal_client``, behind a local TLS terminator: it speaks https only).

- A field asking for a model this ComfyUI lacks (``enable_safety_checker``: models/safety_checker;
  ``expand_prompt``: models/prompt_expansion) is 422 at submit naming the field and the folder; nothing is queued.
- The endpoint's own models absent (the checkpoint gone, a VAE named that is not there): every submit is 503 naming
  each model and its variable, ``/ready`` too, and the start-up line says so. A request accepted before they went
  ends COMPLETED with one line in the pack's words (it ended with ComfyUI's validation JSON, cut mid-word) and its
  result is fal's error shape with that line.
"""

from __future__ import annotations

import contextlib
import json

import pytest

from comfyui_harness import ROOT, SKIP_REASON, comfyui_dir, free_port, running_comfyui, wait_until
from fal_python_client import FalPythonClient
from pictures import make_test_image
from test_serve import KEY, call, fal_input

pytestmark = pytest.mark.skipif(comfyui_dir() is None, reason=SKIP_REASON)

MODELS = {"checkpoint": "tiny-sdxl", "controlnet": "tiny-controlnet-canny"}
START_LINE = "fal's queue API for"


class Serving:
    """A serving ComfyUI (restartable on the same port, with other settings) and fal_client pointed at it."""

    def __init__(self, root, tiny_models, stack: contextlib.ExitStack):
        from test_serve_cli import make_cert
        from test_serve_tls_proxy import TlsProxy

        self.root, self.port = root, free_port()
        (root / "input").mkdir(parents=True)
        make_test_image(64, 64, 1).save(root / "input" / "sdxlcn_test_image.png")
        self.models = {"diffusers": {MODELS["checkpoint"]: tiny_models["checkpoint"]},
                       "controlnet": {MODELS["controlnet"]: tiny_models["controlnet"]},
                       "loras": {"tiny-sdxl-lora.safetensors": tiny_models["lora"]}}
        self.own = contextlib.ExitStack()
        stack.callback(self.own.close)
        self.comfy = self.start()
        cert, key = make_cert(root)
        proxy = TlsProxy(self.comfy.url, cert, key)
        stack.callback(proxy.stop)
        self.fal = FalPythonClient(f"127.0.0.1:{proxy.port}/sdxlcn/fal", cert, KEY)
        stack.callback(self.fal.close)

    def start(self, **env):
        env = {"SDXLCN_SERVE_KEY": KEY, "SDXLCN_SERVE_CHECKPOINT": MODELS["checkpoint"],
               "SDXLCN_SERVE_CONTROLNET": MODELS["controlnet"], "SDXLCN_SERVE_VAE": None, "SDXLCN_FAL_URL": None,
               "FAL_KEY": None, **env}
        return self.own.enter_context(running_comfyui(self.root, self.models, env=env, port=self.port))

    def restart(self, **env):
        self.own.close()
        self.comfy = self.start(**env)

    def start_line(self) -> str:
        lines = [ln for ln in self.comfy.log().splitlines() if START_LINE in ln]
        assert len(lines) == 1, self.comfy.log()[-3000:]
        return lines[0]

    def stored_requests(self) -> int:
        folder = self.root / "user" / "sdxl_controlnet_img2img" / "serve" / "requests"
        return len(list(folder.iterdir())) if folder.is_dir() else 0


@pytest.fixture(scope="module")
def serving(tmp_path_factory, tiny_models):
    with contextlib.ExitStack() as stack:
        yield Serving(tmp_path_factory.mktemp("comfyui-serve-models"), tiny_models, stack)


def test_a_field_whose_model_this_comfyui_lacks_is_refused_at_submit(serving):
    line = serving.start_line()  # the start-up line names what it serves and what the optional fields find
    for part in ("checkpoint 'tiny-sdxl'", "ControlNet 'tiny-controlnet-canny'", "the checkpoint's VAE",
                 "enable_safety_checker refused (no model in models/safety_checker)",
                 "expand_prompt refused (no model in models/prompt_expansion)", "1 LoRA(s) in models/loras"):
        assert part in line, line
    assert "MISSING" not in line
    before = serving.stored_requests()
    for field, folder in (("enable_safety_checker", "models/safety_checker"),
                          ("expand_prompt", "models/prompt_expansion")):
        got = serving.fal.submit(fal_input(**{field: True}))
        assert got["http_error"] == 422 and got["request_id_header"] is None, got
        [item] = got["message"]
        assert item["loc"] == ["body", field] and folder in item["msg"] and "false" in item["msg"], item
    assert serving.stored_requests() == before  # nothing accepted


def test_a_lora_by_name_in_models_loras_changes_the_picture_as_the_local_run_with_it(serving, tiny_pipe, tiny_models):
    """loras[].path names a .safetensors file in ComfyUI's models/loras: the served picture is the local run's with
    that LoRA (up to the float noise of ComfyUI's own torch build) and not the one without it; a name that is not
    there is refused at submit naming loras[i].path."""
    import io
    import urllib.parse

    import numpy as np
    from PIL import Image

    from sdxl_controlnet_img2img.pipeline.local.generate import generate
    from sdxl_controlnet_img2img.pipeline.request import GenerationRequest, LoraSpec

    served = {}
    for tag, loras in (("plain", []), ("lora", [{"path": "tiny-sdxl-lora.safetensors", "scale": 0.8}])):
        rid = serving.fal.submit(fal_input(seed=11, loras=loras))["request_id"]
        wait_until(lambda: serving.fal.status(rid)["kind"] == "Completed", f"the {tag} request ending", 240)
        result = serving.fal.result(rid)["result"]
        url = urllib.parse.urlsplit(result["images"][0]["url"])  # the files are on ComfyUI itself, behind the proxy
        png = call("GET", f"{serving.comfy.url}{url.path}", key=None, raw=True)[1]
        served[tag] = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float32)
    req = GenerationRequest.from_dict({**fal_input(seed=11), "image_url": make_test_image(64, 64, 1),
                                       "control_image_url": make_test_image(64, 64, 2),
                                       "loras": [LoraSpec(str(tiny_models["lora"]), 0.8)]})
    want = np.asarray(generate(tiny_pipe, req).images[0], dtype=np.float32)
    assert np.abs(served["lora"] - want).mean() < 2.0, "the served picture is not the local run's with the LoRA"
    assert np.abs(served["lora"] - served["plain"]).mean() > 2.0, "the LoRA changed nothing"
    got = serving.fal.submit(fal_input(loras=[{"path": "tiny-sdxl-lora.safetensors"}, {"path": "absent.safetensors"}]))
    assert got["http_error"] == 422 and got["message"][0]["loc"] == ["body", "loras", 1, "path"], got


def test_without_the_endpoints_models_every_submit_is_503_and_an_accepted_request_ends_in_our_words(serving):
    # a request waits behind a long plain prompt in ComfyUI's queue when ComfyUI stops
    wf = json.loads((ROOT / "workflows" / "api" / "sdxl_controlnet_img2img_tiny.json").read_text())
    wf["1"]["inputs"]["image"] = "sdxlcn_test_image.png"
    wf["4"]["inputs"].update(num_inference_steps=50, strength=1.0, width=1536, height=1536)
    blocker = serving.comfy.queue_prompt(wf)
    sub = serving.fal.submit(fal_input(seed=8))
    rid = sub["request_id"]

    def waiting():
        q = serving.comfy.get("/queue")
        return [i[1] for i in q["queue_running"]] == [blocker] and rid in [i[1] for i in q["queue_pending"]]

    wait_until(waiting, "the served request waiting in ComfyUI's queue")
    # then the operator removes the checkpoint and names a VAE that is not there
    (serving.root / "models" / "diffusers" / MODELS["checkpoint"]).unlink()
    serving.models["diffusers"] = {}
    serving.restart(SDXLCN_SERVE_VAE="absent-vae.safetensors")
    line = serving.start_line()
    assert "MISSING" in line and "SDXLCN_SERVE_CHECKPOINT" in line and "SDXLCN_SERVE_VAE" in line, line

    # the accepted request ends COMPLETED, in one line naming what is missing and the setting that picks it
    wait_until(lambda: serving.fal.status(rid)["kind"] == "Completed", "the accepted request ending", 60)
    st = serving.fal.status(rid)
    assert st["error_type"] == "runner_error", st
    error = st["error"]
    assert "\n" not in error and "{" not in error and "node_errors" not in error, error
    assert "'tiny-sdxl' (SDXLCN_SERVE_CHECKPOINT) is not in ComfyUI's models/checkpoints" in error, error
    got = serving.fal.result(rid)  # fal's error shape, read by fal's client
    assert got == {"http_error": 503, "message": error, "request_id_header": rid}, got

    # a new request is refused before it gets an id, naming each missing model and its variable
    got = serving.fal.submit(fal_input())
    assert got["http_error"] == 503 and got["request_id_header"] is None, got
    for part in ("'tiny-sdxl' (SDXLCN_SERVE_CHECKPOINT)", "'absent-vae.safetensors' (SDXLCN_SERVE_VAE)",
                 "models/vae"):
        assert part in got["message"], got
    code, body, _ = call("GET", f"{serving.comfy.url}/sdxlcn/fal/ready", key=None)
    assert code == 503 and "SDXLCN_SERVE_CHECKPOINT" in body["detail"], body
    assert serving.comfy.get("/queue") == {"queue_running": [], "queue_pending": []}
