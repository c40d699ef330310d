"""Bad models get clear words: what the file is, what was expected, what to do.

The bad files are built here: tiny fake state dicts with the key names (and the telling shapes)
of real SD1.5 / SD2 / SDXL-refiner checkpoints and ControlNets, truncated and corrupt files.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sdxl_controlnet_img2img.pipeline.errors import ModelLoadError
from sdxl_controlnet_img2img.pipeline.local.models.loading import LoadOptions, build_pipeline, load_pipeline

CPU = LoadOptions(device="cpu", dtype="fp32")


def z(*shape):
    return torch.zeros(*shape)


def _unet_keys(ctx: int) -> dict:
    p = "model.diffusion_model."
    return {p + "input_blocks.0.0.weight": z(4, 4, 3, 3),
            p + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": z(8, ctx)}


SD15 = {**_unet_keys(768), "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight": z(77, 8),
        "first_stage_model.decoder.conv_in.weight": z(4, 4, 3, 3)}
SD2 = {**_unet_keys(1024), "cond_stage_model.model.positional_embedding": z(77, 8),
       "first_stage_model.decoder.conv_in.weight": z(4, 4, 3, 3)}
REFINER = {**_unet_keys(1280), "conditioner.embedders.0.model.positional_embedding": z(77, 8)}
SD15_CONTROLNET = {"controlnet_cond_embedding.conv_in.weight": z(16, 3, 3, 3), "controlnet_down_blocks.0.weight": z(8, 8, 1, 1),
                   "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight": z(8, 768)}
LDM_SD15_CONTROLNET = {"control_model.input_hint_block.0.weight": z(16, 3, 3, 3), "control_model.zero_convs.0.0.weight": z(8, 8, 1, 1)}
CONTROL_LORA = {"lora_controlnet": z(1), "input_hint_block.0.weight": z(16, 3, 3, 3)}


@pytest.fixture
def write(tmp_path):
    def _w(name, sd):
        p = tmp_path / name
        save_file(sd, p)
        return p

    return _w


def _err(base, cn, opts=CPU) -> str:
    with pytest.raises(ModelLoadError) as err:
        build_pipeline(base, cn, opts)
    return str(err.value)


def test_missing_files_are_named(tiny_models, tmp_path):
    msg = _err(tmp_path / "sd_xl_base_1.0.safetensors", tiny_models["controlnet"])
    assert "checkpoint" in msg and "sd_xl_base_1.0.safetensors does not exist" in msg and "SDXL base" in msg
    msg = _err(tiny_models["checkpoint"], tmp_path / "nope.safetensors")
    assert "controlnet" in msg and "nope.safetensors does not exist" in msg


def test_repo_id_while_offline_says_so(tiny_models, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    msg = _err("stabilityai/stable-diffusion-xl-base-1.0", tiny_models["controlnet"])
    assert "hub is offline" in msg and "stabilityai/stable-diffusion-xl-base-1.0" in msg


def test_truncated_safetensors(tiny_models, tmp_path):
    src = Path(tiny_models["controlnet"]) / "diffusion_pytorch_model.safetensors"
    data = src.read_bytes()
    cut = tmp_path / "controlnet-canny-sdxl.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    msg = _err(tiny_models["checkpoint"], cut)
    assert "controlnet-canny-sdxl.safetensors is truncated" in msg and "Download the file again" in msg
    # a truncated weights file inside a diffusers folder too
    folder = tmp_path / "cn-folder"
    shutil.copytree(tiny_models["controlnet"], folder)
    (folder / "diffusion_pytorch_model.safetensors").write_bytes(data[: len(data) - 100])
    assert "is truncated" in _err(tiny_models["checkpoint"], folder)


def test_corrupt_and_non_safetensors_files(tiny_models, tmp_path):
    junk = tmp_path / "model.safetensors"
    junk.write_bytes(b"<html>404 Not Found</html>" * 10)
    msg = _err(junk, tiny_models["controlnet"])
    assert "model.safetensors is not a readable safetensors file" in msg
    bad_json = tmp_path / "bad_header.safetensors"
    bad_json.write_bytes((20).to_bytes(8, "little") + b"{not json at all....")
    assert "corrupt safetensors header" in _err(bad_json, tiny_models["controlnet"])
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    assert "too short" in _err(empty, tiny_models["controlnet"])
    odd = tmp_path / "model.gguf"
    odd.write_bytes(b"GGUF")
    assert "unknown extension '.gguf'" in _err(odd, tiny_models["controlnet"])


@pytest.mark.parametrize("sd, words", [
    (SD15, "Stable Diffusion 1.x checkpoint (one CLIP ViT-L text encoder, UNet context 768)"),
    (SD2, "Stable Diffusion 2.x checkpoint (OpenCLIP ViT-H text encoder, UNet context 1024)"),
    (REFINER, "SDXL refiner checkpoint"),
    (SD15_CONTROLNET, "a ControlNet, not a base model"),
    ({"lora_unet_down_blocks_0.lora_down.weight": z(4, 4)}, "a LoRA, not a base model"),
])
def test_non_sdxl_checkpoints_given_as_base(tiny_models, write, sd, words):
    p = write("some_model.safetensors", sd)
    msg = _err(p, tiny_models["controlnet"])
    assert "checkpoint:" in msg and "some_model.safetensors is" in msg
    assert words in msg and "Give an SDXL base checkpoint" in msg and "sd_xl_base_1.0.safetensors" in msg


def test_sd15_diffusers_folder_given_as_base(tiny_models, tmp_path):
    folder = tmp_path / "sd15"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
                                                         "text_encoder": ["transformers", "CLIPTextModel"]}))
    msg = _err(folder, tiny_models["controlnet"])
    assert "diffusers StableDiffusionPipeline without the two SDXL text encoders" in msg


@pytest.mark.parametrize("sd, words", [
    (SD15_CONTROLNET, "Stable Diffusion 1.x ControlNet in diffusers layout (context 768"),
    (LDM_SD15_CONTROLNET, "Stable Diffusion 1.x/2.x ControlNet in the original layout"),
    (CONTROL_LORA, "Control-LoRA"),
    ({"lllite_unet_input_blocks_4.down.0.weight": z(4, 4)}, "ControlNet-LLLite"),
    (SD15, "a base model checkpoint, not a ControlNet"),
])
def test_unsupported_controlnet_files(tiny_models, write, sd, words):
    p = write("control_canny.safetensors", sd)
    msg = _err(tiny_models["checkpoint"], p)
    assert "controlnet:" in msg and "control_canny.safetensors is" in msg and words in msg
    assert "expected an SDXL ControlNet" in msg and "diffusers/controlnet-canny-sdxl-1.0" in msg


def test_sd15_controlnet_folder(tiny_models, tmp_path):
    folder = tmp_path / "control_sd15_canny"
    shutil.copytree(tiny_models["controlnet"], folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(addition_embed_type=None, cross_attention_dim=768)
    (folder / "config.json").write_text(json.dumps(cfg))
    msg = _err(tiny_models["checkpoint"], folder)
    assert "control_sd15_canny is a ControlNet for Stable Diffusion 1.x/2.x (cross_attention_dim 768" in msg


def test_folder_without_config(tiny_models, tmp_path):
    (tmp_path / "cn").mkdir()
    (tmp_path / "cn" / "readme.md").write_text("hi")
    assert "folder without config.json (found: readme.md)" in _err(tiny_models["checkpoint"], tmp_path / "cn")


def test_pickle_refused_then_weights_only(tiny_models, tmp_path):
    from pathlib import PurePosixPath  # any class weights_only does not allow stands in for a malicious object

    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": PurePosixPath("/etc")}}, evil)
    msg = _err(evil, tiny_models["controlnet"])
    assert "evil.ckpt is a pickle checkpoint (.ckpt)" in msg and "--allow-pickle" in msg
    msg = _err(evil, tiny_models["controlnet"], LoadOptions(device="cpu", dtype="fp32", allow_pickle=True))
    assert "evil.ckpt could not be read as a weights-only pickle" in msg and "Use a .safetensors version" in msg
    sd15 = tmp_path / "v1-5-pruned.ckpt"
    torch.save({"state_dict": SD15}, sd15)
    msg = _err(sd15, tiny_models["controlnet"], LoadOptions(device="cpu", dtype="fp32", allow_pickle=True))
    assert "Stable Diffusion 1.x checkpoint" in msg


def test_bad_options_are_named(tiny_models):
    with pytest.raises(ModelLoadError, match="memory_mode: 'lots'"):
        load_pipeline(tiny_models["checkpoint"], tiny_models["controlnet"], LoadOptions(device="cpu", memory_mode="lots"))
    with pytest.raises(ModelLoadError, match="needs a GPU|moves weights between the CPU and a GPU"):
        load_pipeline(tiny_models["checkpoint"], tiny_models["controlnet"], LoadOptions(device="cpu", memory_mode="model_cpu_offload"))
    with pytest.raises(ModelLoadError, match="dtype: 'fp8'"):
        load_pipeline(tiny_models["checkpoint"], tiny_models["controlnet"], LoadOptions(device="cpu", dtype="fp8"))


def test_a_controlnet_file_that_cannot_fill_the_model_is_named(tiny_models, tmp_path):
    """A valid ControlNet file in diffusers layout with int8 weights (a quantised export, which diffusers'
    ControlNetModel cannot hold): the pack's error naming the file, not load_state_dict's bare RuntimeError."""
    from safetensors.torch import load_file

    sd = load_file(str(Path(tiny_models["controlnet"]) / "diffusion_pytorch_model.safetensors"))
    cn = tmp_path / "controlnet_int8.safetensors"
    save_file({k: v.to(torch.int8) if v.dim() > 1 else v for k, v in sd.items()}, cn)
    msg = _err(tiny_models["checkpoint"], cn,
               LoadOptions(device="cpu", dtype="fp32", controlnet_config_dir=str(tiny_models["controlnet"])))
    assert msg.startswith(f"controlnet: {cn} does not fit ControlNetModel") and "floating point" in msg, msg


@pytest.mark.parametrize("entry, words", [
    ({"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}, "'w' spans 12 bytes, but a F32 tensor of shape (4,) needs 16"),
    ({"dtype": "Q4", "shape": [4], "data_offsets": [0, 16]}, "stores 'w' as 'Q4'"),
])
def test_a_header_that_does_not_describe_its_bytes_is_refused(tiny_models, tmp_path, entry, words):
    """A header whose offsets do not fit its shape and type, or whose type is none safetensors reads: safetensors
    itself refuses the file; so does the header check, naming the file, before anything is read."""
    import struct

    from safetensors.torch import load_file

    head = json.dumps({"w": entry}).encode()
    path = tmp_path / "odd.safetensors"
    path.write_bytes(struct.pack("<Q", len(head)) + head + bytes(16))
    with pytest.raises(Exception):  # noqa: B017 - whatever safetensors raises: it does not read the file
        load_file(str(path))
    msg = _err(path, tiny_models["controlnet"])
    assert msg.startswith(f"checkpoint: {path} ") and words in msg, msg
