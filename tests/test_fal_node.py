"""The ``SDXLCNFalImg2Img`` node, called as ComfyUI calls it, against the fal-protocol test server (no ComfyUI)."""

from __future__ import annotations

import sys
import threading
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent / "helpers"))
import fal_server  # noqa: E402

fal_server.configure_environment()

from fal_server import TEST_KEY, fal, fal_test_server, user_dir  # noqa: E402,F401

from sdxl_controlnet_img2img.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402
from sdxl_controlnet_img2img.nodes.fal_node import SDXLCNFalImg2Img, parse_loras  # noqa: E402
from sdxl_controlnet_img2img.nodes.sampler import SDXLCNImg2Img  # noqa: E402
from sdxl_controlnet_img2img.pipeline import request_log  # noqa: E402
from sdxl_controlnet_img2img.pipeline.fal.errors import FalError, FalTimeout, FalValidationError  # noqa: E402
from sdxl_controlnet_img2img.pipeline.fal.client import run_remote  # noqa: E402
from sdxl_controlnet_img2img.pipeline.request import GenerationRequest  # noqa: E402


def widgets(**changes):
    """The widget values ComfyUI passes: each input's default."""
    req = SDXLCNFalImg2Img.INPUT_TYPES()["required"]
    w = {k: v[1]["default"] for k, v in req.items() if k not in ("image", "control_image")}
    w.update(prompt="a house", enable_safety_checker=True, seed=5)
    w.update(changes)
    return w


def batch(n, h=24, w=32, seed=0):
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.integers(0, 256, (n, h, w, 3)).astype(np.float32) / 255.0)


def inverted(image, i):
    return 1.0 - image[i]


def test_same_inputs_and_outputs_as_the_local_sampler_and_registered():
    fal_types = SDXLCNFalImg2Img.INPUT_TYPES()
    local = SDXLCNImg2Img.INPUT_TYPES()["required"]
    expected = [k for k in local if k not in ("pipeline", "apply_canny")]  # apply_canny: fal always runs Canny
    assert list(fal_types["required"]) == expected
    for k in expected:  # the same types, defaults and ranges (tooltips may say what differs on fal)
        strip = lambda spec: (spec[0], {o: v for o, v in (spec[1] if len(spec) > 1 else {}).items() if o != "tooltip"})  # noqa: E731
        assert strip(fal_types["required"][k]) == strip(local[k])
    assert "not seed + i" in fal_types["required"]["seed"][1]["tooltip"]
    assert list(fal_types["optional"]) == ["loras", "sync_mode", "request_id", "max_concurrency", "timeout_s"]
    assert SDXLCNFalImg2Img.RETURN_TYPES == SDXLCNImg2Img.RETURN_TYPES
    assert SDXLCNFalImg2Img.RETURN_NAMES == SDXLCNImg2Img.RETURN_NAMES
    assert NODE_CLASS_MAPPINGS["SDXLCNFalImg2Img"] is SDXLCNFalImg2Img
    assert NODE_DISPLAY_NAME_MAPPINGS["SDXLCNFalImg2Img"] == "SDXL ControlNet Img2Img (fal)"
    # the key is never a widget
    names = {k.lower() for part in fal_types.values() for k in part}
    assert not any("key" in n for n in names)


def test_batch_fans_out_bounded_in_order(fal, user_dir):
    fal.reset(run_s=0.3)
    image, control = batch(3), batch(1, seed=9)
    out, seed, flags, prompt = SDXLCNFalImg2Img().generate(image, control, max_concurrency=2, unique_id="12",
                                                           **widgets(num_images=1, enable_safety_checker=True))
    assert out.shape == (3, 24, 32, 3) and seed == 5 and flags == "[false, false, false]" and prompt == "a house"
    for i in range(3):
        assert torch.allclose(out[i], inverted(image, i), atol=1 / 255 + 1e-6)
    assert fal.max_active == 2 and len(fal.jobs) == 3
    assert sorted(j.args["seed"] for j in fal.jobs.values()) == [5, 6, 7]  # seed + k * num_images, as the sampler
    recs = request_log.read(user_dir)
    assert sorted(r["request_id"] for r in recs if r["event"] == "submitted") == sorted(fal.jobs)


def test_loras_and_sync_mode_reach_fal(fal, user_dir):
    SDXLCNFalImg2Img().generate(batch(1), batch(1), loras="https://h.example/a.safetensors:0.7\n# note\n"
                                "https://h.example/b.safetensors", sync_mode=True, **widgets())
    args = next(iter(fal.jobs.values())).args
    assert args["loras"] == [{"path": "https://h.example/a.safetensors", "scale": 0.7},
                             {"path": "https://h.example/b.safetensors", "scale": 1.0}]
    assert args["sync_mode"] is True


