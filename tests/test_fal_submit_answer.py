"""A submit whose answer goes wrong after its headers arrived is never sent again (issue 30, item 1).

fal has accepted (and bills) such a submission: its answer's headers came, then the body was cut off, stalled past
the read timeout, or was not JSON (an HTML 200 from a proxy). fal-client's own retry (``_maybe_retry_request``)
re-sends a POST on any ``httpx`` transport error or timeout, so no such error may reach it: the real fal-client runs
against the fal-protocol test server on 127.0.0.1, which counts the submissions it accepts. The id, when the answer's
``x-fal-request-id`` header carries it, is recorded and shown with the command that fetches the result.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent / "helpers"))
import fal_server  # noqa: E402

fal_server.configure_environment()  # before anything imports fal_client: it reads its hosts at import

from fal_server import fal, fal_test_server, fast_settings  # noqa: E402,F401
from PIL import Image  # noqa: E402

from sdxl_controlnet_img2img.pipeline import request_log  # noqa: E402
from sdxl_controlnet_img2img.pipeline.fal.client import fetch_remote_result, run_remote  # noqa: E402
from sdxl_controlnet_img2img.pipeline.fal.errors import FalError  # noqa: E402
from sdxl_controlnet_img2img.pipeline.request import GenerationRequest  # noqa: E402

FAULTS = ["cutoff", "stall", "html"]


def _request(seed=4):
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8))
    return GenerationRequest.from_dict({"prompt": "a mill", "image_url": img, "control_image_url": img, "seed": seed})


def _settings():
    return fast_settings(http_timeout_s=0.6)  # the stalled answer passes the read timeout; the server stalls 5 s


def test_fal_clients_own_retry_resends_a_submit_whose_body_is_cut_off(fal):
    """The truth the fix holds against: plain fal-client sends the submit again when the answer's body is cut off,
    so that error must never reach it."""
    import fal_client

    fal.reset(submit_answer_faults=["cutoff"])
    handle = fal_client.SyncClient(key=fal_server.TEST_KEY).submit(fal_server.APP, {"prompt": "x"})
    assert fal.submissions == 2 and len(fal.jobs) == 2 and handle.request_id in fal.jobs


@pytest.mark.parametrize("fault", FAULTS)
def test_an_accepted_submit_whose_answer_breaks_is_recorded_shown_and_recovered_not_resent(fal, tmp_path, fault):
    fal.reset(submit_answer_faults=[fault], run_s=0.05)
    with pytest.raises(FalError) as err:
        run_remote(_request(), request_log_dir=tmp_path, settings=_settings())
    assert fal.submissions == 1 and len(fal.jobs) == 1  # one bill
    rid = next(iter(fal.jobs))
    text = str(err.value)
    assert err.value.request_id == rid
    assert f"fal-fetch --request-id {rid}" in text and request_log.cli_command() in text  # the recovery command
    assert "not sent again" in text
    assert [r["request_id"] for r in request_log.pending(tmp_path)] == [rid]
    result = fetch_remote_result(rid, request_log_dir=tmp_path, settings=_settings())  # recovered, not re-paid
    assert len(result.images) == 1 and fal.submissions == 1
    assert request_log.pending(tmp_path) == []


@pytest.mark.parametrize("fault", FAULTS)
def test_without_fals_id_header_the_submit_is_still_not_resent(fal, tmp_path, fault):
    """Headers came without ``x-fal-request-id``: the id is unknown, but the submission may have reached fal. It is
    not sent again, and the user is told where to look."""
    fal.reset(submit_answer_faults=[fault], fault_request_id=False)
    with pytest.raises(FalError) as err:
        run_remote(_request(), request_log_dir=tmp_path, settings=_settings())
    assert fal.submissions == 1 and len(fal.jobs) == 1
    text = str(err.value)
    assert err.value.request_id is None and "not sent again" in text and "fal.ai/dashboard/requests" in text
    assert request_log.read(tmp_path) == []  # no id to record


def test_a_409_fal_answers_after_accepting_is_not_resent(fal, tmp_path):
    """fal-client retries 408/409 itself; after a submit fal answered (its id in the header) that is a second bill."""
    fal.reset(submit_accepted_statuses=[409])
    with pytest.raises(FalError) as err:
        run_remote(_request(), request_log_dir=tmp_path, settings=_settings())
    assert fal.submissions == 1
    rid = next(iter(fal.jobs))
    assert err.value.request_id == rid and f"fal-fetch --request-id {rid}" in str(err.value)
    assert [r["request_id"] for r in request_log.pending(tmp_path)] == [rid]


def test_the_cli_prints_the_id_and_the_command_in_one_error_line(fal, tmp_path, capsys):
    from sdxl_controlnet_img2img.pipeline.cli import main

    rng = np.random.default_rng(2)
    Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(tmp_path / "init.png")
    (tmp_path / "req.json").write_text('{"prompt": "a mill", "image_url": "init.png", "control_image_url": '
                                       '"init.png", "seed": 3}')
    fal.reset(submit_answer_faults=["cutoff"])
    assert main(["generate", "--remote", "fal", "--request", str(tmp_path / "req.json"),
                 "--out", str(tmp_path / "out")]) == 2
    rid = next(iter(fal.jobs))
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"fal-fetch --request-id {rid}" in errors[0]
    assert fal.submissions == 1 and [r["request_id"] for r in request_log.pending(tmp_path / "out")] == [rid]
