"""The memory modes and dtypes are one table each (issue 32 item 2): the loader node's menus and defaults stay as saved
workflows have them, each offload mode names a method diffusers' pipeline has, each dtype name means torch's dtype,
and every place a user picks one (the node's tooltip, generate's and serve's --help) describes all of them."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionXLControlNetImg2ImgPipeline

from sdxl_controlnet_img2img.nodes.loader import SDXLCNLoader
from sdxl_controlnet_img2img.pipeline.cli import build_parser
from sdxl_controlnet_img2img.pipeline.errors import ModelLoadError
from sdxl_controlnet_img2img.pipeline.local.memory import choices as C
from sdxl_controlnet_img2img.pipeline.local.memory.devices import parse_dtype
from sdxl_controlnet_img2img.pipeline.local.models.loading import LoadOptions

ROOT = Path(__file__).resolve().parent.parent
# the loader node's menus as users' saved workflows hold them (the public node contract)
MEMORY_MENU = ["auto", "none", "model_cpu_offload", "sequential_cpu_offload"]
DTYPE_MENU = ["auto", "fp16", "bf16", "fp32"]


def test_the_loader_node_menus_and_defaults_stay_as_saved_workflows_hold_them():
    required = SDXLCNLoader.INPUT_TYPES()["required"]
    assert required["memory_mode"][0] == MEMORY_MENU and required["memory_mode"][1]["default"] == "auto"
    assert required["dtype"][0] == DTYPE_MENU and required["dtype"][1]["default"] == "auto"
    saved = [node["inputs"] for path in sorted((ROOT / "workflows" / "api").glob("*.json"))
             for node in json.loads(path.read_text(encoding="utf-8")).values() if node["class_type"] == "SDXLCNLoader"]
    assert saved and all(v["dtype"] in DTYPE_MENU and v["memory_mode"] in MEMORY_MENU for v in saved)


def test_each_offload_mode_is_a_method_of_diffusers_pipeline():
    for row in C.MEMORY_MODES_TABLE:
        assert row.offload is None or callable(getattr(StableDiffusionXLControlNetImg2ImgPipeline, row.offload))
    assert [m.name for m in C.MEMORY_MODES_TABLE if m.needs_gpu] == ["model_cpu_offload", "sequential_cpu_offload"]


@pytest.mark.parametrize("mode", ["model_cpu_offload", "sequential_cpu_offload"])
def test_a_mode_that_needs_a_gpu_is_refused_on_the_cpu(mode):
    with pytest.raises(ModelLoadError, match=f"memory_mode: {mode} moves weights between the CPU and a GPU"):
        LoadOptions(device="cpu", memory_mode=mode).resolved()
    with pytest.raises(ModelLoadError, match="memory_mode: 'lots' is not one of auto, none, model_cpu_offload"):
        LoadOptions(device="cpu", memory_mode="lots").resolved()


@pytest.mark.parametrize("name, dtype", [("fp16", torch.float16), ("float16", torch.float16), ("half", torch.float16),
                                         ("bf16", torch.bfloat16), ("BFloat16", torch.bfloat16),
                                         ("fp32", torch.float32), ("float32", torch.float32)])
def test_each_dtype_name_is_torchs_dtype(name, dtype):
    assert parse_dtype(name) is dtype and parse_dtype(dtype) is dtype


def test_auto_and_unknown_dtypes():
    assert parse_dtype("auto") is None and parse_dtype(None) is None
    with pytest.raises(ModelLoadError, match=r"dtype: 'fp8' is not one of auto, fp16, bf16, fp32"):
        parse_dtype("fp8")


def _option(parser: argparse.ArgumentParser, command: str, option: str) -> argparse.Action:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return next(a for a in sub.choices[command]._actions if option in a.option_strings)


def test_every_place_a_user_picks_one_describes_them_all():
    parser = build_parser()
    required = SDXLCNLoader.INPUT_TYPES()["required"]
    for option, key, table in (("--memory-mode", "memory_mode", C.MEMORY_MODES_TABLE),
                               ("--dtype", "dtype", C.DTYPES_TABLE)):
        texts = {"node": required[key][1]["tooltip"]}
        for command in ("generate", "serve"):
            action = _option(parser, command, option)
            assert action.default == "auto", (command, option)
            texts[command] = action.help
        for where, text in texts.items():
            for row in table:
                assert f"{row.name}{' (default)' if row.name == 'auto' else ''}: {row.does}" in text, (where, row.name)
                assert not row.needs or row.needs in text, (where, row.name)
    assert _option(parser, "generate", "--dtype").choices == DTYPE_MENU
    assert _option(parser, "serve", "--dtype").choices == DTYPE_MENU
    assert _option(parser, "generate", "--memory-mode").choices == MEMORY_MENU
