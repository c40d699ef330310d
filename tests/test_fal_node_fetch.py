"""The fal node's ``request_id`` input with several ids (issue 22 h): each result is saved to the output folder as it
arrives, only what reached the user is marked completed, and results of different sizes come back without an error.
Against the fal-protocol test server; ComfyUI's ``folder_paths`` is the ``user_dir`` fixture's stand-in."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent / "helpers"))
import fal_server  # noqa: E402

fal_server.configure_environment()

from fal_server import fal, fal_test_server, fast_settings, user_dir  # noqa: E402,F401
from PIL import Image, ImageOps  # noqa: E402

from sdxl_controlnet_img2img.nodes.fal_node import SDXLCNFalImg2Img  # noqa: E402
from sdxl_controlnet_img2img.pipeline import request_log  # noqa: E402
from sdxl_controlnet_img2img.pipeline.fal.client import run_remote  # noqa: E402
from sdxl_controlnet_img2img.pipeline.fal.errors import FalError, FalTimeout  # noqa: E402
from sdxl_controlnet_img2img.pipeline.request import GenerationRequest  # noqa: E402
from test_fal_node import InterruptProcessingException, batch, comfy_interrupt, widgets  # noqa: E402


def _pending_request(log_dir, w, h, seed, prompt="a house"):
    """Submit a request and stop waiting before it finishes: its id is pending, as after a ComfyUI restart."""
    rng = np.random.default_rng(seed)
    init = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    req = GenerationRequest.from_dict({"prompt": prompt, "image_url": init, "control_image_url": init, "seed": seed})
    with pytest.raises(FalTimeout) as err:
        run_remote(req, timeout_s=0.3, request_log_dir=log_dir, settings=fast_settings())
    return err.value.request_id, ImageOps.invert(init)


def _as_array(image_tensor, i):
    return np.clip(np.round(image_tensor[i].numpy() * 255), 0, 255).astype(np.uint8)


def test_ids_of_different_sizes_are_all_saved_and_the_first_size_is_returned(fal, user_dir):
    fal.reset(run_s=0.8)
    a, a_img = _pending_request(user_dir, 32, 24, 1)
    b, b_img = _pending_request(user_dir, 40, 32, 2)  # another size
    c, c_img = _pending_request(user_dir, 32, 24, 3)
    assert len(request_log.pending(user_dir)) == 3
    out, seed, flags, prompt = SDXLCNFalImg2Img().generate(batch(1), batch(1), request_id=f"{a}\n{b}\n{c}",
                                                           **widgets())
    # the IMAGE batch: the results of the first result's size, in id order
    assert tuple(out.shape) == (2, 24, 32, 3) and seed == 1 and flags == "[false, false]" and prompt == "a house"
    assert np.array_equal(_as_array(out, 0), np.asarray(a_img)) and np.array_equal(_as_array(out, 1), np.asarray(c_img))
    # every result, the other size included, is in the output folder
    output = user_dir.parent / "output"
    for rid, img in ((a, a_img), (b, b_img), (c, c_img)):
        assert np.array_equal(np.asarray(Image.open(output / f"sdxlcn_fal_{rid}_00.png")), np.asarray(img))
    assert request_log.pending(user_dir) == []
    assert fal.submissions == 3  # fetched, not paid again


def test_a_failed_id_keeps_the_fetched_results_and_stays_pending(fal, user_dir):
    fal.reset(run_s=0.8, fail_prompts=["broken"])
    good, good_img = _pending_request(user_dir, 32, 24, 1)
    bad, _ = _pending_request(user_dir, 32, 24, 2, prompt="broken")
    late, late_img = _pending_request(user_dir, 32, 24, 3)
    with pytest.raises(FalError) as err:
        SDXLCNFalImg2Img().generate(batch(1), batch(1), request_id=f"{good}\n{bad}\n{late}", **widgets())
    text = str(err.value)
    assert "1 of 3" in text and bad in text and "runner failed" in text
    output = user_dir.parent / "output"
    saved = sorted(p.name for p in output.iterdir())
    assert saved == sorted([f"sdxlcn_fal_{good}_00.png", f"sdxlcn_fal_{late}_00.png"])
    assert all(name in text for name in saved)
    assert np.array_equal(np.asarray(Image.open(output / saved[saved.index(f"sdxlcn_fal_{good}_00.png")])),
                          np.asarray(good_img))
    # only what reached the user is completed: the failed id stays pending, to be fetched again
    assert [r["request_id"] for r in request_log.pending(user_dir)] == [bad]


def test_outside_comfyui_without_an_output_folder_only_returned_ids_are_completed(fal, tmp_path, monkeypatch):
    """No ``folder_paths`` at all (library use of the node class): nothing can be saved, so an id whose images are
    left out of the IMAGE batch (another size) stays pending."""
    import sdxl_controlnet_img2img.nodes.fal_node as fal_node

    monkeypatch.setattr(fal_node, "_fal_options", lambda t: {"key_file": None, "request_log_dir": tmp_path,
                                                              "timeout_s": float(t)})
    monkeypatch.delitem(sys.modules, "folder_paths", raising=False)
    fal.reset(run_s=0.8)
    a, _ = _pending_request(tmp_path, 32, 24, 1)
    b, _ = _pending_request(tmp_path, 40, 32, 2)
    out, *_ = SDXLCNFalImg2Img().generate(batch(1), batch(1), request_id=f"{a},{b}", **widgets())
    assert tuple(out.shape) == (1, 24, 32, 3)
    assert [r["request_id"] for r in request_log.pending(tmp_path)] == [b]


def test_the_node_names_unfetched_ids_in_the_server_log(fal, user_dir, caplog):
    """Inside ComfyUI the pending list is reachable without a shell: each run lists the ids never fetched."""
    import logging

    fal.reset(run_s=0.8)
    rid, _img = _pending_request(user_dir, 32, 24, 1)
    fal.behaviour.run_s = 0.05
    with caplog.at_level(logging.WARNING, logger="sdxl_controlnet_img2img"):
        SDXLCNFalImg2Img().generate(batch(1), batch(1), **widgets())
    assert any(rid in r.getMessage() and "never fetched" in r.getMessage() for r in caplog.records)


def test_an_id_is_marked_completed_only_after_its_result_is_saved(fal, user_dir):
    """Saved, then marked completed: when the save fails (a file where the output folder should be) the error names
    the folder and the id stays pending, to be fetched again; the other id is saved and completed."""
    fal.reset(run_s=0.8)
    rid, _img = _pending_request(user_dir, 32, 24, 1)
    output = user_dir.parent / "output"
    output.rmdir()
    output.write_text("a file where ComfyUI's output folder should be")
    with pytest.raises(FalError) as err:
        SDXLCNFalImg2Img().generate(batch(1), batch(1), request_id=rid, **widgets())
    assert str(output) in str(err.value) and rid in str(err.value)
    assert [r["request_id"] for r in request_log.pending(user_dir)] == [rid]
    output.unlink()  # the folder fixed: the same id is fetched, saved, then completed
    SDXLCNFalImg2Img().generate(batch(1), batch(1), request_id=rid, **widgets())
    assert (output / f"sdxlcn_fal_{rid}_00.png").is_file() and request_log.pending(user_dir) == []
    assert fal.submissions == 1


def test_cancel_on_a_fetch_by_id_only_stops_waiting(fal, user_dir, monkeypatch):
    """ComfyUI's Cancel while the node waits for a fetched id: it stops waiting; the request (still queued, so a
    cancel would be honoured) is not cancelled on fal and stays pending."""
    import threading
    import time

    flag = comfy_interrupt(monkeypatch)
    fal.reset(queue_s=30.0)
    rid, _img = _pending_request(user_dir, 32, 24, 2)
    polls = len(fal.calls)

    def cancel_once_waiting():
        end = time.monotonic() + 10
        while len(fal.calls) < polls + 2 and time.monotonic() < end:
            time.sleep(0.02)
        flag.set()

    threading.Thread(target=cancel_once_waiting, daemon=True).start()
    with pytest.raises(InterruptProcessingException):
        SDXLCNFalImg2Img().generate(batch(1), batch(1), request_id=rid, **widgets())
    assert fal.cancelled == [] and not any(m == "PUT" for m, _p, _a in fal.calls)
    assert [r["event"] for r in request_log.read(user_dir) if r["request_id"] == rid] == ["submitted"]


@pytest.mark.parametrize("typo", ["not-an-id", "3f2b8c1e-0d4a-4b6e-9c7f"])
def test_a_malformed_id_among_good_ones_sends_nothing_and_says_so_once(fal, user_dir, typo):
    """A malformed id is refused with every other id before anything is sent: one message, naming the line, that
    says nothing was sent (it used to be fetched around, then the whole run was told its failed ids "stay in the
    pending list", which a malformed id never was in)."""
    from sdxl_controlnet_img2img.pipeline.fal.errors import FalValidationError

    fal.reset(run_s=0.2)
    good, _img = _pending_request(user_dir, 32, 24, 1)
    before = len(fal.calls)
    with pytest.raises(FalValidationError) as err:
        SDXLCNFalImg2Img().generate(batch(1), batch(1), request_id=f"{good}\n{typo}", **widgets())
    text = str(err.value)
    assert text.startswith("request_id: ") and f"'{typo}' (id 2 of 2) is not a fal request id" in text, text
    assert "nothing was sent" in text and "pending" not in text, text
    assert fal.calls[before:] == []  # no request of any kind reached fal
    assert [r["request_id"] for r in request_log.pending(user_dir)] == [good]  # untouched: still to be fetched
