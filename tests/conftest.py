"""Shared fixtures: tiny SDXL-shaped models built once per test session, offline."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import sys
from pathlib import Path

import pytest

# The tests' helper modules (fal_server, comfyui_harness, pictures) import by name from this folder. The tests are not
# a package: under pytest's importlib mode a package here would be imported as part of the pack's own folder, whose
# name (a clone's directory) need not be a Python identifier.
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent / "helpers"))  # the harnesses, servers and probes the tests share

from pictures import make_test_image  # noqa: E402


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """{"checkpoint": diffusers folder, "controlnet": diffusers folder, "lora": file} of tiny random-weight models."""
    from sdxl_controlnet_img2img.pipeline.local.tiny_models import build_tiny_models

    return build_tiny_models(tmp_path_factory.mktemp("tiny-models"))


@pytest.fixture(scope="session")
def tiny_pipe(tiny_models):
    """The tiny pipeline loaded through the library's loader, on the CPU in float32."""
    import torch

    from sdxl_controlnet_img2img.pipeline.local.models.loading import load_pipeline

    return load_pipeline(tiny_models["checkpoint"], tiny_models["controlnet"], device="cpu", dtype=torch.float32)


@pytest.fixture
def image_files(tmp_path):
    """Write test images of given sizes to PNG files; returns a factory (w, h, seed) -> path."""

    def _make(w, h, seed=0, name=None):
        p = tmp_path / (name or f"img_{w}x{h}_{seed}.png")
        make_test_image(w, h, seed).save(p)
        return p

    return _make


@pytest.fixture(scope="module")
def pair_files(tmp_path_factory):
    """A folder with init.png and control.png (64x64 test pictures), for requests that name files."""
    d = tmp_path_factory.mktemp("pair")
    make_test_image(64, 64, 1).save(d / "init.png")
    make_test_image(64, 64, 2).save(d / "control.png")
    return d


@pytest.fixture(scope="module")
def serving(request, tmp_path_factory, tiny_models):
    """A real ComfyUI serving the pack's fal API on the tiny models, called through fal's Python client over HTTPS
    (``test_comfyui_serve_queue.Serving``), one per test module; when the module is done, ComfyUI's log holds no key.
    (tests/test_comfyui_serve_models.py has a ComfyUI of its own under this name.)"""
    import contextlib

    from test_comfyui_serve_queue import Serving
    from test_serve import KEY

    with contextlib.ExitStack() as stack:
        s = Serving(tmp_path_factory.mktemp(request.module.__name__.rpartition(".")[2]), tiny_models, stack)
        yield s
        assert KEY not in s.comfy.log()


# With SDXLCN_REQUIRE_COMFYUI=1 (set by .ci/run, which installs ComfyUI, Chromium and redis-server), a real-ComfyUI,
# browser or shared-queue (Redis) test that skips is a failure: a missing COMFYUI_DIR, playwright, Chromium or
# redis-server must never pass for green. The full-size tests (SDXLCN_FULLSIZE_DIR, ~10 GB of fixtures) and the GPU
# tests stay opt-in.
REQUIRE_COMFYUI = os.environ.get("SDXLCN_REQUIRE_COMFYUI") == "1"
OPT_IN_FILES = ("test_comfyui_fullsize.py", "test_gpu.py")


def must_not_skip(path: str, reason: str) -> bool:
    """Whether a skip of the test in ``path`` with ``reason`` is a failure in require mode."""
    name = Path(path).name
    if name in OPT_IN_FILES:
        return False
    return name.startswith(("test_comfy", "test_browser", "test_serve_redis")) or "COMFYUI_DIR" in reason


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if not (REQUIRE_COMFYUI and report.skipped):
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    if must_not_skip(str(item.path), reason):
        report.outcome = "failed"
        report.longrepr = (f"SDXLCN_REQUIRE_COMFYUI=1: this real-ComfyUI/browser test skipped ({reason}); "
                           "CI must run it (see .ci/run)")
