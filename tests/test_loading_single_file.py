"""Single-file SDXL (original SGM key layout) and single-file ControlNet, loaded offline.

The tiny diffusers models are written in the layout that ``sd_xl_base_1.0.safetensors`` uses by
the converter below (our own code, diffusers -> SGM), then loaded back through the library's
single-file path with a config folder that matches the tiny architecture.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from sdxl_controlnet_img2img.pipeline.errors import ModelLoadError
from sdxl_controlnet_img2img.pipeline.local.models.loading import LoadOptions, build_pipeline, load_pipeline

# ---------------------------------------------------------------- diffusers -> SGM converter

_RESNET = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
           ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection")]
_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
        "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
        "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}


def _resnet(rest: str) -> str:
    for a, b in _RESNET:
        if rest.startswith(a + "."):
            return b + rest[len(a):]
    raise KeyError(rest)


def unet_to_sgm(sd: dict, config) -> dict:
    """Diffusers UNet2DConditionModel state dict -> ``model.diffusion_model.*`` (SGM/LDM names)."""
    lpb = config["layers_per_block"]
    up_with_attn = {i for i, t in enumerate(config["up_block_types"]) if "CrossAttn" in t}
    out = {}
    for k, v in sd.items():
        m = re.match(r"(time_embedding\.linear_[12]|add_embedding\.linear_[12]|conv_in|conv_norm_out|conv_out)\.(.+)", k)
        if m:
            new = f"{_TOP[m[1]]}.{m[2]}"
        elif m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", k):
            i = 1 + int(m[1]) * (lpb + 1) + int(m[3])
            new = f"input_blocks.{i}.0.{_resnet(m[4])}" if m[2] == "resnets" else f"input_blocks.{i}.1.{m[4]}"
        elif m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", k):
            new = f"input_blocks.{1 + int(m[1]) * (lpb + 1) + lpb}.0.op.{m[2]}"
        elif m := re.match(r"mid_block\.resnets\.(\d)\.(.+)", k):
            new = f"middle_block.{2 * int(m[1])}.{_resnet(m[2])}"
        elif m := re.match(r"mid_block\.attentions\.0\.(.+)", k):
            new = f"middle_block.1.{m[1]}"
        elif m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", k):
            i = int(m[1]) * (lpb + 1) + int(m[3])
            new = f"output_blocks.{i}.0.{_resnet(m[4])}" if m[2] == "resnets" else f"output_blocks.{i}.1.{m[4]}"
        elif m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", k):
            b = int(m[1])
            new = f"output_blocks.{b * (lpb + 1) + lpb}.{2 if b in up_with_attn else 1}.conv.{m[2]}"
        else:
            raise KeyError(f"unet key not converted: {k}")
        out["model.diffusion_model." + new] = v
    return out


def vae_to_sgm(sd: dict, config) -> dict:
    """Diffusers AutoencoderKL -> ``first_stage_model.*`` (LDM names, 1x1-conv attention)."""
    n = len(config["up_block_types"])
    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    out = {}
    for k, v in sd.items():
        new = k.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        if m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d)\.(.+)", new):
            new = f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}"
        elif m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(.+)", new):
            new = f"{m[1]}.mid.attn_1.{attn[m[2]]}.{m[3]}"
            if v.ndim == 2:
                v = v[:, :, None, None]
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", new):
            new = f"encoder.down.{m[1]}.block.{m[2]}.{m[3]}"
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", new):
            new = f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", new):
            new = f"decoder.up.{n - 1 - int(m[1])}.block.{m[2]}.{m[3]}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", new):
            new = f"decoder.up.{n - 1 - int(m[1])}.upsample.conv.{m[2]}"
        elif not re.match(r"(encoder|decoder)\.(conv_in|conv_out|norm_out)\.|(post_)?quant_conv\.", new):
            raise KeyError(f"vae key not converted: {k}")
        out["first_stage_model." + new] = v
    return out


def clip_to_sgm(sd: dict) -> dict:
    """transformers CLIPTextModel -> ``conditioner.embedders.0.transformer.text_model.*`` (HF names kept)."""
    return {"conditioner.embedders.0.transformer.text_model." + k.removeprefix("text_model."): v for k, v in sd.items()
            if not k.endswith("position_ids")}


def openclip_to_sgm(sd: dict) -> dict:
    """transformers CLIPTextModelWithProjection -> ``conditioner.embedders.1.model.*`` in OpenCLIP's layout."""
    p = "conditioner.embedders.1.model."
    sd = {k.removeprefix("text_model."): v for k, v in sd.items() if not k.endswith("position_ids")}
    out = {
        p + "token_embedding.weight": sd.pop("embeddings.token_embedding.weight"),
        p + "positional_embedding": sd.pop("embeddings.position_embedding.weight"),
        p + "ln_final.weight": sd.pop("final_layer_norm.weight"),
        p + "ln_final.bias": sd.pop("final_layer_norm.bias"),
        p + "text_projection": sd.pop("text_projection.weight").T.contiguous(),
    }
    layers = sorted({int(m[1]) for k in sd if (m := re.match(r"encoder\.layers\.(\d+)\.", k))})
    for i in layers:
        src, dst = f"encoder.layers.{i}.", f"{p}transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[dst + f"attn.in_proj_{kind}"] = torch.cat(
                [sd.pop(src + f"self_attn.{q}_proj.{kind}") for q in ("q", "k", "v")], dim=0)
            out[dst + f"attn.out_proj.{kind}"] = sd.pop(src + f"self_attn.out_proj.{kind}")
            out[dst + f"ln_1.{kind}"] = sd.pop(src + f"layer_norm1.{kind}")
            out[dst + f"ln_2.{kind}"] = sd.pop(src + f"layer_norm2.{kind}")
            out[dst + f"mlp.c_fc.{kind}"] = sd.pop(src + f"mlp.fc1.{kind}")
            out[dst + f"mlp.c_proj.{kind}"] = sd.pop(src + f"mlp.fc2.{kind}")
    assert not sd, f"text_encoder_2 keys not converted: {sorted(sd)[:5]}"
    return out


