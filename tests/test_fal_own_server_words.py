"""Our words, our server (issue 33 item 7): with ``SDXLCN_FAL_URL`` pointing at a self-hosted server, the command
line and the fal node name that server in what they say, never fal's bill, fal's dashboard or "fal rejected".

The server is the session's fal-protocol test server (``tests/helpers/fal_server.py``), reached through ``SDXLCN_FAL_URL``;
the address it listens on is the truth each message must name.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent / "helpers"))
import fal_server  # noqa: E402

fal_server.configure_environment()

from fal_server import TEST_KEY, fal, fal_test_server, user_dir  # noqa: E402,F401
from PIL import Image  # noqa: E402

from sdxl_controlnet_img2img.nodes.fal_node import SDXLCNFalImg2Img  # noqa: E402
from sdxl_controlnet_img2img.pipeline.cli import main  # noqa: E402
from sdxl_controlnet_img2img.pipeline.fal.errors import FalTimeout, FalValidationError  # noqa: E402

# what is said of fal only: its bill, its dashboard, its own name as the one who answered
FAL_ONLY = ("bill", "fal.ai", "fal rejected", "fal refused", "fal's queue", "fal request", "fal:", "fal balance",
            "fal did", "fal flagged", "on fal", "to fal")


@pytest.fixture
def own(fal, monkeypatch):
    """The test server as the user's own server: SDXLCN_FAL_URL names it."""
    monkeypatch.setenv("SDXLCN_FAL_URL", fal.base)
    return fal


def server(fal) -> str:
    return f"your server at 127.0.0.1:{fal.port}"


def says_nothing_of_fal(text: str) -> None:
    low = re.sub(r"fal-ai/\S+", "<endpoint>", text.lower())  # the endpoint's id is fal's name for it
    said = [w for w in FAL_ONLY if w in low]
    assert not said, f"{said} in: {text}"
    assert TEST_KEY not in text and "test-secret-not-real" not in text


def request_file(tmp_path) -> Path:
    rng = np.random.default_rng(5)
    Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(tmp_path / "init.png")
    p = tmp_path / "req.json"
    p.write_text(json.dumps({"prompt": "a cat", "image_url": "init.png", "control_image_url": "init.png", "seed": 3}))
    return p


def generate(tmp_path, *extra) -> int:
    return main(["generate", "--remote", "fal", "--request", str(request_file(tmp_path)), "--out",
                 str(tmp_path / "out"), *extra])


def test_the_cli_runs_on_your_server_and_says_so(own, tmp_path, capsys):
    assert generate(tmp_path) == 0
    err = capsys.readouterr().err
    rid = json.loads((tmp_path / "out" / "result.json").read_text())["request_id"]
    assert f"running on {server(own)} (" in err and f"submitted request {rid} to {server(own)}" in err
    assert f"  {server(own)}: step 1/2" in err  # the server's own log lines, named as its
    says_nothing_of_fal(err)


def test_a_request_still_running_at_the_time_limit_is_not_billed(own, tmp_path, capsys):
    own.reset(run_s=1.0)
    assert generate(tmp_path, "--fal-timeout", "0.2") == 2
    err = capsys.readouterr().err
    assert f"on {server(own)} did not finish" in err and "fal-fetch --request-id" in err
    says_nothing_of_fal(err)


def test_a_refused_key_is_the_servers_key(own, tmp_path, capsys):
    own.reset(auth_detail="missing or wrong key", auth_status=401)
    assert generate(tmp_path) == 2
    err = capsys.readouterr().err
    assert f"{server(own)} refused the key (HTTP 401)" in err and "SDXLCN_SERVE_KEY" in err
    says_nothing_of_fal(err)


def test_a_missing_key_says_which_key_your_server_takes(own, monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("FAL_KEY")
    assert generate(tmp_path) == 2
    err = capsys.readouterr().err
    assert f"no key for {server(own)} found" in err and "SDXLCN_SERVE_KEY" in err and "has no key" in err
    assert not own.calls
    says_nothing_of_fal(err)


def widgets(**changes):
    req = SDXLCNFalImg2Img.INPUT_TYPES()["required"]
    w = {k: v[1]["default"] for k, v in req.items() if k not in ("image", "control_image")}
    w.update(prompt="a house", seed=5, **changes)
    return w


def picture():
    rng = np.random.default_rng(1)
    return torch.from_numpy(rng.integers(0, 256, (1, 24, 32, 3)).astype(np.float32) / 255.0)


def test_the_node_says_your_server_rejected_the_value(own, user_dir):
    own.reset(reject=[{"loc": ["body", "strength"], "msg": "too strong", "type": "value_error"}])
    with pytest.raises(FalValidationError) as err:
        SDXLCNFalImg2Img().generate(picture(), picture(), **widgets())
    assert err.value.field == "strength" and f"{server(own)} rejected this value: too strong" in str(err.value)
    says_nothing_of_fal(str(err.value))


def test_the_node_names_your_server_when_it_times_out_or_flags(own, user_dir, caplog):
    own.reset(run_s=1.0)
    with pytest.raises(FalTimeout) as err:
        SDXLCNFalImg2Img().generate(picture(), picture(), timeout_s=0.3, **widgets())
    assert f"on {server(own)} did not finish" in str(err.value)
    says_nothing_of_fal(str(err.value))
    own.reset(nsfw=[True])
    with caplog.at_level(logging.INFO, logger="sdxl_controlnet_img2img"):
        SDXLCNFalImg2Img().generate(picture(), picture(), **widgets())
    said = "\n".join(r.getMessage() for r in caplog.records)
    assert f"{server(own)} flagged 1 of 1 images" in said and "earlier request(s) were never fetched" in said
    says_nothing_of_fal(said)
