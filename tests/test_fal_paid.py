"""Nothing paid is lost, nothing is paid twice: the remote path against the fal-protocol test server on 127.0.0.1,
reached by the real fal-client, with faults injected (the server counts the submissions it accepts)."""

from __future__ import annotations

import logging

import numpy as np
import pytest

import fal_server

fal_server.configure_environment()  # before anything imports fal_client: it reads its hosts at import

from fal_server import fal, fal_test_server, fast_settings  # noqa: E402,F401
from PIL import Image  # noqa: E402

from sdxl_controlnet_img2img.pipeline import request_log  # noqa: E402
from sdxl_controlnet_img2img.pipeline.fal.client import fetch_remote_result, run_remote, run_remote_batch  # noqa: E402
from sdxl_controlnet_img2img.pipeline.fal.errors import (  # noqa: E402
    FalBatchIncomplete,
    FalCancelled,
    FalServerError,
    FalValidationError,
)
from sdxl_controlnet_img2img.pipeline.request import GenerationRequest  # noqa: E402


def _request(prompt="a house", seed=7):
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8))
    return GenerationRequest.from_dict({"prompt": prompt, "image_url": img, "control_image_url": img, "seed": seed})


def test_a_submit_fal_accepted_is_never_sent_twice_and_stays_recoverable(fal, tmp_path):
    fal.reset(submit_accepted_statuses=[500])
    with pytest.raises(FalServerError) as err:
        run_remote(_request(), request_log_dir=tmp_path, settings=fast_settings())
    assert fal.submissions == 1 and len(fal.jobs) == 1  # one bill, not five
    rid = next(iter(fal.jobs))
    assert err.value.request_id == rid and rid in str(err.value) and "not sent again" in str(err.value)
    assert [r["request_id"] for r in request_log.pending(tmp_path)] == [rid]
    result = fetch_remote_result(rid, request_log_dir=tmp_path, settings=fast_settings())  # recovered, not re-paid
    assert len(result.images) == 1 and fal.submissions == 1
    assert request_log.pending(tmp_path) == []


def test_an_ingress_error_is_retried_because_fal_never_saw_it(fal):
    fal.reset(submit_ingress_statuses=[502, 503])
    assert len(run_remote(_request(), settings=fast_settings()).images) == 1
    assert fal.submissions == 3 and len(fal.jobs) == 1


@pytest.mark.parametrize("bad", ["../../../other-owner/other-app/requests/abc?x=1", "abc", "123e4567-e89b-12d3",
                                 "3f2b8c1e-0d4a-4b6e-9c7f-1a2b3c4d5e6f/../../x"])
def test_a_request_id_that_is_not_fals_is_refused_before_anything_is_sent(fal, bad):
    fal.reset()
    with pytest.raises(FalValidationError, match=r"request_id: .*is not a fal request id.*nothing was sent"):
        fetch_remote_result(bad, settings=fast_settings())
    assert fal.calls == []


def test_a_refused_cancel_keeps_the_request_pending(fal, tmp_path):
    """Cancel while fal runs the request: fal refuses (ALREADY_COMPLETED here), the job may be billed, so its id
    stays in the pending list instead of being logged as cancelled."""
    fal.reset(run_s=2.0)
    state = {"running": False}

    def on_status(st):
        state["running"] = state["running"] or st.state == "IN_PROGRESS"

    with pytest.raises(FalCancelled, match="may still finish"):
        run_remote(_request(), request_log_dir=tmp_path, on_status=on_status, cancel_check=lambda: state["running"],
                   settings=fast_settings())
    rid = next(iter(fal.jobs))
    assert fal.cancelled == [rid]
    pending = request_log.pending(tmp_path)
    assert [r["request_id"] for r in pending] == [rid] and pending[0]["last_event"] == "cancel_requested"


def test_a_failed_log_write_never_loses_the_id(fal, tmp_path, caplog):
    fal.reset()
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the log folder should be")
    with caplog.at_level(logging.WARNING):
        result = run_remote(_request(), request_log_dir=blocked, settings=fast_settings())
    rid = next(iter(fal.jobs))
    assert len(result.images) == 1  # the paid result is still delivered
    assert f"could not record request {rid}" in caplog.text and "fal-fetch --request-id" in caplog.text


def test_a_batch_with_one_failure_delivers_the_completed_results(fal):
    fal.reset(fail_prompts=["broken"])
    requests = [_request("fine one", 1), _request("broken", 2), _request("fine two", 3)]
    with pytest.raises(FalBatchIncomplete) as err:
        run_remote_batch(requests, max_concurrency=3, settings=fast_settings())
    results, errors = err.value.results, err.value.errors
    assert [r is not None for r in results] == [True, False, True]
    assert errors[1] is not None and "runner failed" in str(errors[1]) and "2 of 3" not in str(errors[1])
    assert "2 of 3 fal requests completed" in str(err.value) and "#2" in str(err.value)
    assert fal.submissions == 3


def test_image_size_none_from_a_request_file_is_not_sent_to_fal():
    req = GenerationRequest.from_dict({"prompt": "x", "image_url": "a.png", "control_image_url": "b.png",
                                       "image_size": "none"})
    assert "image_size" not in req.to_fal_arguments()


def test_pending_requests_are_listed_and_fetched_by_the_cli(fal, tmp_path, capsys):
    from sdxl_controlnet_img2img.pipeline.cli import main

    fal.reset(submit_accepted_statuses=[500])
    with pytest.raises(FalServerError):
        run_remote(_request("a lost one"), request_log_dir=tmp_path, settings=fast_settings())
    rid = next(iter(fal.jobs))
    assert main(["fal-pending", "--request-log-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert rid in out and "a lost one" in out
    assert main(["fal-pending", "--request-log-dir", str(tmp_path), "--fetch", str(tmp_path / "got")]) == 0
    assert (tmp_path / "got" / rid / "image_000.png").is_file() and fal.submissions == 1
    assert request_log.pending(tmp_path) == []
    assert main(["fal-pending", "--request-log-dir", str(tmp_path)]) == 0
    assert "no pending fal requests" in capsys.readouterr().err
