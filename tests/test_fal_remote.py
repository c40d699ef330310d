"""The remote path against a real fal-protocol HTTPS server on 127.0.0.1, reached by fal_client itself."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent / "helpers"))
import fal_server  # noqa: E402

fal_server.configure_environment()  # before anything imports fal_client: it reads its hosts at import

from fal_server import TEST_KEY, fal, fal_test_server, fast_settings  # noqa: E402,F401
from PIL import Image, ImageOps  # noqa: E402

from sdxl_controlnet_img2img.pipeline import request_log  # noqa: E402
from sdxl_controlnet_img2img.pipeline.errors import SDXLCNError  # noqa: E402
from sdxl_controlnet_img2img.pipeline.fal.errors import (  # noqa: E402
    FalAuthError,
    FalCancelled,
    FalConnectionError,
    FalImageDownloadError,
    FalKeyMissing,
    FalNoImages,
    FalRateLimited,
    FalRequestFailed,
    FalServerError,
    FalTimeout,
    FalValidationError,
)
from sdxl_controlnet_img2img.pipeline.fal.client import (  # noqa: E402
    ENDPOINT,
    fetch_remote_result,
    run_remote,
    run_remote_batch,
)
from sdxl_controlnet_img2img.pipeline.request import GenerationRequest  # noqa: E402

SECRET_PARTS = (TEST_KEY, "test-secret-not-real")


def make_image(w=40, h=32, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def make_request(tmp_path=None, seed=7, **fields):
    init = make_image(seed=seed)
    data = {"prompt": "a house", "image_url": init, "control_image_url": make_image(seed=seed + 100), "seed": seed}
    data.update(fields)
    return GenerationRequest.from_dict(data), init


def assert_no_key(*texts):
    for text in texts:
        for part in SECRET_PARTS:
            assert part not in str(text), f"the key leaked into: {str(text)[:300]}"


def test_happy_path_queue_logs_images_and_request_log(fal, tmp_path):
    fal.reset(queue_s=0.3, queue_ahead=3, run_s=0.2)
    req, init = make_request(num_images=2)
    statuses, log_at_submit = [], []

    def on_status(st):
        statuses.append(st)
        if st.state == "SUBMITTED":
            log_at_submit.append(request_log.read(tmp_path))

    result = run_remote(req, on_status=on_status, request_log_dir=tmp_path, settings=fast_settings())

    assert len(result.images) == 2
    expected = ImageOps.invert(init)
    assert np.array_equal(np.asarray(result.images[0]), np.asarray(expected))
    assert np.array_equal(np.asarray(result.images[1]), np.asarray(expected.rotate(180)))
    assert result.seed == 7 and result.has_nsfw_concepts == [False, False]
    assert (result.width, result.height) == (40, 32) and result.prompt == "a house"

    states = [s.state for s in statuses]
    assert states[0] == "SUBMITTED" and states[-1] == "COMPLETED" and "IN_QUEUE" in states
    positions = [s.queue_position for s in statuses if s.state == "IN_QUEUE"]
    assert positions and positions[0] >= 1 and positions == sorted(positions, reverse=True)
    logs = [line for s in statuses for line in s.logs]
    assert logs == ["loading model", "step 1/2", "step 2/2"]  # each line once, in order

    rid = statuses[0].request_id
    # the id was on disk before waiting started
    assert [r["request_id"] for r in log_at_submit[0]] == [rid]
    assert log_at_submit[0][0]["endpoint"] == ENDPOINT
    assert [r["event"] for r in request_log.read(tmp_path)] == ["submitted", "completed"]
    # what fal got: data URIs, fal's field names, no local-only field
    args = fal.jobs[rid].args
    assert args["image_url"].startswith("data:image/png;base64,")
    assert args["control_image_url"].startswith("data:image/png;base64,")
    assert "apply_canny" not in args and args["seed"] == 7 and args["num_images"] == 2
    # every API call carried the key header; the result image downloads did not (the key goes to fal's API only)
    assert all(auth == f"Key {TEST_KEY}" for _m, p, auth in fal.calls if not p.startswith("/files/"))
    assert [auth for _m, p, auth in fal.calls if p.startswith("/files/")] == ["", ""]


def test_sync_mode_data_uri_results_are_decoded(fal):
    req, init = make_request(sync_mode=True)
    result = run_remote(req, settings=fast_settings())
    assert np.array_equal(np.asarray(result.images[0]), np.asarray(ImageOps.invert(init)))
    rid = next(iter(fal.jobs))
    assert fal.jobs[rid].args["sync_mode"] is True
    assert not any(p.startswith("/files/") for _m, p, _a in fal.calls)


def test_nsfw_flags_come_back_as_fal_reports_them(fal):
    fal.reset(nsfw=[True])
    req, _ = make_request()
    assert run_remote(req, settings=fast_settings()).has_nsfw_concepts == [True]


def test_local_path_input_and_large_input_uploaded_to_storage(fal, tmp_path):
    path = tmp_path / "init.png"
    init = make_image(seed=3)
    init.save(path)
    req = GenerationRequest.from_dict({"prompt": "p", "image_url": str(path), "control_image_url": make_image(seed=4),
                                       "seed": 1})
    host = fal_server.configure_environment()["host"]
    settings = fast_settings(upload_threshold_bytes=1000, upload_repository="fal", host_map={"rest.fal.ai": host})
    result = run_remote(req, settings=settings)
    assert np.array_equal(np.asarray(result.images[0]), np.asarray(ImageOps.invert(init)))
    rid = next(iter(fal.jobs))
    args = fal.jobs[rid].args
    assert args["image_url"].startswith(fal.base + "/files/") and args["control_image_url"].startswith(fal.base)
    assert len(fal.uploads) == 2
    # the uploaded bytes are the file's own bytes (a local path is not re-encoded)
    assert fal.files[args["image_url"].rsplit("/", 1)[1]][0] == path.read_bytes()


def test_local_lora_path_is_refused_before_anything_is_paid(fal):
    req, _ = make_request(loras=[{"path": "/models/loras/my.safetensors", "scale": 0.8}])
    with pytest.raises(FalValidationError) as err:
        run_remote(req, settings=fast_settings())
    assert err.value.field == "loras[0].path" and not fal.jobs


@pytest.mark.parametrize("code", [401, 403])
def test_auth_errors_show_fals_detail_verbatim(fal, code):
    detail = "User is locked. Reason: Exhausted balance. Top up your balance at fal.ai/dashboard/billing."
    fal.reset(auth_detail=detail, auth_status=code)
    req, _ = make_request()
    with pytest.raises(FalAuthError) as err:
        run_remote(req, settings=fast_settings())
    assert detail in str(err.value) and f"HTTP {code}" in str(err.value)
    assert err.value.status_code == code
    assert len([c for c in fal.calls if c[0] == "POST"]) == 1  # never retried


def test_wrong_key_echoed_by_fal_is_redacted_everywhere(fal, monkeypatch, caplog, capsys, tmp_path):
    wrong = "wrong-key-id-0000:wrong-secret-0000-not-real"
    monkeypatch.setenv("FAL_KEY", wrong)
    req, _ = make_request()
    caplog.set_level(logging.DEBUG)
    with pytest.raises(FalAuthError) as err:
        run_remote(req, settings=fast_settings(), request_log_dir=tmp_path)
    text = str(err.value) + repr(err.value) + err.value.detail
    assert "Invalid key" in text
    out = capsys.readouterr()
    for blob in (text, caplog.text, out.out, out.err):
        assert wrong not in blob and "wrong-secret-0000-not-real" not in blob
    assert "[fal key redacted]" in str(err.value)


@pytest.mark.parametrize("where", ["submit", "result"])
def test_422_names_the_field(fal, where):
    fal.reset(validation_at=where, reject=[{"loc": ["body", "loras", 0, "path"], "msg": "could not download the LoRA",
                                            "type": "value_error"}])
    req, _ = make_request(loras=[{"path": "https://example.invalid/l.safetensors", "scale": 1.0}])
    with pytest.raises(FalValidationError) as err:
        run_remote(req, settings=fast_settings())
    assert err.value.field == "loras.0.path"
    assert "could not download the LoRA" in str(err.value)


def test_429_is_retried_then_succeeds(fal):
    fal.reset(submit_statuses=[429, 429])
    req, _ = make_request()
    assert len(run_remote(req, settings=fast_settings()).images) == 1
    assert len([c for c in fal.calls if c[0] == "POST"]) == 3


def test_429_past_the_retry_limit_is_a_clear_error(fal):
    fal.reset(submit_statuses=[429] * 10)
    req, _ = make_request()
    t = time.monotonic()
    with pytest.raises(FalRateLimited) as err:
        run_remote(req, settings=fast_settings(max_retries=2))
    assert time.monotonic() - t < 5
    assert "HTTP 429" in str(err.value) and "after 2 retries" in str(err.value)
    assert len([c for c in fal.calls if c[0] == "POST"]) == 3 and not fal.jobs


def test_5xx_while_polling_retried_then_clear_error_with_request_id(fal, tmp_path):
    fal.reset(status_statuses=[502])
    req, _ = make_request()
    assert len(run_remote(req, settings=fast_settings()).images) == 1

    fal.reset(status_statuses=[503] * 10)
    with pytest.raises(FalServerError) as err:
        run_remote(req, settings=fast_settings(max_retries=2), request_log_dir=tmp_path)
    rid = next(iter(fal.jobs))
    assert err.value.status_code == 503 and err.value.request_id == rid and rid in str(err.value)
    assert request_log.find(tmp_path, rid)["event"] == "submitted"


def test_5xx_on_result_fetch_is_retried(fal):
    fal.reset(result_statuses=[500, 500])
    req, _ = make_request()
    assert len(run_remote(req, settings=fast_settings()).images) == 1


def test_hanging_server_times_out_without_hanging(fal):
    fal.reset(hang_status_s=30.0)
    req, _ = make_request()
    t = time.monotonic()
    with pytest.raises(FalTimeout) as err:
        run_remote(req, settings=fast_settings(http_timeout_s=0.3, max_retries=1))
    assert time.monotonic() - t < 10  # two 0.3 s tries, not the 30 s hang (wide: CI machines are busy)
    assert err.value.request_id in str(err.value)


def test_overall_timeout_bounds_the_wait(fal):
    fal.reset(hang_status_s=30.0)
    req, _ = make_request()
    t = time.monotonic()
    with pytest.raises(FalTimeout):
        run_remote(req, timeout_s=0.5, settings=fast_settings(http_timeout_s=30))
    assert time.monotonic() - t < 10  # the 0.5 s bound, not the 30 s call (wide: CI machines are busy)


def test_dropped_connection(fal):
    fal.reset(drop_status=1)
    req, _ = make_request()
    assert len(run_remote(req, settings=fast_settings()).images) == 1  # one drop: retried

    fal.reset(drop_status=100)
    with pytest.raises(FalConnectionError) as err:
        run_remote(req, settings=fast_settings(max_retries=2))
    assert "connection to fal failed" in str(err.value) and err.value.request_id


def test_refused_connection_is_a_quick_clear_error(fal):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    req, _ = make_request()
    t = time.monotonic()
    with pytest.raises(FalConnectionError) as err:
        run_remote(req, settings=fast_settings(host_map={"127.0.0.1": f"127.0.0.1:{closed_port}"}))
    assert time.monotonic() - t < 5
    assert err.value.request_id is None


def test_result_without_images_is_an_error_not_a_blank(fal):
    fal.reset(no_images=True)
    req, _ = make_request()
    with pytest.raises(FalNoImages) as err:
        run_remote(req, settings=fast_settings())
    assert "no images" in str(err.value)


def test_failing_image_url_is_an_error(fal):
    fal.reset(image_status=404)
    req, _ = make_request()
    with pytest.raises(FalImageDownloadError) as err:
        run_remote(req, settings=fast_settings())
    assert "HTTP 404" in str(err.value) and err.value.request_id in str(err.value)


def test_completed_with_error(fal):
    fal.reset(completed_error="CUDA out of memory on the runner")
    req, _ = make_request()
    with pytest.raises(FalRequestFailed) as err:
        run_remote(req, settings=fast_settings())
    assert "CUDA out of memory on the runner" in str(err.value)


def test_recover_result_by_recorded_id_after_client_timeout(fal, tmp_path):
    fal.reset(queue_s=0.2, run_s=0.8)
    req, init = make_request()
    with pytest.raises(FalTimeout) as err:
        run_remote(req, timeout_s=0.3, request_log_dir=tmp_path, settings=fast_settings())
    rid = err.value.request_id
    assert rid and rid in str(err.value) and "fal-fetch" in str(err.value)
    pending = request_log.pending(tmp_path)
    assert [r["request_id"] for r in pending] == [rid]
    submits = len([c for c in fal.calls if c[0] == "POST"])

    result = fetch_remote_result(rid, request_log_dir=tmp_path, timeout_s=10, settings=fast_settings())
    assert np.array_equal(np.asarray(result.images[0]), np.asarray(ImageOps.invert(init)))
    assert len([c for c in fal.calls if c[0] == "POST"]) == submits  # nothing submitted (paid) again
    assert request_log.pending(tmp_path) == []


def test_fetch_unknown_id_is_clear(fal):
    with pytest.raises(FalRequestFailed) as err:
        fetch_remote_result("3f2b8c1e-0d4a-4b6e-9c7f-1a2b3c4d5e6f", settings=fast_settings())
    assert "3f2b8c1e-0d4a-4b6e-9c7f-1a2b3c4d5e6f" in str(err.value) and "404" in str(err.value)


def test_cancel_mid_run_asks_fal_and_stops_at_once(fal, tmp_path):
    fal.reset(queue_s=30.0, queue_ahead=5)
    req, _ = make_request()
    seen = []

    def cancel_check():
        return any(s.state == "IN_QUEUE" for s in seen)

    t = time.monotonic()
    with pytest.raises(FalCancelled) as err:
        run_remote(req, on_status=seen.append, cancel_check=cancel_check, request_log_dir=tmp_path,
                   settings=fast_settings(poll_interval_s=30.0))
    assert time.monotonic() - t < 10  # did not sit out the 30 s poll interval, nor the 30 s queue
    rid = err.value.request_id
    assert fal.cancelled == [rid] and fal.jobs[rid].cancelled
    assert any(c[0] == "PUT" and c[1].endswith(f"/requests/{rid}/cancel") for c in fal.calls)
    assert request_log.find(tmp_path, rid)["last_event"] == "cancelled"


def test_cancel_while_a_call_hangs_stops_waiting_at_once(fal):
    fal.reset(hang_status_s=30.0)
    req, _ = make_request()
    t0 = time.monotonic()
    with pytest.raises(FalCancelled):
        run_remote(req, cancel_check=lambda: time.monotonic() - t0 > 0.3, settings=fast_settings(http_timeout_s=30))
    assert time.monotonic() - t0 < 10  # not the 30 s call (wide: CI machines are busy)


def test_batch_keeps_order_and_bounds_concurrency(fal):
    fal.reset(queue_s=0.0, run_s=0.4)
    pairs = [make_request(seed=s) for s in range(5)]
    t = time.monotonic()
    results = run_remote_batch([r for r, _ in pairs], max_concurrency=2, settings=fast_settings())
    elapsed = time.monotonic() - t
    assert fal.max_active == 2
    assert len(fal.jobs) == 5
    for (req, init), res in zip(pairs, results):
        assert res.seed == req.seed
        assert np.array_equal(np.asarray(res.images[0]), np.asarray(ImageOps.invert(init)))
    assert elapsed >= 0.4 * 3 * 0.9  # 5 requests, 2 at a time: at least 3 rounds


def test_batch_raises_first_failure_after_all_finish(fal):
    fal.reset(reject=[{"loc": ["body", "prompt"], "msg": "flagged", "type": "value_error"}])
    with pytest.raises(FalValidationError) as err:
        run_remote_batch([make_request(seed=s)[0] for s in range(3)], max_concurrency=3, settings=fast_settings())
    assert err.value.field == "prompt"


# ---- the key --------------------------------------------------------------------------------

def test_missing_key_says_how_to_set_it(fal, monkeypatch, tmp_path):
    monkeypatch.delenv("FAL_KEY")
    req, _ = make_request()
    with pytest.raises(FalKeyMissing) as err:
        run_remote(req, key_file=tmp_path / "fal_key.txt", settings=fast_settings())
    assert "FAL_KEY" in str(err.value) and "fal_key.txt" in str(err.value)
    assert not fal.calls


def test_key_from_id_and_secret_and_from_key_file(fal, monkeypatch, tmp_path):
    monkeypatch.delenv("FAL_KEY")
    key_id, secret = TEST_KEY.split(":")
    monkeypatch.setenv("FAL_KEY_ID", key_id)
    monkeypatch.setenv("FAL_KEY_SECRET", secret)
    req, _ = make_request()
    assert run_remote(req, settings=fast_settings()).images
    monkeypatch.delenv("FAL_KEY_ID")
    monkeypatch.delenv("FAL_KEY_SECRET")
    key_file = tmp_path / "fal_key.txt"
    key_file.write_text(f"# my fal key\n{TEST_KEY}\n")
    assert run_remote(req, key_file=key_file, settings=fast_settings()).images
    assert all(auth == f"Key {TEST_KEY}" for _m, p, auth in fal.calls if not p.startswith("/files/"))


def test_key_absent_from_every_output_log_and_error(fal, caplog, capsys, tmp_path):
    caplog.set_level(logging.DEBUG)
    texts = []
    req, _ = make_request()
    scenarios = [
        dict(auth_detail=f"Key {TEST_KEY} is not authorised"),  # fal echoing the key back
        dict(submit_statuses=[429] * 5),
        dict(status_statuses=[503] * 5),
        dict(drop_status=10),
        dict(no_images=True),
        dict(image_status=500),
        dict(completed_error=f"runner failed for {TEST_KEY}"),
        dict(reject=[{"loc": ["body", "prompt"], "msg": f"bad {TEST_KEY}", "type": "x"}]),
        dict(),
    ]
    for sc in scenarios:
        fal.reset(**sc)
        try:
            res = run_remote(req, request_log_dir=tmp_path, settings=fast_settings(max_retries=1),
                             on_status=lambda s: texts.append(repr(s)))
            texts.append(repr(res))
        except SDXLCNError as exc:
            texts.extend([str(exc), repr(exc), repr(exc.args), repr(vars(exc))])
    out = capsys.readouterr()
    texts += [caplog.text, out.out, out.err, request_log.log_path(tmp_path).read_text()]
    assert_no_key(*texts)
    assert any("[fal key redacted]" in t for t in texts)  # the echoes were there, and were redacted


def test_status_callback_raising_cancels_the_request(fal):
    """ComfyUI's progress hook raises its interrupt from inside the callback: fal is still asked to cancel."""
    fal.reset(queue_s=30.0)
    req, _ = make_request()

    def on_status(st):
        if st.state == "IN_QUEUE":
            raise RuntimeError("interrupted by the user")

    with pytest.raises(FalCancelled) as err:
        run_remote(req, on_status=on_status, settings=fast_settings())
    assert fal.cancelled == [err.value.request_id]


def test_local_failure_reason_for_the_fallback():
    from sdxl_controlnet_img2img.pipeline.errors import RequestError
    from sdxl_controlnet_img2img.pipeline.local.fallback import local_failure_reason

    class OutOfMemoryError(RuntimeError):
        pass

    assert "out of GPU memory" in local_failure_reason(OutOfMemoryError("CUDA out of memory. Tried to allocate"))
    assert "no usable GPU" in local_failure_reason(RuntimeError("Found no NVIDIA driver on your system."))
    assert local_failure_reason(RequestError("strength", "must be in (0, 1]")) is None
    assert local_failure_reason(FileNotFoundError("model.safetensors")) is None