def pipeline_to_sgm(components) -> dict:
    """unet + vae + both text encoders -> one SGM state dict, like sd_xl_base_1.0.safetensors."""
    sd = {}
    sd.update(unet_to_sgm(components["unet"].state_dict(), components["unet"].config))
    sd.update(vae_to_sgm(components["vae"].state_dict(), components["vae"].config))
    sd.update(clip_to_sgm(components["text_encoder"].state_dict()))
    sd.update(openclip_to_sgm(components["text_encoder_2"].state_dict()))
    return {k: v.detach().clone().contiguous() for k, v in sd.items()}


def write_config_dir(diffusers_folder: Path, out: Path) -> Path:
    """A config-only copy of a diffusers SDXL folder (json + tokenizer files, no weights)."""
    for f in diffusers_folder.rglob("*"):
        if f.is_file() and f.suffix in (".json", ".txt") and not f.name.endswith(".index.json"):
            dst = out / f.relative_to(diffusers_folder)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, dst)
    return out


# ---------------------------------------------------------------- fixtures

FP32 = dict(device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def folder_pipe(tiny_models):
    return build_pipeline(tiny_models["checkpoint"], tiny_models["controlnet"], LoadOptions(**FP32))


@pytest.fixture(scope="module")
def single_files(tiny_models, folder_pipe, tmp_path_factory):
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("single-file")
    sd = pipeline_to_sgm({n: getattr(folder_pipe, n) for n in ("unet", "vae", "text_encoder", "text_encoder_2")})
    save_file(sd, root / "tiny_sdxl_base.safetensors")
    torch.save({"state_dict": sd}, root / "tiny_sdxl_base.ckpt")
    config_dir = write_config_dir(Path(tiny_models["checkpoint"]), root / "tiny-sdxl-config")
    cn_file = root / "tiny_controlnet_canny.safetensors"
    shutil.copyfile(Path(tiny_models["controlnet"]) / "diffusion_pytorch_model.safetensors", cn_file)
    cn_config = root / "tiny-controlnet-config"
    cn_config.mkdir()
    shutil.copyfile(Path(tiny_models["controlnet"]) / "config.json", cn_config / "config.json")
    return {"checkpoint": root / "tiny_sdxl_base.safetensors", "ckpt": root / "tiny_sdxl_base.ckpt",
            "config_dir": config_dir, "controlnet": cn_file, "controlnet_config_dir": cn_config, "sgm": sd}


def _opts(files, **kw):
    return LoadOptions(**FP32, config_dir=str(files["config_dir"]),
                       controlnet_config_dir=str(files["controlnet_config_dir"]), **kw)


def _assert_same_weights(a, b):
    for name in ("unet", "vae", "text_encoder", "text_encoder_2", "controlnet"):
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        sa = {k: v for k, v in sa.items() if not k.endswith("position_ids")}
        sb = {k: v for k, v in sb.items() if not k.endswith("position_ids")}
        assert sa.keys() == sb.keys(), name
        for k in sa:
            assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), f"{name}.{k} differs"


# ---------------------------------------------------------------- tests

