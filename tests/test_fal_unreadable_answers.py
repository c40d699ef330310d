"""Every answer of fal's queue is checked by what the call is, never by the URL it came from (issue 30, items 1-2,
after review): a body that is not the gzip its header says, a redirect, a status or result fal-client cannot parse.

A submit (billed once fal accepts it) is never sent again on such an answer and never follows a redirect (fal's
queue API does not redirect a submission): when fal's ``x-fal-request-id`` header came, that id is recorded and the
error shows the command that fetches its result; without it, the error says what answered. A status poll is retried
like any other broken answer; a result that cannot be read is the pack's error naming the id, which stays pending.
The same holds with a self-hosted endpoint (``SDXLCN_FAL_URL``), whose poll URLs are its own. The real fal-client runs
against the fal-protocol test server on 127.0.0.1 (:mod:`fal_server`), which counts the submissions it accepts; the
answers no fal-protocol code would give come from :mod:`fal_server_faults`.
"""

from __future__ import annotations

import base64
import io
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent / "helpers"))
import fal_server  # noqa: E402

fal_server.configure_environment()  # before anything imports fal_client: it reads its hosts at import

from fal_server import fal, fal_test_server, fast_settings  # noqa: E402,F401
from fal_server_faults import ELSEWHERE, HTML_PAGE, NOT_GZIP, Answer, elsewhere_url, install, json_answer  # noqa: E402
from PIL import Image  # noqa: E402

from sdxl_controlnet_img2img.pipeline import request_log  # noqa: E402
from sdxl_controlnet_img2img.pipeline.fal.client import fetch_remote_result, run_remote  # noqa: E402
from sdxl_controlnet_img2img.pipeline.fal.errors import FalError  # noqa: E402
from sdxl_controlnet_img2img.pipeline.request import GenerationRequest  # noqa: E402

SETTINGS = dict(http_timeout_s=2.0, max_retries=2)
# status answers fal-client cannot parse (KeyError, ValueError, TypeError) or hands on in a shape that breaks the
# caller (a queue position that is no number, logs that are no list)
GARBLED_STATUS = {
    "empty": {},
    "unknown-status": {"status": "CANCELLED"},
    "queued-without-position": {"status": "IN_QUEUE"},
    "position-not-a-number": {"status": "IN_QUEUE", "queue_position": "third"},
    "logs-not-a-list": {"status": "IN_PROGRESS", "logs": {"message": "x"}},
    "not-an-object": [1, 2],
}


def _request(seed=4):
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8))
    return GenerationRequest.from_dict({"prompt": "a mill", "image_url": img, "control_image_url": img, "seed": seed})


def _run(tmp_path, **changes):
    return run_remote(_request(), request_log_dir=tmp_path, settings=fast_settings(**{**SETTINGS, **changes}))


def _posts(server) -> list:
    return [c for c in server.calls if c[0] == "POST"]


def _visited_elsewhere(server) -> bool:
    return any(path.startswith(ELSEWHERE) for _m, path, _a in server.calls)


def _assert_kept(err, server, tmp_path):
    """One job on fal, its id in the error with the fetch command, pending in the log, and fetched without paying."""
    assert server.submissions == 1 and len(server.jobs) == 1
    rid = next(iter(server.jobs))
    text = str(err.value)
    assert err.value.request_id == rid and f"fal-fetch --request-id {rid}" in text
    assert [r["request_id"] for r in request_log.pending(tmp_path)] == [rid]
    return rid


# ---- item 1: a body that is not the gzip it says ------------------------------------------------

def test_plain_fal_client_loses_the_id_of_a_submit_whose_body_is_not_the_gzip_it_says(fal, monkeypatch):
    """The truth the fix holds against: httpx cannot decode the body, and the error fal-client passes on carries no
    id, though fal accepted (and bills) the submission."""
    import fal_client
    import httpx

    install(fal, monkeypatch, submit=replace(NOT_GZIP, fal_id=True))
    with pytest.raises(httpx.DecodingError):
        fal_client.SyncClient(key=fal_server.TEST_KEY).submit(fal_server.APP, {"prompt": "x"})
    assert len(fal.jobs) == 1


def test_a_submit_whose_body_is_not_the_gzip_it_says_is_recorded_and_not_resent(fal, tmp_path, monkeypatch):
    install(fal, monkeypatch, submit=replace(NOT_GZIP, fal_id=True))
    with pytest.raises(FalError) as err:
        _run(tmp_path)
    rid = _assert_kept(err, fal, tmp_path)
    assert "not sent again" in str(err.value) and len(_posts(fal)) == 1
    assert len(fetch_remote_result(rid, request_log_dir=tmp_path, settings=fast_settings()).images) == 1
    assert fal.submissions == 1


def test_a_status_poll_whose_body_is_not_the_gzip_it_says_is_retried(fal, tmp_path, monkeypatch):
    counts = install(fal, monkeypatch, status=[NOT_GZIP])
    result = _run(tmp_path)
    assert len(result.images) == 1 and counts["status"] >= 2 and fal.submissions == 1


# ---- item 2: redirects ----------------------------------------------------------------------

@pytest.mark.parametrize("there", [HTML_PAGE, Answer(307, headers={"Location": ELSEWHERE})],
                         ids=["html-page-elsewhere", "redirect-loop"])
