"""Recovery writes before it records (issue 30, item 2): ``fal-pending --fetch``, ``fal-fetch`` and ``generate --remote
fal`` mark a paid request "completed" only once its result's files exist. A folder that cannot be written is one
``error:`` line naming it, the id stays pending, and ``fal-pending --fetch`` goes on with the other ids. Stopping a
fetch by id (Ctrl-C) only stops waiting: the request is not cancelled on fal. Against the fal-protocol test server on
127.0.0.1, reached by the real fal-client; a folder that cannot be written is a file where the folder should be (the
tests may run as root, for whom permissions do not stop a write). Such a folder given on the command line is refused
before anything is submitted or fetched; one that fails only at write time is a folder where an image should go.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
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
from sdxl_controlnet_img2img.pipeline.cli import main  # noqa: E402
from sdxl_controlnet_img2img.pipeline.fal.client import fetch_remote_result  # noqa: E402
from sdxl_controlnet_img2img.pipeline.fal.errors import FalCancelled  # noqa: E402
from test_fal_node_fetch import _pending_request  # noqa: E402


def _blocked(path: Path) -> Path:
    """A file where a folder should be: nothing can be written into it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("a file where the output folder should be")
    return path


def _fails_at_write(out: Path) -> Path:
    """A folder that passes every check before the run but whose first image cannot be written (a folder stands where
    it goes), as a disk that fills up while fal runs."""
    (out / "image_000.png").mkdir(parents=True)
    return out / "image_000.png"


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error:")]


def _pending(log_dir) -> list[str]:
    return [r["request_id"] for r in request_log.pending(log_dir)]


def test_fal_pending_fetch_records_after_writing_and_goes_on_past_a_folder_it_cannot_write(fal, tmp_path, capsys):
    fal.reset(run_s=0.8)
    log_dir = tmp_path / "log"
    (first, _), (second, second_img) = (_pending_request(log_dir, 32, 24, s) for s in (1, 2))
    got = tmp_path / "got"
    blocked = _blocked(got / first)
    assert main(["fal-pending", "--request-log-dir", str(log_dir), "--fetch", str(got)]) == 2
    err = capsys.readouterr().err
    errors = _error_lines(err)
    assert len(errors) == 1 and first in errors[0]
    assert f"{blocked} is a file, not a folder" in errors[0] and "Not a directory" not in err  # said once, in words
    # one left: said in the singular, with the command that fetches what is left from the same log
    assert "1 of 2 could not be fetched; it stays pending" in err
    assert f"fal-pending --request-log-dir {log_dir} --fetch {got}`" in err
    assert _pending(log_dir) == [first]  # not written: still pending, to be fetched again
    assert np.array_equal(np.asarray(Image.open(got / second / "image_000.png")), np.asarray(second_img))
    assert fal.submissions == 2  # fetched, nothing paid again
    blocked.unlink()  # the folder fixed: the same command fetches what is left
    assert main(["fal-pending", "--request-log-dir", str(log_dir), "--fetch", str(got)]) == 0
    assert (got / first / "image_000.png").is_file() and _pending(log_dir) == []


def test_fal_fetch_into_a_folder_it_cannot_write_keeps_the_id_pending(fal, tmp_path, capsys):
    fal.reset(run_s=0.8)
    log_dir = tmp_path / "log"
    rid, _img = _pending_request(log_dir, 32, 24, 3)
    out = tmp_path / "out"
    in_the_way = _fails_at_write(out)
    assert main(["fal-fetch", "--request-id", rid, "--out", str(out), "--request-log-dir", str(log_dir)]) == 2
    errors = _error_lines(capsys.readouterr().err)
    assert len(errors) == 1 and f"{in_the_way} is a folder, not a file" in errors[0]
    assert f"fal-fetch --request-id {rid} --request-log-dir {log_dir} --out DIR" in errors[0]  # the same log
    assert _pending(log_dir) == [rid]


def test_generate_remote_into_a_folder_it_cannot_write_keeps_the_id_pending(fal, tmp_path, capsys):
    rng = np.random.default_rng(6)
    Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(tmp_path / "init.png")
    (tmp_path / "req.json").write_text(json.dumps({"prompt": "a pond", "image_url": "init.png",
                                                   "control_image_url": "init.png", "seed": 2}))
    out, log_dir = tmp_path / "out", tmp_path / "log"
    in_the_way = _fails_at_write(out)
    assert main(["generate", "--remote", "fal", "--request", str(tmp_path / "req.json"), "--out", str(out),
                 "--request-log-dir", str(log_dir)]) == 2
    rid = next(iter(fal.jobs))
    errors = _error_lines(capsys.readouterr().err)
    assert len(errors) == 1 and f"{in_the_way} is a folder, not a file" in errors[0]
    assert f"fal-fetch --request-id {rid} --request-log-dir {log_dir} --out DIR" in errors[0]
    assert _pending(log_dir) == [rid] and fal.submissions == 1


