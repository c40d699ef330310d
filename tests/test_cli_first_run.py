"""The command line as a new user meets it: every bad input is refused before any model is read, with a message
naming the input and the fix (no traceback), and a rerun never overwrites an earlier result."""

from __future__ import annotations

import base64
import json

import pytest

from sdxl_controlnet_img2img.pipeline.cli import main
from sdxl_controlnet_img2img.pipeline.local.models import loading


@pytest.fixture
def no_model_load(monkeypatch):
    """Fails the test if the pipeline loader is called at all."""
    calls = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise AssertionError("the models were loaded before the bad input was refused")

    monkeypatch.setattr(loading, "load_pipeline", refuse)
    monkeypatch.setattr(loading, "build_pipeline", refuse)
    return calls


def _request(tmp_path, image_files, **fields):
    data = {"prompt": "a cat", "image_url": str(image_files(64, 64, 1)),
            "control_image_url": str(image_files(64, 64, 2)), "num_inference_steps": 2, "strength": 1.0}
    data.update(fields)
    req = tmp_path / "req.json"
    req.write_text(json.dumps(data))
    return req


def _run(tiny_models, req, tmp_path, *extra):
    return main(["generate", "--request", str(req), "--checkpoint", str(tiny_models["checkpoint"]),
                 "--controlnet", str(tiny_models["controlnet"]), "--out", str(tmp_path / "out"), *extra])


def _bad_png(tmp_path):
    p = tmp_path / "notes.png"
    p.write_text("not a picture")
    return str(p)