def test_converter_writes_the_sdxl_single_file_layout(single_files):
    keys = set(single_files["sgm"])
    groups = ("model.diffusion_model.", "first_stage_model.", "conditioner.embedders.0.transformer.",
              "conditioner.embedders.1.model.")
    assert all(k.startswith(groups) for k in keys)
    assert all(any(k.startswith(g) for k in keys) for g in groups)
    for k in ("model.diffusion_model.input_blocks.0.0.weight", "model.diffusion_model.label_emb.0.0.weight",
              "model.diffusion_model.middle_block.1.proj_in.weight", "model.diffusion_model.out.2.weight",
              "first_stage_model.decoder.up.0.block.0.conv1.weight", "first_stage_model.encoder.mid.attn_1.q.weight",
              "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight",
              "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight",
              "conditioner.embedders.1.model.positional_embedding", "conditioner.embedders.1.model.text_projection"):
        assert k in keys, k


def test_single_file_weights_equal_the_diffusers_folder(single_files, folder_pipe):
    pipe = build_pipeline(single_files["checkpoint"], single_files["controlnet"], _opts(single_files))
    _assert_same_weights(pipe, folder_pipe)
    assert type(pipe).__name__ == "StableDiffusionXLControlNetImg2ImgPipeline"
    assert pipe.tokenizer.model_max_length == 77 and pipe.tokenizer_2.model_max_length == 77
    assert pipe.tokenizer("ice fortress").input_ids == folder_pipe.tokenizer("ice fortress").input_ids


def _own_memory(pipe):
    """Copy every weight out of its memory-mapped file into fresh (64-byte aligned) memory.

    CPU BLAS kernels take different paths for differently aligned operands, so two bitwise-equal
    weights read from different file offsets can give results differing in the last float bit.
    With both pipelines' weights in fresh memory, any pixel difference is a real loading difference.
    """
    for name in ("unet", "vae", "text_encoder", "text_encoder_2", "controlnet"):
        for t in list(getattr(pipe, name).parameters()) + list(getattr(pipe, name).buffers()):
            t.data = t.data.clone()


def test_single_file_generation_equals_folder_generation(single_files, folder_pipe, image_files):
    from sdxl_controlnet_img2img.pipeline.local.generate import generate
    from sdxl_controlnet_img2img.pipeline.request import GenerationRequest

    pipe = build_pipeline(single_files["checkpoint"], single_files["controlnet"], _opts(single_files))
    _own_memory(pipe)
    _own_memory(folder_pipe)
    req = GenerationRequest.from_dict({
        "prompt": "ice fortress aurora", "image_url": str(image_files(64, 64, 1)),
        "control_image_url": str(image_files(64, 64, 2)), "num_inference_steps": 4, "seed": 7,
        "enable_safety_checker": False})
    a = generate(pipe, req).images
    b = generate(folder_pipe, req).images
    assert len(a) == len(b) == 1
    assert np.array_equal(np.asarray(a[0]), np.asarray(b[0]))
    assert np.asarray(a[0]).std() > 0  # a real picture, not a constant


def test_ckpt_is_refused_without_opt_in_and_loaded_weights_only_with_it(single_files, folder_pipe):
    with pytest.raises(ModelLoadError) as err:
        build_pipeline(single_files["ckpt"], single_files["controlnet"], _opts(single_files))
    msg = str(err.value)
    assert "tiny_sdxl_base.ckpt" in msg and "pickle" in msg and "allow_pickle" in msg and ".safetensors" in msg
    pipe = build_pipeline(single_files["ckpt"], single_files["controlnet"], _opts(single_files, allow_pickle=True))
    _assert_same_weights(pipe, folder_pipe)


@pytest.mark.parametrize("stored", [torch.float16, torch.bfloat16, torch.float32])
def test_unaligned_single_file_and_controlnet_file_load(single_files, folder_pipe, tmp_path, stored):
    """Valid files whose data starts at an odd offset (each read back by safetensors itself first), stored in fp16,
    bf16 or fp32: the single-file checkpoint and the ControlNet file load, each weight the diffusers folder's
    (from_pretrained) as stored in that type."""
    from padded_safetensors import repad

    ckpt = repad(shutil.copyfile(single_files["checkpoint"], tmp_path / "unaligned_base.safetensors"), 1, stored)
    cn = repad(shutil.copyfile(single_files["controlnet"], tmp_path / "unaligned_cn.safetensors"), 1, stored)
    pipe = build_pipeline(ckpt, cn, _opts(single_files))
    for name in ("unet", "vae", "text_encoder", "text_encoder_2", "controlnet"):
        want = getattr(folder_pipe, name).state_dict()
        for k, v in getattr(pipe, name).state_dict().items():
            if v.is_floating_point():
                assert v.dtype == torch.float32 and torch.equal(v, want[k].to(stored).float()), f"{name}.{k}"