@pytest.mark.parametrize("command, option", [
    (["generate", "--remote", "fal", "--request", "REQ", "--out", "BLOCKED"], "--out"),
    (["generate", "--remote", "fal", "--request", "REQ", "--out", "BLOCKED/sub"], "--out"),
    (["generate", "--remote", "fal", "--request", "REQ", "--out", "OUT", "--request-log-dir", "BLOCKED"],
     "--request-log-dir"),
    (["fal-fetch", "--request-id", "RID", "--out", "BLOCKED/sub", "--request-log-dir", "LOG"], "--out"),
    (["fal-pending", "--request-log-dir", "LOG", "--fetch", "BLOCKED"], "--fetch"),
])
def test_a_file_in_place_of_a_folder_is_refused_before_anything_is_sent(fal, tmp_path, capsys, command, option):
    fal.reset(run_s=0.8)
    log_dir = tmp_path / "log"
    rid, _img = _pending_request(log_dir, 32, 24, 7)
    Image.fromarray(np.zeros((24, 32, 3), dtype=np.uint8)).save(tmp_path / "init.png")
    (tmp_path / "req.json").write_text(json.dumps({"prompt": "a pond", "image_url": "init.png",
                                                   "control_image_url": "init.png", "seed": 2}))
    blocked = _blocked(tmp_path / "blocked")
    names = {"REQ": tmp_path / "req.json", "BLOCKED": blocked, "OUT": tmp_path / "out", "LOG": log_dir, "RID": rid}
    argv = [str(names[a.split("/")[0]]) + a[len(a.split("/")[0]):] if a.split("/")[0] in names else a
            for a in command]
    calls_before = len(fal.calls)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert _error_lines(err) == [line for line in err.splitlines() if line.strip()]  # nothing else was said
    assert len(_error_lines(err)) == 1 and f"error: {option}: {blocked} is a file, not a folder" in err
    assert "bills" not in err and "Traceback" not in err
    assert len(fal.calls) == calls_before and fal.submissions == 1  # nothing sent: no submit, no fetch
    assert _pending(log_dir) == [rid]


def _polls(fal, rid: str) -> int:
    return sum(1 for m, p, _a in fal.calls if m == "GET" and p.endswith(f"/requests/{rid}/status"))


def _waiting_for(fal, rid: str, since: int, deadline_s: float = 10.0) -> None:
    """Until the client has polled ``rid``'s status twice more than ``since`` polls (it is waiting)."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if _polls(fal, rid) >= since + 2:
            return
        time.sleep(0.02)
    raise AssertionError(f"the client never polled {rid}")


def _never_cancelled(fal, log_dir, rid: str) -> None:
    assert fal.cancelled == [] and not fal.jobs[rid].cancelled
    assert not any(m == "PUT" for m, _p, _a in fal.calls)
    assert [r["event"] for r in request_log.read(log_dir) if r["request_id"] == rid] == ["submitted"]
    assert _pending(log_dir) == [rid]


def test_stopping_a_fetch_by_id_only_stops_waiting(fal, tmp_path):
    fal.reset(queue_s=30.0)  # still queued: a cancel now would be honoured (and the paid result gone)
    log_dir = tmp_path / "log"
    rid, _img = _pending_request(log_dir, 32, 24, 4)
    t0 = time.monotonic()
    with pytest.raises(FalCancelled) as err:
        fetch_remote_result(rid, cancel_check=lambda: time.monotonic() - t0 > 0.3, request_log_dir=log_dir,
                            settings=fast_settings())
    assert "not cancelled" in str(err.value) and f"fal-fetch --request-id {rid}" in str(err.value)
    _never_cancelled(fal, log_dir, rid)


def test_ctrl_c_on_fal_fetch_only_stops_waiting(fal, tmp_path, capsys):
    fal.reset(queue_s=30.0)
    log_dir = tmp_path / "log"
    rid, _img = _pending_request(log_dir, 32, 24, 5)
    since = _polls(fal, rid)

    def press_ctrl_c():  # once the CLI is waiting (its SIGINT handler is installed for the wait)
        _waiting_for(fal, rid, since)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=press_ctrl_c, daemon=True).start()
    assert main(["fal-fetch", "--request-id", rid, "--out", str(tmp_path / "out"), "--request-log-dir",
                 str(log_dir)]) == 2
    errors = _error_lines(capsys.readouterr().err)
    assert len(errors) == 1 and "not cancelled" in errors[0]
    _never_cancelled(fal, log_dir, rid)
