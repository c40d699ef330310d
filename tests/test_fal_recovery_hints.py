"""What the command line tells a user about a paid fal request it could not finish, followed to the letter (a new-user
review of issue 30 items 1-2): the fetch command it prints names the request log the id is pending in, so following
it leaves nothing pending; an id that could not be recorded is said to be NOT recorded (the printed id is the only way
to fetch it), never "pending"; a fetch whose log cannot be written once the result is saved does not ask to note the
id. Against the fal-protocol test server on 127.0.0.1, reached by the real fal-client.
"""

from __future__ import annotations

import json
import re
import shlex
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent / "helpers"))
import fal_server  # noqa: E402

fal_server.configure_environment()  # before anything imports fal_client: it reads its hosts at import

from fal_server import fal, fal_test_server  # noqa: E402,F401
from PIL import Image, ImageOps  # noqa: E402

from sdxl_controlnet_img2img.pipeline import request_log  # noqa: E402
from sdxl_controlnet_img2img.pipeline.cli import main  # noqa: E402
from test_fal_node_fetch import _pending_request  # noqa: E402


def _request(tmp_path) -> tuple[Path, Image.Image]:
    rng = np.random.default_rng(9)
    init = Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8))
    init.save(tmp_path / "init.png")
    req = tmp_path / "req.json"
    req.write_text(json.dumps({"prompt": "a harbour", "image_url": "init.png", "control_image_url": "init.png",
                               "seed": 4}))
    return req, ImageOps.invert(init)  # what the test server makes of it


def _error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


def _follow(message: str, out: Path) -> list[str]:
    """The fal-fetch command a message names, as the user types it (DIR replaced by ``out``), for ``main``."""
    found = re.findall(r"`[^`]* (fal-fetch [^`]*)`", message)
    assert len(found) == 1, message
    return shlex.split(found[0].replace("--out DIR", f"--out {shlex.quote(str(out))}"))


def _pending(log_dir) -> list[str]:
    return [r["request_id"] for r in request_log.pending(log_dir)]


def test_following_the_timeout_hint_fetches_the_result_and_clears_the_log_it_is_pending_in(fal, tmp_path, capsys):
    fal.reset(run_s=3.0)
    req, expected = _request(tmp_path)
    out = tmp_path / "out"  # no --request-log-dir: the id is recorded in the --out folder
    assert main(["generate", "--remote", "fal", "--request", str(req), "--out", str(out), "--fal-timeout", "0.5"]) == 2
    rid = next(iter(fal.jobs))
    message = _error(capsys.readouterr().err)
    assert "--fal-timeout" in message  # how to wait longer, on the command line
    assert f"stays pending in {out / 'fal_requests.jsonl'}" in message and "NOT recorded" not in message
    assert _pending(out) == [rid]
    got = tmp_path / "elsewhere"  # the user fetches into another folder than the one whose log holds the id
    assert main(_follow(message, got)) == 0
    assert np.array_equal(np.asarray(Image.open(got / "image_000.png")), np.asarray(expected))
    assert _pending(out) == [] and fal.submissions == 1  # done with where it was pending; nothing paid again


def test_an_id_that_could_not_be_recorded_is_never_said_to_be_pending(fal, tmp_path, capsys, caplog):
    fal.reset(run_s=3.0)
    req, expected = _request(tmp_path)
    log_dir = tmp_path / "log"
    (log_dir / request_log.LOG_FILE_NAME).mkdir(parents=True)  # the folder is fine; its log cannot be written
    assert main(["generate", "--remote", "fal", "--request", str(req), "--out", str(tmp_path / "out"),
                 "--request-log-dir", str(log_dir), "--fal-timeout", "0.5"]) == 2
    rid = next(iter(fal.jobs))
    err = capsys.readouterr().err
    message = _error(err)
    assert "NOT recorded" in message and rid in message and "only way" in message and "pending" not in message
    assert f"{log_dir / request_log.LOG_FILE_NAME} is a folder, not a file" in caplog.text  # why, in words
    assert main(_follow(message, tmp_path / "got")) == 0  # the command given fetches it
    assert np.array_equal(np.asarray(Image.open(tmp_path / "got" / "image_000.png")), np.asarray(expected))


def test_fal_fetch_of_an_id_its_log_does_not_hold_says_so(fal, tmp_path, capsys):
    fal.reset(run_s=3.0)
    rid, _img = _pending_request(tmp_path / "other-log", 32, 24, 8)
    out = tmp_path / "out"  # its log (the default) never recorded the id
    assert main(["fal-fetch", "--request-id", rid, "--out", str(out), "--fal-timeout", "0.3"]) == 2
    message = _error(capsys.readouterr().err)
    assert "NOT recorded" in message and "pending" not in message and "--fal-timeout" in message


def test_a_fetch_saved_but_not_recorded_does_not_ask_to_note_the_id(fal, tmp_path, capsys, caplog):
    fal.reset(run_s=0.8)
    log_dir = tmp_path / "log"
    rid, expected = _pending_request(log_dir, 32, 24, 9)
    log = request_log.log_path(log_dir)
    log.rename(tmp_path / "kept.jsonl")
    log.mkdir()  # the result can be written, the log cannot
    out = tmp_path / "out"
    assert main(["fal-fetch", "--request-id", rid, "--out", str(out), "--request-log-dir", str(log_dir)]) == 0
    err = capsys.readouterr().err
    assert np.array_equal(np.asarray(Image.open(out / "image_000.png")), np.asarray(expected))
    said = err + caplog.text
    assert "error:" not in err and "could not record" in said and "was saved" in said
    assert "note this id" not in said.lower()
