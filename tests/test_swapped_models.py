"""Checkpoint and ControlNet given the other way round: one line that says they look swapped, before any model
loads, from the CLI and from the loader node (issue 25 item 3). Folders and single files."""

from __future__ import annotations

import shutil

import pytest
import torch

from sdxl_controlnet_img2img import NODE_CLASS_MAPPINGS
from sdxl_controlnet_img2img.pipeline.cli import main
from sdxl_controlnet_img2img.pipeline.errors import ModelLoadError
from sdxl_controlnet_img2img.pipeline.local.models import loading
from sdxl_controlnet_img2img.pipeline.local.models.loading import check_sources


@pytest.fixture(scope="module")
def single_files(tiny_models, tmp_path_factory):
    """The tiny base as one SGM-layout .safetensors (as sd_xl_base_1.0.safetensors) and the ControlNet's file."""
    from safetensors.torch import save_file
    from test_loading_single_file import pipeline_to_sgm

    pipe = loading.build_pipeline(tiny_models["checkpoint"], tiny_models["controlnet"],
                                  loading.LoadOptions(device="cpu", dtype=torch.float32))
    root = tmp_path_factory.mktemp("swapped")
    base = root / "tiny_sdxl_base.safetensors"
    save_file(pipeline_to_sgm({n: getattr(pipe, n) for n in ("unet", "vae", "text_encoder", "text_encoder_2")}), base)
    cn = root / "tiny_controlnet_canny.safetensors"
    shutil.copyfile(tiny_models["controlnet"] / "diffusion_pytorch_model.safetensors", cn)
    return {"checkpoint": base, "controlnet": cn}


@pytest.fixture
def no_model_load(monkeypatch):
    """Fails the test if the pipeline loader is reached at all (the refusal must come first)."""
    def refuse(*args, **kwargs):
        raise AssertionError("the models were loaded before the swapped inputs were refused")

    monkeypatch.setattr(loading, "load_pipeline", refuse)
    monkeypatch.setattr(loading, "build_pipeline", refuse)


def _models(kind, tiny_models, single_files):
    """(checkpoint, controlnet) the right way round, as folders, single files or one of each."""
    return {"folders": (tiny_models["checkpoint"], tiny_models["controlnet"]),
            "files": (single_files["checkpoint"], single_files["controlnet"]),
            "file+folder": (single_files["checkpoint"], tiny_models["controlnet"]),
            "folder+file": (tiny_models["checkpoint"], single_files["controlnet"])}[kind]


def _assert_swapped_line(msg, ckpt, cn):
    assert "\n" not in msg
    assert msg.startswith("checkpoint and controlnet look swapped: ")
    assert f"the checkpoint {cn} is a ControlNet and the controlnet {ckpt} is an SDXL base checkpoint" in msg
    assert f"Give them the other way round: checkpoint {ckpt}, controlnet {cn}." in msg


@pytest.mark.parametrize("kind", ["folders", "files", "file+folder", "folder+file"])
def test_swapped_sources_are_named_as_swapped(kind, tiny_models, single_files):
    ckpt, cn = _models(kind, tiny_models, single_files)
    check_sources(ckpt, cn, loading.LoadOptions(device="cpu"))  # the right way round passes
    with pytest.raises(ModelLoadError) as err:
        check_sources(cn, ckpt, loading.LoadOptions(device="cpu"))
    _assert_swapped_line(str(err.value), ckpt, cn)


def test_cli_says_swapped_in_one_line_before_loading(tiny_models, single_files, image_files, tmp_path, capsys,
                                                     no_model_load):
    req = tmp_path / "req.json"
    req.write_text('{"prompt": "a cat", "image_url": "%s", "control_image_url": "%s", "num_inference_steps": 2}'
                   % (image_files(64, 64, 1), image_files(64, 64, 2)))
    ckpt, cn = single_files["checkpoint"], tiny_models["controlnet"]
    code = main(["generate", "--request", str(req), "--checkpoint", str(cn), "--controlnet", str(ckpt),
                 "--device", "cpu", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code != 0 and "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    _assert_swapped_line(lines[0][len("error: "):], ckpt, cn)
    assert not (tmp_path / "out").exists()


def test_loader_node_says_swapped_before_loading(tiny_models, single_files, no_model_load):
    """The node checks the files' kinds when it runs, before reading weights (its VALIDATE_INPUTS takes only the
    device: ComfyUI pins a VALIDATE_INPUTS answer to each argument, so a swap would be reported twice)."""
    loader = NODE_CLASS_MAPPINGS["SDXLCNLoader"]
    ckpt, cn = str(single_files["checkpoint"]), str(single_files["controlnet"])
    with pytest.raises(ModelLoadError) as err:
        loader().load(checkpoint=cn, controlnet=ckpt, device="cpu")
    _assert_swapped_line(str(err.value), ckpt, cn)


def test_other_wrong_pairs_keep_their_own_refusal(tiny_models, single_files, tmp_path):
    """Only a ControlNet in the checkpoint slot with an SDXL base in the ControlNet slot reads as swapped."""
    ckpt, cn = single_files["checkpoint"], single_files["controlnet"]
    opts = loading.LoadOptions(device="cpu")
    with pytest.raises(ModelLoadError, match=r"^checkpoint: .* is a ControlNet, not a base model"):
        check_sources(cn, cn, opts)  # a ControlNet twice
    with pytest.raises(ModelLoadError, match=r"^controlnet: .* is a base model checkpoint, not a ControlNet"):
        check_sources(ckpt, ckpt, opts)  # the base twice
    with pytest.raises(ModelLoadError, match=r"^checkpoint: .*gone.safetensors does not exist"):
        check_sources(tmp_path / "gone.safetensors", ckpt, opts)