@pytest.mark.parametrize("field, value, words", [
    ("image_url", "missing.png", r"image_url: file not found"),
    ("control_image_url", "BAD", r"control_image_url: .*notes.png is not a readable image.*PNG, JPEG"),
    ("image_url", "data:image/png;base64,@@@@", r"image_url: the data: URI is not a readable image"),
    ("control_image_url", "data:image/png", r"control_image_url: is a data: URI without a ','"),
    ("image_url", "   ", r"image_url: is required"),
    ("loras", [{"path": "nowhere.safetensors"}], r"LoRA 'nowhere.safetensors': not found.*--lora-dir DIR"),
    ("loras", [{"path": "BADLORA"}], r"not a readable safetensors file"),
])
def test_bad_files_are_refused_before_the_models_load(tiny_models, image_files, tmp_path, capsys, no_model_load,
                                                      field, value, words):
    if value == "BAD":
        value = _bad_png(tmp_path)
    if value == [{"path": "BADLORA"}]:
        bad = tmp_path / "broken.safetensors"
        bad.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{brokenxx")
        value = [{"path": str(bad)}]
    rc = _run(tiny_models, _request(tmp_path, image_files, **{field: value}), tmp_path)
    err = capsys.readouterr().err
    assert rc == 2 and no_model_load == []
    assert "Traceback" not in err
    import re

    assert re.search(words, err), err


@pytest.mark.parametrize("args, words", [
    (["--device", "banana"], r"device: 'banana' is not a device name"),
    (["--device", "cuda"], r"device: cuda was asked for, but"),
])
def test_bad_devices_are_refused_before_the_models_load(tiny_models, image_files, tmp_path, capsys, no_model_load,
                                                        args, words):
    import re

    import torch

    if torch.cuda.is_available() and "cuda" in args:
        pytest.skip("this machine has CUDA")
    rc = _run(tiny_models, _request(tmp_path, image_files), tmp_path, *args)
    err = capsys.readouterr().err
    assert rc == 2 and no_model_load == [] and re.search(words, err), err


@pytest.mark.parametrize("content, words", [("[1, 2]", "holds a JSON list"), ('"a cat"', "holds a JSON str"),
                                            ('{"prompt": "x", "image_url": 123, "control_image_url": "b.png"}',
                                             "image_url: must be a path")])
def test_a_request_that_is_not_an_object_says_so(tiny_models, tmp_path, capsys, no_model_load, content, words):
    req = tmp_path / "req.json"
    req.write_text(content)
    rc = _run(tiny_models, req, tmp_path)
    err = capsys.readouterr().err
    assert rc == 2 and words in err and "Traceback" not in err, err


@pytest.mark.parametrize("out", ["blocked", "blocked/sub"])
def test_a_file_in_place_of_the_output_folder_is_refused_before_the_models_load(tiny_models, image_files, tmp_path,
                                                                                capsys, no_model_load, out):
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the output folder should be")
    rc = main(["generate", "--request", str(_request(tmp_path, image_files)), "--checkpoint",
               str(tiny_models["checkpoint"]), "--controlnet", str(tiny_models["controlnet"]), "--out",
               str(tmp_path / out)])
    err = capsys.readouterr().err
    assert rc == 2 and no_model_load == [] and "Traceback" not in err
    assert err.splitlines() == [line for line in err.splitlines() if line.startswith("error: --out: ")]
    assert f"{blocked} is a file, not a folder" in err
    assert main(["make-tiny-models", "--out", str(tmp_path / out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --out: {blocked} is a file, not a folder") and "writing" not in err


def test_an_output_folder_that_fails_at_write_time_is_one_error_line(tiny_models, image_files, tmp_path, capsys):
    in_the_way = tmp_path / "out" / "image_000.png"
    in_the_way.mkdir(parents=True)  # passes the check before loading; the write itself fails (as a full disk)
    rc = _run(tiny_models, _request(tmp_path, image_files, seed=3), tmp_path)
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and lines[0].startswith("error: --out: ") and f"{in_the_way} is a folder, not a file" in err
    assert "seed 3" in lines[0]  # how to get the same images again


def test_a_rerun_keeps_the_earlier_result(tiny_models, image_files, tmp_path, capsys):
    req = _request(tmp_path, image_files, seed=1)
    assert _run(tiny_models, req, tmp_path) == 0
    first = (tmp_path / "out" / "image_000.png").read_bytes()
    req.write_text(json.dumps({**json.loads(req.read_text()), "seed": 2}))
    assert _run(tiny_models, req, tmp_path) == 0
    assert (tmp_path / "out" / "image_000.png").read_bytes() == first
    second = (tmp_path / "out" / "run_002" / "image_000.png").read_bytes()
    assert second != first
    assert "run_002" in capsys.readouterr().err
    assert _run(tiny_models, req, tmp_path, "--overwrite") == 0
    assert (tmp_path / "out" / "image_000.png").read_bytes() == second


def test_fal_without_a_key_says_so_before_announcing_a_bill(image_files, tmp_path, capsys, monkeypatch):
    for var in ("FAL_KEY", "FAL_KEY_ID", "FAL_KEY_SECRET"):
        monkeypatch.delenv(var, raising=False)
    req = _request(tmp_path, image_files)
    rc = main(["generate", "--remote", "fal", "--request", str(req), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and "bills" not in err and "--fal-key-file" in err and "FAL_KEY" in err, err
    assert not (tmp_path / "out").exists()
    rc = main(["generate", "--remote", "fal", "--request", str(req), "--out", str(tmp_path / "out"),
               "--fal-key-file", str(tmp_path / "nokey.txt")])
    err = capsys.readouterr().err
    assert rc == 2 and "nokey.txt does not exist" in err, err


def test_a_key_file_with_a_byte_order_mark_works(tmp_path, monkeypatch):
    from sdxl_controlnet_img2img.pipeline.fal.key import resolve_key

    for var in ("FAL_KEY", "FAL_KEY_ID", "FAL_KEY_SECRET"):
        monkeypatch.delenv(var, raising=False)
    f = tmp_path / "fal_key.txt"
    f.write_bytes(b"\xef\xbb\xbfabcdef-123456:secret-part\n")
    assert resolve_key(None, f) == "abcdef-123456:secret-part"


def test_top_level_help_lists_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for option in ("--memory-mode", "--allow-pickle", "--request-id", "--fal-key-file", "--overwrite"):
        assert option in out


def test_data_uri_images_still_work_before_loading(tiny_models, image_files, tmp_path):
    """The pre-load check reads images; a good data: URI passes it and generates."""
    png = image_files(64, 64, 7).read_bytes()
    uri = "data:image/png;base64," + base64.b64encode(png).decode()
    assert _run(tiny_models, _request(tmp_path, image_files, image_url=uri), tmp_path) == 0
