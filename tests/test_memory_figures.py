"""The memory modes' figures come from one place (memory_plan.NEEDS_AT_1024): --help, the loader's tooltip and the
README's table say the same, and they are what `auto` compares (issue 25 item 6: "~8 GiB" vs "~9 GB")."""

from __future__ import annotations

import re
from pathlib import Path

from sdxl_controlnet_img2img.nodes.loader import SDXLCNLoader
from sdxl_controlnet_img2img.pipeline.cli import build_parser
from sdxl_controlnet_img2img.pipeline.local.memory import plan as M

MODES = ("none", "model_cpu_offload", "sequential_cpu_offload")


def test_the_figures_follow_from_the_plan():
    assert M.NEEDS_AT_1024 == {"none": "~12 GiB", "model_cpu_offload": "~8 GiB", "sequential_cpu_offload": "~3 GiB"}
    # SDXL + full ControlNet in 16 bits: 8.8 GiB of weights, UNet + ControlNet 7.1 GiB (the plan's docstring)
    assert round(sum(M.SDXL_16BIT_BYTES.values()) / M.GIB, 1) == 8.8
    assert round(sum(M.SDXL_16BIT_BYTES[n] for n in M.STAGES) / M.GIB, 1) == 7.1
    # and they are the thresholds auto uses: just enough free memory for a mode picks it
    for mode in ("none", "model_cpu_offload"):
        free = M.mode_needs_bytes(mode) + M.HEADROOM_BYTES
        assert M.choose_memory_mode(free, M.SDXL_16BIT_BYTES)[0] == mode
        assert M.choose_memory_mode(free - 1, M.SDXL_16BIT_BYTES)[0] != mode


def test_help_and_tooltip_quote_the_same_figures():
    sub = next(a for a in build_parser()._actions if getattr(a, "choices", None) and "generate" in a.choices)
    help_text = next(a.help for a in sub.choices["generate"]._actions if "--memory-mode" in a.option_strings)
    tooltip = SDXLCNLoader.INPUT_TYPES()["required"]["memory_mode"][1]["tooltip"]
    for text in (help_text, tooltip):
        for mode in MODES:
            assert re.search(rf"{mode}\b[^~]*{re.escape(M.NEEDS_AT_1024[mode])}", text), (mode, text)
        assert not re.search(r"~\d+ GB\b", text), text  # one unit: GiB


def test_readme_table_quotes_the_same_figures():
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    for mode in MODES:
        row = re.search(rf"^\| `{mode}` \| ([^|]+) \|", readme, re.M)
        assert row and row[1].strip() == M.NEEDS_AT_1024[mode], (mode, row and row[1])
