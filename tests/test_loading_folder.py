"""A diffusers folder (SDXL base and ControlNet) is read as the single file is where a cast is needed: models built
empty and filled from each one weights file (pipeline/local/models/diffusers_folder.py). The models are diffusers' and
transformers' own ``from_pretrained`` models tensor for tensor; a folder laid out otherwise (sharded weights) still
loads, through ``from_pretrained``; and a pipeline read on several threads gives its memory back when freed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch


def same_weights(a, b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    assert not a.training and not b.training


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_folder_models_are_from_pretrained_s(tiny_models, dtype):
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from sdxl_controlnet_img2img.pipeline.local.models.diffusers_folder import folder_models
    from sdxl_controlnet_img2img.pipeline.local.models.loading import LoadOptions, load_controlnet

    base = tiny_models["checkpoint"]
    got = folder_models(base, dtype, "checkpoint")
    if dtype == torch.float32:  # stored in fp32: from_pretrained maps the files as they are (no copy), not us
        assert got == {}
        return
    assert set(got) == {"unet", "vae", "text_encoder", "text_encoder_2"}  # all four read as the single file is
    classes = {"unet": UNet2DConditionModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModel,
               "text_encoder_2": CLIPTextModelWithProjection}
    for name, cls in classes.items():
        same_weights(got[name], cls.from_pretrained(base, subfolder=name, torch_dtype=dtype))
    cn = load_controlnet(tiny_models["controlnet"], LoadOptions(device="cpu", dtype=dtype))
    same_weights(cn, ControlNetModel.from_pretrained(tiny_models["controlnet"], torch_dtype=dtype))


def test_a_folder_with_sharded_weights_loads_through_from_pretrained(tiny_models, tmp_path):
    from diffusers import UNet2DConditionModel

    from sdxl_controlnet_img2img.pipeline.local.models.diffusers_folder import folder_models
    from sdxl_controlnet_img2img.pipeline.local.models.loading import LoadOptions, build_pipeline

    base = tmp_path / "base"
    shutil.copytree(tiny_models["checkpoint"], base)
    want = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
    shutil.rmtree(base / "unet")
    want.save_pretrained(base / "unet", max_shard_size="200KB")  # shards and an index, as large UNets are stored
    assert (base / "unet" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    assert set(folder_models(base, torch.bfloat16, "checkpoint")) == {"vae", "text_encoder", "text_encoder_2"}
    pipe = build_pipeline(base, tiny_models["controlnet"], LoadOptions(device="cpu", dtype="bf16"))
    same_weights(pipe.unet, want.to(torch.bfloat16))


@pytest.mark.parametrize("stored", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unaligned_folder_components_load(tiny_models, tmp_path, stored, dtype):
    """A diffusers folder whose UNet and first text encoder files have their data at an odd offset (valid files,
    read back by safetensors itself first), stored in fp16, bf16 or fp32, loads read by us (a cast) or by
    from_pretrained (none): each weight is from_pretrained's of the aligned original, as stored, in the load dtype."""
    from diffusers import UNet2DConditionModel
    from padded_safetensors import repad
    from transformers import CLIPTextModel

    from sdxl_controlnet_img2img.pipeline.local.models.loading import LoadOptions, build_pipeline

    base = tmp_path / "base"
    shutil.copytree(tiny_models["checkpoint"], base)
    repad(base / "unet" / "diffusion_pytorch_model.safetensors", 1, stored)
    repad(base / "text_encoder" / "model.safetensors", 3, stored)
    pipe = build_pipeline(base, tiny_models["controlnet"], LoadOptions(device="cpu", dtype=dtype))
    for name, cls in (("unet", UNet2DConditionModel), ("text_encoder", CLIPTextModel)):
        want = cls.from_pretrained(tiny_models["checkpoint"], subfolder=name).state_dict()
        for k, v in getattr(pipe, name).state_dict().items():
            if v.is_floating_point():
                assert v.dtype == dtype and torch.equal(v, want[k].to(stored).to(dtype)), f"{name}.{k}"


def _as_pickles(folder) -> None:
    """Re-save the diffusers model in ``folder`` with torch.save (diffusion_pytorch_model.bin), no safetensors."""
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel

    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    cls = {"UNet2DConditionModel": UNet2DConditionModel, "AutoencoderKL": AutoencoderKL,
           "ControlNetModel": ControlNetModel}[config["_class_name"]]
    model = cls.from_pretrained(folder)
    shutil.rmtree(folder)
    model.save_pretrained(folder, safe_serialization=False)
    assert (folder / "diffusion_pytorch_model.bin").is_file() and not list(folder.glob("*.safetensors"))