def test_no_random_init_in_two_threads_at_once_leaves_initialisation_working():
    """transformers' no_init_weights swaps torch.nn.init's functions for no-ops and puts back what it found: with
    two loads overlapping in two threads the second put its no-ops back for good (every model built later, anyone's,
    uninitialised). One thread holds it at a time: the second enters after the first has left."""
    import threading

    from sdxl_controlnet_img2img.pipeline.local.models.load_lock import no_random_init

    normal = torch.nn.init.normal_
    first_in, second_trying, second_in, first_out = (threading.Event() for _ in range(4))
    order = []

    def first():
        with no_random_init():
            first_in.set()
            second_trying.wait(30)
            second_in.wait(0.5)  # the second would be in by now if nothing kept it out
            order.append("first leaves")
        first_out.set()

    def second():
        first_in.wait(30)
        second_trying.set()
        with no_random_init():
            order.append("second in")
            second_in.set()
            first_out.wait(30)

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert order == ["first leaves", "second in"]
    assert torch.nn.init.normal_ is normal
    assert torch.nn.Linear(64, 64).weight.std() > 0.01  # initialised, not left as allocated


def test_controlnet_single_file_mismatching_bundled_config_is_explained(single_files):
    # without the tiny config override, the bundled real-SDXL ControlNet config does not fit the tiny file
    opts = LoadOptions(**FP32, config_dir=str(single_files["config_dir"]))
    with pytest.raises(ModelLoadError) as err:
        build_pipeline(single_files["checkpoint"], single_files["controlnet"], opts)
    msg = str(err.value)
    assert "tiny_controlnet_canny.safetensors" in msg and "does not match the config" in msg and "config.json" in msg
    assert "--controlnet-config-dir" in msg  # the option's name on the command line, as the base's error gives its own


def test_single_file_with_the_bundled_sdxl_config_reports_the_architecture_mismatch(single_files, tmp_path, monkeypatch):
    # the bundled config is real SDXL (context 2048); the tiny file has context 64: refused before any loading
    tok = tmp_path / "tok"
    from sdxl_controlnet_img2img.pipeline.local.tiny_models import write_clip_tokenizer

    write_clip_tokenizer(tok)
    monkeypatch.setenv("SDXLCN_CLIP_TOKENIZER_DIR", str(tok))
    monkeypatch.setenv("SDXLCN_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(ModelLoadError) as err:
        build_pipeline(single_files["checkpoint"], single_files["controlnet"], LoadOptions(**FP32))
    msg = str(err.value)
    assert "context dimension 64" in msg and "expects 2048" in msg and "--config-dir" in msg


def test_fp16_fix_vae_option_replaces_the_vae(single_files, tiny_models):
    from diffusers import AutoencoderKL

    vae_dir = Path(tiny_models["checkpoint"]) / "vae"
    pipe = build_pipeline(single_files["checkpoint"], single_files["controlnet"], _opts(single_files, vae=str(vae_dir)))
    ref = AutoencoderKL.from_pretrained(vae_dir)
    for k, v in ref.state_dict().items():
        assert torch.equal(pipe.vae.state_dict()[k], v)


def test_vae_tiling_and_eager_attention_options(single_files):
    pipe = build_pipeline(single_files["checkpoint"], single_files["controlnet"],
                          _opts(single_files, vae_tiling=True, attention="eager"))
    assert pipe.vae.use_tiling
    assert {type(p).__name__ for p in pipe.unet.attn_processors.values()} == {"AttnProcessor"}


def test_cli_generates_from_single_files(single_files, image_files, tmp_path, capsys):
    from sdxl_controlnet_img2img.pipeline.cli import main

    req = tmp_path / "req.json"
    req.write_text(json.dumps({"prompt": "a cat", "image_url": str(image_files(64, 64, 3)),
                               "control_image_url": str(image_files(64, 64, 4)), "num_inference_steps": 2,
                               "strength": 1.0, "enable_safety_checker": False}))
    rc = main(["generate", "--request", str(req), "--checkpoint", str(single_files["checkpoint"]),
               "--controlnet", str(single_files["controlnet"]), "--config-dir", str(single_files["config_dir"]),
               "--controlnet-config-dir", str(single_files["controlnet_config_dir"]),
               "--device", "cpu", "--dtype", "fp32", "--vae-tiling", "--out", str(tmp_path / "out")])
    assert rc == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "out" / "result.json").read_text())["images"]


