"""A diffusers folder (SDXL base and ControlNet) is read as the single file is where a cast is needed: models built
empty and filled from each one weights file (pipeline/local/diffusers_folder.py). The models are diffusers' and
transformers' own ``from_pretrained`` models tensor for tensor; a folder laid out otherwise (sharded weights) still
loads, through ``from_pretrained``; and a pipeline read on several threads gives its memory back when freed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

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

    from sdxl_controlnet_img2img.pipeline.local.diffusers_folder import folder_models
    from sdxl_controlnet_img2img.pipeline.local.loading import LoadOptions, load_controlnet

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

    from sdxl_controlnet_img2img.pipeline.local.diffusers_folder import folder_models
    from sdxl_controlnet_img2img.pipeline.local.loading import LoadOptions, build_pipeline

    base = tmp_path / "base"
    shutil.copytree(tiny_models["checkpoint"], base)
    want = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
    shutil.rmtree(base / "unet")
    want.save_pretrained(base / "unet", max_shard_size="200KB")  # shards and an index, as large UNets are stored
    assert (base / "unet" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    assert set(folder_models(base, torch.bfloat16, "checkpoint")) == {"vae", "text_encoder", "text_encoder_2"}
    pipe = build_pipeline(base, tiny_models["controlnet"], LoadOptions(device="cpu", dtype="bf16"))
    same_weights(pipe.unet, want.to(torch.bfloat16))


FREE_PROBE = r"""
import json, sys
from sdxl_controlnet_img2img.pipeline.local.loading import LoadOptions, free_cached_pipeline, load_pipeline
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096
from diffusers import AutoencoderKL, ControlNetModel, StableDiffusionXLControlNetImg2ImgPipeline, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer  # libraries in before the count
before = rss()
load_pipeline(sys.argv[1], sys.argv[2], LoadOptions(device="cpu", dtype="bf16"))
loaded = rss()
free_cached_pipeline()
print("RESULT " + json.dumps({"before": before, "loaded": loaded, "freed": rss()}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="resident memory read from /proc (Linux)")
def test_freeing_a_pipeline_read_by_several_threads_gives_its_memory_back(tmp_path):
    """The weights are read on several threads, whose allocator arenas keep freed memory unless trimmed: without
    release_memory's trim the process held the whole pipeline after free_cached_pipeline()."""
    from sdxl_controlnet_img2img.pipeline.local.tiny_models import build_tiny_models

    models = build_tiny_models(tmp_path / "medium", seed=1, scale=8)  # ~700 MB in fp32: ~350 MB read into bf16
    p = subprocess.run([sys.executable, "-c", FREE_PROBE, str(models["checkpoint"]), str(models["controlnet"])],
                       capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    got = json.loads([ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")][-1][7:])
    held = got["loaded"] - got["before"]
    assert held > 250e6, got  # the pipeline did take memory
    assert got["freed"] - got["before"] < 0.3 * held, f"after free the process still holds {got}"