def test_lora_lines_must_be_urls():
    with pytest.raises(FalValidationError) as err:
        parse_loras("/models/loras/x.safetensors:0.5")
    assert err.value.field == "loras"


def test_request_id_input_recovers_a_result_without_paying_again(fal, user_dir):
    fal.reset(run_s=0.6)
    image = batch(1, seed=3)
    from sdxl_controlnet_img2img.nodes.convert import image_to_pil

    req = GenerationRequest.from_dict({"prompt": "p", "image_url": image_to_pil(image, 0),
                                       "control_image_url": image_to_pil(image, 0), "seed": 1})
    with pytest.raises(FalTimeout) as err:
        run_remote(req, timeout_s=0.2, request_log_dir=user_dir, settings=fal_server.fast_settings())
    rid = err.value.request_id
    out, seed, _flags, _prompt = SDXLCNFalImg2Img().generate(batch(1), batch(1), request_id=f"  {rid}\n",
                                                             **widgets())
    assert seed == 1
    assert torch.allclose(out[0], inverted(image, 0), atol=1 / 255 + 1e-6)
    assert len([c for c in fal.calls if c[0] == "POST"]) == 1


class InterruptProcessingException(Exception):
    """ComfyUI's exception for Cancel (in the stand-in below)."""


def comfy_interrupt(monkeypatch) -> threading.Event:
    """ComfyUI's interrupt flag, set by Cancel: a stand-in ``comfy.model_management`` (ComfyUI is absent here)."""
    flag = threading.Event()

    def throw():
        if flag.is_set():
            raise InterruptProcessingException()

    mm = types.SimpleNamespace(processing_interrupted=flag.is_set, throw_exception_if_processing_interrupted=throw,
                               InterruptProcessingException=InterruptProcessingException)
    comfy = types.ModuleType("comfy")
    comfy.model_management = mm
    monkeypatch.setitem(sys.modules, "comfy", comfy)
    monkeypatch.setitem(sys.modules, "comfy.model_management", mm)
    return flag


def test_comfyui_cancel_asks_fal_to_cancel_and_stops_at_once(fal, user_dir, monkeypatch):
    flag = comfy_interrupt(monkeypatch)
    fal.reset(queue_s=30.0)

    def interrupt_once_both_are_queued():  # a bounded poll, not a sleep-and-hope
        end = time.monotonic() + 10
        while len(fal.jobs) < 2 and time.monotonic() < end:
            time.sleep(0.02)
        time.sleep(0.2)
        flag.set()

    threading.Thread(target=interrupt_once_both_are_queued, daemon=True).start()
    t = time.monotonic()
    with pytest.raises(InterruptProcessingException):
        SDXLCNFalImg2Img().generate(batch(2), batch(1), **widgets())
    assert time.monotonic() - t < 15  # not the 30 s queue (wide: CI machines are busy)
    assert sorted(fal.cancelled) == sorted(fal.jobs) and len(fal.jobs) == 2
    assert {r["request_id"] for r in request_log.read(user_dir) if r["event"] == "cancelled"} == set(fal.jobs)


def test_key_file_in_user_dir_and_key_absent_from_outputs(fal, user_dir, monkeypatch, caplog):
    monkeypatch.delenv("FAL_KEY")
    user_dir.mkdir(parents=True, exist_ok=True)
    (user_dir / "fal_key.txt").write_text(TEST_KEY + "\n")
    out = SDXLCNFalImg2Img().generate(batch(1), batch(1), **widgets())
    assert out[0].shape[0] == 1
    text = repr(out[1:]) + caplog.text + request_log.log_path(user_dir).read_text()
    assert TEST_KEY not in text and "test-secret-not-real" not in text


def test_an_edge_map_is_refused_before_anything_is_paid(fal, user_dir):
    """The documented swap (local sampler -> fal node) keeps the Canny node's output on control_image: fal would
    run Canny on the edges again. Refused, naming the input to connect, with nothing sent."""
    from pictures import make_test_image

    from sdxl_controlnet_img2img.pipeline.canny import canny_edges  # what the Canny Edges node outputs

    fal.reset()
    rgb = np.asarray(make_test_image(96, 64, 3))
    picture = torch.from_numpy(rgb.astype(np.float32) / 255.0)[None]
    edges = torch.from_numpy(canny_edges(rgb).astype(np.float32) / 255.0)[None]
    with pytest.raises(FalValidationError, match=r"control_image: .*edge map.*Connect the source picture"):
        SDXLCNFalImg2Img().generate(picture, edges, **widgets())
    assert fal.submissions == 0
    result = SDXLCNFalImg2Img().generate(picture, picture, **widgets())  # the source picture itself goes
    assert result[0].shape[0] == 1 and fal.submissions == 1