# ---------------------------------------------------------------- bundled configs and tokenizers

def test_bundled_configs_describe_real_sdxl_base_and_controlnet():
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from sdxl_controlnet_img2img.pipeline.local.models.sdxl_config import CONTROLNET_SDXL_CONFIG, SDXL_BASE_CONFIG as B

    def count(m):
        return sum(p.numel() for p in m.parameters())

    with init_empty_weights():
        assert count(UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(B / "unet"))) == 2_567_463_684
        assert count(AutoencoderKL.from_config(AutoencoderKL.load_config(B / "vae"))) == 83_653_863
        assert count(ControlNetModel.from_config(ControlNetModel.load_config(CONTROLNET_SDXL_CONFIG))) == 1_251_014_160
        assert count(CLIPTextModel(CLIPTextConfig.from_pretrained(B / "text_encoder"))) == 123_060_480
        assert count(CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(B / "text_encoder_2"))) == 694_659_840
    assert json.loads((B / "vae" / "config.json").read_text())["force_upcast"] is True  # fp16 NaN protection


def test_sdxl_config_dir_assembles_tokenizers_offline(tmp_path, monkeypatch):
    from transformers import CLIPTokenizer

    from sdxl_controlnet_img2img.pipeline.local.models.sdxl_config import sdxl_config_dir
    from sdxl_controlnet_img2img.pipeline.local.tiny_models import write_clip_tokenizer

    write_clip_tokenizer(tmp_path / "tok")
    monkeypatch.setenv("SDXLCN_CLIP_TOKENIZER_DIR", str(tmp_path / "tok"))
    monkeypatch.setenv("SDXLCN_CACHE_DIR", str(tmp_path / "cache"))
    d = sdxl_config_dir()
    assert d == sdxl_config_dir()  # reused
    for sub in ("unet", "vae", "text_encoder", "text_encoder_2"):
        assert (d / sub / "config.json").is_file()
    t1 = CLIPTokenizer.from_pretrained(d / "tokenizer", local_files_only=True)
    t2 = CLIPTokenizer.from_pretrained(d / "tokenizer_2", local_files_only=True)
    assert t1.model_max_length == t2.model_max_length == 77
    assert t1.pad_token == "<|endoftext|>" and t2.pad_token == "!"  # as in stabilityai/stable-diffusion-xl-base-1.0


def _bpe_gz(path: Path, merges: list[str]) -> Path:
    with gzip.open(path, "wb") as f:
        f.write(("\"bpe_simple_vocab_16e6.txt#version: 0.2\n" + "\n".join(merges) + "\n").encode("utf-8"))
    return path


def test_clip_vocab_derivation_from_open_clip_bpe_file(tmp_path):
    from transformers import CLIPTokenizer

    from sdxl_controlnet_img2img.pipeline.local.models.sdxl_config import clip_vocab_from_bpe_gz

    merges = ["c a", "ca t</w>", "p h", "ph o", "pho t", "phot o</w>"]
    out = clip_vocab_from_bpe_gz(_bpe_gz(tmp_path / "bpe.txt.gz", merges), tmp_path / "tok")
    vocab = json.loads((out / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == 512 + len(merges) + 2 and vocab["!"] == 0 and vocab["!</w>"] == 256
    assert vocab["cat</w>"] == 513 and vocab["<|endoftext|>"] == len(vocab) - 1
    tok = CLIPTokenizer(str(out / "vocab.json"), str(out / "merges.txt"), model_max_length=77)
    assert tok("a cat photo").input_ids == [vocab["<|startoftext|>"], vocab["a</w>"], vocab["cat</w>"],
                                            vocab["photo</w>"], vocab["<|endoftext|>"]]


@pytest.mark.skipif(not os.environ.get("COMFYUI_DIR"), reason="COMFYUI_DIR not set (a ComfyUI checkout to compare with)")
def test_clip_vocab_derivation_equals_comfyui_vocab(tmp_path):
    from sdxl_controlnet_img2img.pipeline.local.models.sdxl_config import clip_vocab_from_bpe_gz

    src = Path(os.environ["COMFYUI_DIR"]) / "comfy" / "sd1_tokenizer"
    merges = (src / "merges.txt").read_text(encoding="utf-8").split("\n")[1:]
    merges = [m for m in merges if m]
    out = clip_vocab_from_bpe_gz(_bpe_gz(tmp_path / "bpe.txt.gz", merges), tmp_path / "tok")
    assert json.loads((out / "vocab.json").read_text(encoding="utf-8")) == json.loads((src / "vocab.json").read_text(encoding="utf-8"))