def test_a_submit_redirected_without_fals_id_is_neither_followed_nor_resent(fal, tmp_path, monkeypatch, there):
    install(fal, monkeypatch, submit=Answer(307, headers={"Location": elsewhere_url(fal)}), accept=False,
            elsewhere=there)
    with pytest.raises(FalError) as err:
        _run(tmp_path)
    text = str(err.value)
    assert len(_posts(fal)) == 1 and not _visited_elsewhere(fal)  # the body (and the key) went nowhere else
    assert err.value.request_id is None and "HTTP 307" in text and "redirect" in text and "not sent again" in text
    assert request_log.read(tmp_path) == []  # no id to record: fal did not answer


def test_a_submit_redirected_with_fals_id_is_recorded_not_followed(fal, tmp_path, monkeypatch):
    install(fal, monkeypatch, submit=Answer(303, headers={"Location": ELSEWHERE}, fal_id=True),
            elsewhere=json_answer({}))
    with pytest.raises(FalError) as err:
        _run(tmp_path)
    rid = _assert_kept(err, fal, tmp_path)
    assert "HTTP 303" in str(err.value) and "not sent again" in str(err.value)
    assert len(_posts(fal)) == 1 and not _visited_elsewhere(fal)
    assert len(fetch_remote_result(rid, request_log_dir=tmp_path, settings=fast_settings()).images) == 1


@pytest.mark.parametrize("there", [HTML_PAGE, Answer(307, headers={"Location": ELSEWHERE})],
                         ids=["html-page-elsewhere", "redirect-loop"])
def test_a_status_poll_redirected_to_a_broken_answer_is_retried(fal, tmp_path, monkeypatch, there):
    """A poll may follow a redirect (it starts nothing on fal), but where it lands is checked as a status answer."""
    counts = install(fal, monkeypatch, status=[Answer(307, headers={"Location": elsewhere_url(fal)})], elsewhere=there)
    result = _run(tmp_path)
    assert len(result.images) == 1 and counts["status"] >= 2 and _visited_elsewhere(fal) and fal.submissions == 1


# ---- item 3: status and result answers with missing or unknown fields ------------------------------

@pytest.mark.parametrize("body", GARBLED_STATUS.values(), ids=GARBLED_STATUS)
def test_fal_client_cannot_use_these_status_answers(body):
    """The truth: fal-client's own parser fails on them, or hands on what no caller can use."""
    import fal_client

    handle = fal_client.SyncRequestHandle("id", "r", "s", "c", client=None)
    try:
        status = handle._parse_status(body)
    except (KeyError, ValueError, TypeError):
        return
    assert not isinstance(getattr(status, "position", 0), int) or not isinstance(getattr(status, "logs", []), list)


@pytest.mark.parametrize("body", GARBLED_STATUS.values(), ids=GARBLED_STATUS)
def test_a_status_answer_garbled_once_is_retried(fal, tmp_path, monkeypatch, body):
    counts = install(fal, monkeypatch, status=[json_answer(body)])
    result = _run(tmp_path)
    assert len(result.images) == 1 and counts["status"] >= 2
    assert request_log.pending(tmp_path) == []


@pytest.mark.parametrize("body", GARBLED_STATUS.values(), ids=GARBLED_STATUS)
def test_a_status_answer_garbled_every_time_is_the_packs_error_and_the_id_stays_pending(fal, tmp_path, monkeypatch,
                                                                                        body):
    counts = install(fal, monkeypatch, status=[json_answer(body)] * 20)
    with pytest.raises(FalError) as err:
        _run(tmp_path)
    _assert_kept(err, fal, tmp_path)
    assert "pending" in str(err.value) and counts["status"] == 1 + SETTINGS["max_retries"]  # within the budget


def _png_data_uri() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.mark.parametrize("answer", [json_answer({"images": [{"url": _png_data_uri()}], "seed": "abc"}), HTML_PAGE,
                                    json_answer({"images": {"url": _png_data_uri()}, "seed": 1})],
                         ids=["seed-not-a-number", "html-page", "images-not-a-list"])
def test_a_result_that_cannot_be_read_is_the_packs_error_and_the_id_stays_pending(fal, tmp_path, monkeypatch, answer):
    install(fal, monkeypatch, result=answer)
    with pytest.raises(FalError) as err:
        _run(tmp_path)
    _assert_kept(err, fal, tmp_path)
    assert "pending" in str(err.value) and "billed again" not in str(err.value)  # fetch it, never pay again


# ---- item 5: a self-hosted endpoint (SDXLCN_FAL_URL) is checked as fal is --------------------------

@pytest.mark.parametrize("answer", [HTML_PAGE, NOT_GZIP, json_answer({})], ids=["html-page", "not-gzip", "empty"])
def test_a_self_hosted_endpoints_broken_status_answer_is_retried(fal, tmp_path, monkeypatch, answer):
    here = f"https://localhost:{fal.port}"
    monkeypatch.setattr(fal, "base", here)  # a self-hosted endpoint answers with its own URLs, not fal's queue's
    counts = install(fal, monkeypatch, status=[answer])
    result = _run(tmp_path, endpoint_url=here)
    assert len(result.images) == 1 and counts["status"] >= 2 and fal.submissions == 1