@pytest.mark.parametrize("part", ["unet", "vae", "controlnet", "vae option"])
def test_pickle_weights_in_a_folder_need_the_opt_in(tiny_models, tmp_path, part, monkeypatch):
    """A diffusers folder (the base's UNet or VAE, a ControlNet, a VAE given on its own) whose weights are only
    .bin pickles is refused without allow_pickle, as a .ckpt is, before anything loads; with it they load (torch.load
    with weights_only); on a torch before 2.6 they are refused even with it."""
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel

    from sdxl_controlnet_img2img.pipeline.errors import ModelLoadError
    from sdxl_controlnet_img2img.pipeline.local.models.loading import LoadOptions, build_pipeline, check_sources

    base, cn, vae = Path(tiny_models["checkpoint"]), Path(tiny_models["controlnet"]), None
    if part in ("unet", "vae"):
        base = Path(shutil.copytree(base, tmp_path / "base"))
        pickled = base / part
    elif part == "controlnet":
        cn = pickled = Path(shutil.copytree(cn, tmp_path / "controlnet"))
    else:
        vae = pickled = Path(shutil.copytree(base / "vae", tmp_path / "vae"))
    _as_pickles(pickled)
    opts = dict(device="cpu", dtype="fp32", vae=str(vae) if vae else None)
    for check in (check_sources, build_pipeline):
        with pytest.raises(ModelLoadError) as err:
            check(base, cn, LoadOptions(**opts))
        msg = str(err.value)
        assert f"{pickled / 'diffusion_pytorch_model.bin'} is a pickle checkpoint (.bin)" in msg, msg
        assert "refused by default" in msg and "allow_pickle" in msg and ".safetensors" in msg, msg
    pipe = build_pipeline(base, cn, LoadOptions(**opts, allow_pickle=True))
    cls = {"unet": UNet2DConditionModel, "vae": AutoencoderKL, "controlnet": ControlNetModel}[part.split()[0]]
    same_weights(getattr(pipe, part.split()[0]), cls.from_pretrained(pickled))
    monkeypatch.setattr(torch, "__version__", "2.5.1")  # a torch whose weights_only loader is unsafe (CVE-2025-32434)
    with pytest.raises(ModelLoadError, match=r"pickle files are refused on torch 2\.5.*CVE-2025-32434"):
        build_pipeline(base, cn, LoadOptions(**opts, allow_pickle=True))


FREE_PROBE = r"""
import json, sys
from sdxl_controlnet_img2img.pipeline.errors import ModelLoadError
from sdxl_controlnet_img2img.pipeline.local.models.loading import LoadOptions, free_cached_pipeline, load_pipeline
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096
from diffusers import AutoencoderKL, ControlNetModel, StableDiffusionXLControlNetImg2ImgPipeline, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer  # libraries in before the count
got = {"before": rss()}
if len(sys.argv) > 3:  # a base that fails part-way first; its error kept, as a host keeps it to show it
    try:
        load_pipeline(sys.argv[3], sys.argv[2], LoadOptions(device="cpu", dtype="bf16"))
    except ModelLoadError as exc:
        error = exc
        got["error"] = str(exc)
    got["failed"] = rss()
load_pipeline(sys.argv[1], sys.argv[2], LoadOptions(device="cpu", dtype="bf16"))
got["loaded"] = rss()
free_cached_pipeline()
got["freed"] = rss()
print("RESULT " + json.dumps(got))
"""


@pytest.fixture(scope="module")
def medium_models(tmp_path_factory):
    from sdxl_controlnet_img2img.pipeline.local.tiny_models import build_tiny_models

    return build_tiny_models(tmp_path_factory.mktemp("medium"), seed=1, scale=8)  # ~700 MB fp32: ~350 MB in bf16


def _probe(*folders) -> dict:
    p = subprocess.run([sys.executable, "-c", FREE_PROBE, *map(str, folders)], capture_output=True, text=True,
                       timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads([ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")][-1][7:])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="resident memory read from /proc (Linux)")
def test_freeing_a_pipeline_read_by_several_threads_gives_its_memory_back(medium_models):
    """The weights are read on several threads, whose allocator arenas keep freed memory unless trimmed: without
    release_memory's trim the process held the whole pipeline after free_cached_pipeline()."""
    got = _probe(medium_models["checkpoint"], medium_models["controlnet"])
    held = got["loaded"] - got["before"]
    assert held > 250e6, got  # the pipeline did take memory
    assert got["freed"] - got["before"] < 0.3 * held, f"after free the process still holds {got}"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="resident memory read from /proc (Linux)")
def test_a_load_that_fails_part_way_gives_its_memory_back(medium_models, tmp_path):
    """A base folder whose last model read (text_encoder_2) cannot fill its model (int8 weights): the ControlNet,
    UNet, VAE and first text encoder were read by then. The error names the file, and the process holds
    no more after it than after a normal load is freed (the error's traceback held the models read so far, and the
    reading threads' arenas kept what was freed)."""
    from safetensors.torch import load_file, save_file

    good = Path(medium_models["checkpoint"])
    bad = tmp_path / "bad-base"
    bad.mkdir()
    for entry in good.iterdir():
        if entry.name != "text_encoder_2":
            (bad / entry.name).symlink_to(entry)
    (bad / "text_encoder_2").mkdir()
    shutil.copyfile(good / "text_encoder_2" / "config.json", bad / "text_encoder_2" / "config.json")
    sd = load_file(str(good / "text_encoder_2" / "model.safetensors"))
    save_file({k: v.to(torch.int8) if v.dim() > 1 else v for k, v in sd.items()},
              str(bad / "text_encoder_2" / "model.safetensors"))
    got = _probe(good, medium_models["controlnet"], bad)
    assert got["error"].startswith(f"checkpoint (text_encoder_2): {bad / 'text_encoder_2' / 'model.safetensors'} "
                                   f"does not fit CLIPTextModelWithProjection"), got
    held = got["loaded"] - got["failed"]
    assert held > 250e6, got  # a whole pipeline's worth, read after the failure
    assert got["failed"] - got["before"] < 0.3 * held, f"after the failed load the process still holds {got}"
