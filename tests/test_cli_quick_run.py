"""A quick first run from the command line: ``generate --steps N --size WxH`` in place of the request's own, and
``make-tiny-models`` writing a LoRA the pack loads beside the tiny base and ControlNet."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from sdxl_controlnet_img2img.pipeline.cli import main


def _request(tmp_path, image_files, **fields):
    data = {"prompt": "a cat", "image_url": str(image_files(64, 64, 1)),
            "control_image_url": str(image_files(64, 64, 2)), "num_inference_steps": 25, "strength": 1.0, "seed": 3}
    data.update(fields)
    req = tmp_path / "req.json"
    req.write_text(json.dumps(data))
    return req


def _generate(tiny_models, req, out, *extra):
    return main(["generate", "--request", str(req), "--checkpoint", str(tiny_models["checkpoint"]),
                 "--controlnet", str(tiny_models["controlnet"]), "--out", str(out), *extra])


def test_steps_and_size_replace_the_requests_own(tiny_models, image_files, tmp_path, monkeypatch):
    from sdxl_controlnet_img2img.pipeline import cli

    steps = []

    class Recording(cli.TerminalProgress):
        def __call__(self, step, total, latents=None):
            steps.append((step, total))
            super().__call__(step, total, latents)

    monkeypatch.setattr(cli, "TerminalProgress", Recording)
    req = _request(tmp_path, image_files)
    assert _generate(tiny_models, req, tmp_path / "out", "--steps", "2", "--size", "96x72") == 0
    assert steps == [(1, 2), (2, 2)]  # int(2 x strength 1.0) steps ran, not the request's 25
    doc = json.loads((tmp_path / "out" / "result.json").read_text())
    with Image.open(tmp_path / "out" / "image_000.png") as img:
        assert img.size == (96, 72)
    assert (doc["images"][0]["width"], doc["images"][0]["height"]) == (96, 72)


@pytest.mark.parametrize("args, words", [
    (["--steps", "0"], "error: --steps 0: num_inference_steps: must be between 1 and 50, got 0"),
    (["--size", "10x10"], "argument --size: '10x10': each side must be between 64 and 4096 pixels"),
    (["--size", "big"], "argument --size: 'big' is not WxH (e.g. 512x512), a preset (square_hd, "),
])
def test_a_bad_steps_or_size_names_the_option(tiny_models, image_files, tmp_path, capsys, args, words):
    req = _request(tmp_path, image_files)
    try:
        rc = _generate(tiny_models, req, tmp_path / "out", *args)
    except SystemExit as exc:  # argparse's own refusal of a value
        rc = exc.code
    assert rc == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err, err


def test_steps_too_few_for_the_requests_strength_names_steps(tiny_models, image_files, tmp_path, capsys):
    """--steps 1 with the request's strength 0.95 runs int(1 x 0.95) = 0 steps: the refusal names --steps, where the
    1 came from (it named only the request's fields, strength and num_inference_steps)."""
    req = _request(tmp_path, image_files, strength=0.95)
    assert _generate(tiny_models, req, tmp_path / "out", "--steps", "1") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --steps 1: strength: 0.95 with num_inference_steps 1 runs no denoising step"), err


def test_size_takes_presets_and_none(tiny_models, image_files, tmp_path):
    from sdxl_controlnet_img2img.pipeline.cli import build_parser

    def parsed(value):
        return build_parser().parse_args(["generate", "--request", "r", "--out", "o", "--size", value]).size

    assert parsed("square") == "square" and parsed("none") is None and parsed("512X384") == {"width": 512,
                                                                                              "height": 384}
    assert build_parser().parse_args(["generate", "--request", "r", "--out", "o"]).size is False  # not given


def test_the_tiny_lora_loads_and_changes_the_picture(tiny_models, image_files, tmp_path):
    assert tiny_models["lora"].name == "tiny-sdxl-lora.safetensors" and tiny_models["lora"].is_file()
    pictures = []
    for name, loras in (("plain", []), ("lora", [{"path": str(tiny_models["lora"]), "scale": 1.0}])):
        req = _request(tmp_path, image_files, loras=loras)
        assert _generate(tiny_models, req, tmp_path / name, "--steps", "2") == 0
        pictures.append(np.asarray(Image.open(tmp_path / name / "image_000.png")).astype(int))
    assert np.abs(pictures[0] - pictures[1]).mean() > 5


def test_make_tiny_models_into_comfyuis_model_folders(tmp_path, capsys, tiny_models):
    import shutil

    # the models of this session copied in, so the command finds them complete and only says where they are
    models = tmp_path / "models"
    for kind, folder in (("checkpoint", "diffusers"), ("controlnet", "controlnet"), ("lora", "loras")):
        src = tiny_models[kind]
        (models / folder).mkdir(parents=True)
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, models / folder / src.name)
    assert main(["make-tiny-models", "--out", str(models), "--comfyui"]) == 0
    paths = json.loads(capsys.readouterr().out)
    assert paths == {"checkpoint": str(models / "diffusers" / "tiny-sdxl"),
                     "controlnet": str(models / "controlnet" / "tiny-controlnet-canny"),
                     "lora": str(models / "loras" / "tiny-sdxl-lora.safetensors")}


def test_make_tiny_models_outside_comfyui_needs_out(capsys):
    assert main(["make-tiny-models"]) == 2
    assert "--out DIR is required here" in capsys.readouterr().err


def test_make_tiny_models_writes_every_file_readable_by_all(tmp_path, capsys):
    """Every file it writes is mode 644, like the configs beside the weights (safetensors, so diffusers' and
    transformers' save_pretrained, wrote the weight files 600: unreadable for a ComfyUI running as another user)."""
    import stat

    assert main(["make-tiny-models", "--out", str(tmp_path / "models")]) == 0
    capsys.readouterr()
    modes = {str(p.relative_to(tmp_path)): oct(stat.S_IMODE(p.stat().st_mode))
             for p in (tmp_path / "models").rglob("*") if p.is_file()}
    weights = [p for p in modes if p.endswith(".safetensors")]
    assert len(weights) >= 6 and any(p.endswith(".json") for p in modes)  # unet, vae, 2 text encoders, ControlNet, LoRA
    assert {p: m for p, m in modes.items() if m != "0o644"} == {}
