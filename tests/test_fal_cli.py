"""``generate --remote fal`` and ``fal-fetch`` against the fal-protocol test server (in-process CLI main)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent / "helpers"))
import fal_server  # noqa: E402

fal_server.configure_environment()

from fal_server import TEST_KEY, fal, fal_test_server  # noqa: E402,F401
from PIL import Image, ImageOps  # noqa: E402

from sdxl_controlnet_img2img.pipeline import request_log  # noqa: E402
from sdxl_controlnet_img2img.pipeline.cli import main  # noqa: E402


def _request_file(tmp_path, **fields):
    rng = np.random.default_rng(5)
    init = Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8))
    init.save(tmp_path / "init.png")
    init.save(tmp_path / "control.png")
    data = {"prompt": "a cat", "image_url": "init.png", "control_image_url": "control.png", "seed": 11, **fields}
    p = tmp_path / "req.json"
    p.write_text(json.dumps(data))
    return p, init


def test_generate_remote_writes_the_same_result_file(fal, tmp_path, capsys):
    req, init = _request_file(tmp_path)
    out = tmp_path / "out"
    assert main(["generate", "--remote", "fal", "--request", str(req), "--out", str(out)]) == 0
    doc = json.loads((out / "result.json").read_text())
    assert set(doc) >= {"images", "seed", "has_nsfw_concepts", "prompt", "timings", "request_id"}
    assert doc["seed"] == 11 and doc["has_nsfw_concepts"] == [False] and doc["prompt"] == "a cat"
    img = Image.open(out / doc["images"][0]["file_name"])
    assert np.array_equal(np.asarray(img), np.asarray(ImageOps.invert(init)))
    # the request id was recorded beside the output
    assert [r["request_id"] for r in request_log.read(out)][0] == doc["request_id"]
    err = capsys.readouterr().err
    assert doc["request_id"] in err and "bills" in err
    assert TEST_KEY not in err and "test-secret-not-real" not in err


def test_local_generate_still_requires_models(tmp_path, capsys):
    req, _ = _request_file(tmp_path)
    assert main(["generate", "--request", str(req), "--out", str(tmp_path / "o")]) == 2
    assert "--checkpoint and --controlnet required" in capsys.readouterr().err


def test_fal_fetch_recovers_by_id(fal, tmp_path, capsys):
    fal.reset(run_s=0.6)
    req, init = _request_file(tmp_path)
    out = tmp_path / "out"
    rc = main(["generate", "--remote", "fal", "--request", str(req), "--out", str(out), "--fal-timeout", "0.2"])
    assert rc == 2
    err = capsys.readouterr().err
    rid = request_log.read(out)[0]["request_id"]
    assert f"fal-fetch --request-id {rid}" in err
    out2 = tmp_path / "fetched"
    assert main(["fal-fetch", "--request-id", rid, "--out", str(out2), "--request-log-dir", str(out),
                 "--fal-timeout", "10"]) == 0
    doc = json.loads((out2 / "result.json").read_text())
    assert doc["request_id"] == rid
    img = Image.open(out2 / doc["images"][0]["file_name"])
    assert np.array_equal(np.asarray(img), np.asarray(ImageOps.invert(init)))
    assert len([c for c in fal.calls if c[0] == "POST"]) == 1


def test_missing_key_is_a_clear_cli_error(fal, monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("FAL_KEY")
    req, _ = _request_file(tmp_path)
    assert main(["generate", "--remote", "fal", "--request", str(req), "--out", str(tmp_path / "o")]) == 2
    assert "FAL_KEY" in capsys.readouterr().err
