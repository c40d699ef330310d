"""A cancel, time limit or Ctrl-C that comes while the submit POST is in flight (issue 22 a).

fal may accept (and bill) a submission before its answer reaches us: the submit is never abandoned. We wait for the
answer (bounded, and say so), the id goes to the request log, then fal is asked to cancel it. "Nothing was billed"
is said only when nothing was sent. The fal-protocol test server answers the submit late
(``submit_answer_delay_s``): the job exists on the server from the moment the body arrived.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
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
from PIL import Image  # noqa: E402

from sdxl_controlnet_img2img.pipeline import request_log  # noqa: E402
from sdxl_controlnet_img2img.pipeline.cli import main  # noqa: E402
from sdxl_controlnet_img2img.pipeline.fal.client import run_remote  # noqa: E402
from sdxl_controlnet_img2img.pipeline.fal.errors import FalCancelled, FalTimeout  # noqa: E402
from sdxl_controlnet_img2img.pipeline.request import GenerationRequest  # noqa: E402

NOTHING = "nothing was billed"


def _request(seed=3):
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8))
    return GenerationRequest.from_dict({"prompt": "a barn", "image_url": img, "control_image_url": img, "seed": seed})


def _cancel_at(seconds):
    t0 = time.monotonic()
    return lambda: time.monotonic() - t0 >= seconds


def _wait_for(predicate, what, deadline_s=10.0):
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def test_cancel_during_a_slow_submit_waits_records_the_id_and_cancels_it(fal, tmp_path):
    fal.reset(submit_answer_delay_s=1.0, queue_s=30.0)
    seen = []
    t = time.monotonic()
    with pytest.raises(FalCancelled) as err:
        run_remote(_request(), on_status=seen.append, cancel_check=_cancel_at(0.3), request_log_dir=tmp_path,
                   settings=fast_settings())
    assert time.monotonic() - t >= 0.9  # it waited for fal's answer instead of abandoning the submit
    assert fal.submissions == 1
    rid = next(iter(fal.jobs))
    assert err.value.request_id == rid and rid in str(err.value)
    assert NOTHING not in str(err.value)
    # the id was recorded, and the cancel reached fal (it was queued: fal cancelled it)
    assert [r["event"] for r in request_log.read(tmp_path) if r["request_id"] == rid] == ["submitted", "cancelled"]
    assert ("PUT", f"/{fal_server.APP}/requests/{rid}/cancel") in [(m, p) for m, p, _a in fal.calls]
    assert fal.cancelled == [rid] and fal.jobs[rid].cancelled
    # the user was told that we wait for fal's answer
    stopping = [s for s in seen if s.state == "STOPPING"]
    assert stopping and "waiting" in stopping[0].logs[0] and "answer the submission" in stopping[0].logs[0]
    assert [s.request_id for s in seen if s.state == "SUBMITTED"] == [rid]


def test_time_limit_during_a_slow_submit_keeps_a_running_request_pending(fal, tmp_path, capsys):
    fal.reset(submit_answer_delay_s=1.0, queue_s=0.0, run_s=30.0)  # running when the cancel comes: fal refuses it
    with pytest.raises(FalTimeout) as err:
        run_remote(_request(), timeout_s=0.3, request_log_dir=tmp_path, settings=fast_settings())
    rid = next(iter(fal.jobs))
    assert err.value.request_id == rid and NOTHING not in str(err.value)
    assert "may still finish" in str(err.value)
    assert any(m == "PUT" and p.endswith(f"/requests/{rid}/cancel") for m, p, _a in fal.calls)
    assert [r["request_id"] for r in request_log.pending(tmp_path)] == [rid]
    assert request_log.pending(tmp_path)[0]["last_event"] == "cancel_requested"
    assert main(["fal-pending", "--request-log-dir", str(tmp_path)]) == 0
    assert rid in capsys.readouterr().out


def test_a_cancel_before_anything_is_sent_still_says_nothing_was_billed(fal, tmp_path):
    with pytest.raises(FalCancelled) as err:
        run_remote(_request(), cancel_check=lambda: True, request_log_dir=tmp_path, settings=fast_settings())
    assert NOTHING in str(err.value) and fal.submissions == 0 and request_log.read(tmp_path) == []


def test_a_submit_unanswered_past_the_bound_is_recorded_and_cancelled_when_its_answer_comes(fal, tmp_path):
    fal.reset(submit_answer_delay_s=6.0, queue_s=30.0)
    t = time.monotonic()
    with pytest.raises(FalCancelled) as err:
        run_remote(_request(), cancel_check=_cancel_at(0.2), request_log_dir=tmp_path,
                   settings=fast_settings(submit_answer_s=0.4, http_timeout_s=20))
    assert time.monotonic() - t < 5  # the wait is bounded: not the 6 s answer (wide: CI machines are busy)
    text = str(err.value)
    assert NOTHING not in text and "may have reached fal and be billed" in text and "fal-pending" in text
    # the answer comes later: the sending thread records the id and cancels the request
    _wait_for(lambda: fal.jobs and next(iter(fal.jobs)) in fal.cancelled, "the late cancel", deadline_s=30)
    rid = next(iter(fal.jobs))
    _wait_for(lambda: [r["event"] for r in request_log.read(tmp_path)] == ["submitted", "cancelled"],
              "the late id in the request log")
    assert fal.jobs[rid].cancelled


def test_ctrl_c_in_the_cli_during_a_slow_submit(fal, tmp_path):
    """SIGINT to a real ``python -m sdxl_controlnet_img2img generate --remote fal`` while the submit is in flight."""
    fal.reset(submit_answer_delay_s=1.5, queue_s=30.0)
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(tmp_path / "in.png")
    (tmp_path / "req.json").write_text(json.dumps({"prompt": "a cat", "image_url": "in.png",
                                                   "control_image_url": "in.png", "seed": 4}))
    out = tmp_path / "out"
    env = dict(os.environ, FAL_KEY=TEST_KEY, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "sdxl_controlnet_img2img", "generate", "--remote", "fal",
                             "--request", str(tmp_path / "req.json"), "--out", str(out), "--fal-timeout", "60"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: fal.jobs or proc.poll() is not None, "the submission to reach the server", 120.0)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGINT)  # the submit's answer is still 1.5 s away
        _stdout, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    rid = next(iter(fal.jobs))
    assert proc.returncode == 2, err
    assert "waiting up to" in err and "answer the submission" in err
    assert rid in err and NOTHING not in err
    assert TEST_KEY not in err and "test-secret-not-real" not in err
    assert [r["event"] for r in request_log.read(out) if r["request_id"] == rid] == ["submitted", "cancelled"]
    assert fal.cancelled == [rid] and fal.submissions == 1


def test_keyboard_interrupt_in_a_library_caller_during_a_slow_submit(fal, tmp_path):
    """Outside the CLI (no SIGINT handler) Ctrl-C is a KeyboardInterrupt in the main thread: it is kept until fal
    answers, the id recorded and the request cancelled, then raised again for the caller."""
    fal.reset(submit_answer_delay_s=1.0, queue_s=30.0)

    def interrupt(*_):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.3)
        with pytest.raises(KeyboardInterrupt):
            run_remote(_request(), request_log_dir=tmp_path, settings=fast_settings())
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    rid = next(iter(fal.jobs))
    assert [r["event"] for r in request_log.read(tmp_path)] == ["submitted", "cancelled"]
    assert fal.cancelled == [rid]