def test_a_batch_with_a_failed_request_keeps_the_paid_images(fal, user_dir):
    """3 init images = 3 requests; the second fails on fal: the two completed (paid) results are saved to the
    output folder and the error names them and the failed request's id."""
    requests = SDXLCNFalImg2Img._requests(batch(3), batch(1), "", False, widgets())
    fal.reset(fail_seeds=[requests[1].seed])
    with pytest.raises(FalError) as err:
        SDXLCNFalImg2Img().generate(batch(3), batch(1), **widgets())
    saved = sorted(p.name for p in (user_dir.parent / "output").iterdir())
    assert len(saved) == 2 and all(name in str(err.value) for name in saved)
    failed_id = next(rid for rid, job in fal.jobs.items() if job.args["seed"] == requests[1].seed)
    assert "1 of 3 fal requests failed" in str(err.value) and failed_id in str(err.value)


def _failing_batch(fal):
    """A batch of 3 whose second request fails on fal; the ids of the two that complete (paid)."""
    requests = SDXLCNFalImg2Img._requests(batch(3), batch(1), "", False, widgets())
    fal.reset(fail_seeds=[requests[1].seed])
    with pytest.raises(FalError) as err:
        SDXLCNFalImg2Img().generate(batch(3), batch(1), **widgets())
    return err.value, [rid for rid, job in fal.jobs.items() if job.args["seed"] != requests[1].seed]


def test_partly_failed_batches_never_overwrite_earlier_paid_images(fal, user_dir):
    """The same batch twice (same seeds): each run's paid images are kept, named by their request ids, and marked
    completed once saved; the failed ids stay pending."""
    output = user_dir.parent / "output"
    _err, first = _failing_batch(fal)
    first_files = {p.name: p.read_bytes() for p in output.iterdir()}
    _err, second = _failing_batch(fal)
    names = sorted(p.name for p in output.iterdir())
    assert names == sorted(f"sdxlcn_fal_{rid}_00.png" for rid in first + second)
    assert all((output / name).read_bytes() == data for name, data in first_files.items())
    completed = {r["request_id"] for r in request_log.read(user_dir) if r["event"] == "completed"}
    assert completed == set(first + second) and len(request_log.pending(user_dir)) == 2


def test_a_partly_failed_batch_that_cannot_be_saved_keeps_its_ids_pending(fal, user_dir):
    output = user_dir.parent / "output"
    output.rmdir()
    output.write_text("a file where ComfyUI's output folder should be")
    err, completed = _failing_batch(fal)
    assert str(output) in str(err) and all(rid in str(err) for rid in completed)
    pending = {r["request_id"] for r in request_log.pending(user_dir)}
    assert set(completed) < pending and len(pending) == 3  # nothing saved, nothing marked completed


def test_seeding_is_told_alike_by_the_readme_and_the_node(fal, user_dir):
    """What fal does, in its own answers (the test server speaks fal's protocol: one seed per request, the one asked
    for): the README's fal column and the node's tooltips say the same, and never 'seed + i' for fal's images."""
    fal.reset(run_s=0.1)
    SDXLCNFalImg2Img().generate(batch(2), batch(1), **widgets(num_images=2, seed=40))
    assert sorted(j.args["seed"] for j in fal.jobs.values()) == [40, 42]  # request k: seed + k x num_images
    readme = Path(__file__).resolve().parent.parent / "README.md"
    row = next(line for line in readme.read_text().splitlines() if line.startswith("| `seed`"))
    fal_column = row.split(" | ")[2]
    tooltip = SDXLCNFalImg2Img.INPUT_TYPES()["required"]["seed"][1]["tooltip"]
    output = SDXLCNFalImg2Img.OUTPUT_TOOLTIPS[SDXLCNFalImg2Img.RETURN_NAMES.index("seed")]
    for text in (fal_column, tooltip, output):
        assert "once" in text and "i used seed + i" not in text, text
    for text in (fal_column, tooltip):
        words = text.replace("`", "").replace("*", "").replace(" x ", " × ")
        assert "not seed + i" in words and "request k" in words and "seed + k × num_images" in words, text
