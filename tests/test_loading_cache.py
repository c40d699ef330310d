"""The pipeline cache: a hit reads nothing from disk; another model replaces (and frees) the cached one."""

from __future__ import annotations

import gc
import os
import shutil
import sys
import weakref
from pathlib import Path

import pytest

from sdxl_controlnet_img2img.pipeline.local.models import loading
from sdxl_controlnet_img2img.pipeline.local.models.loading import LoadOptions, cached_pipeline, free_cached_pipeline, load_pipeline

CPU = LoadOptions(device="cpu", dtype="fp32")

_watch: dict = {"roots": (), "opens": []}


def _audit(event, args):
    # counts every file open (Python's open/os.open and C extensions going through them) under the watched roots
    if event == "open" and _watch["roots"] and args and isinstance(args[0], (str, bytes, os.PathLike)):
        path = os.fsdecode(args[0])
        if any(path.startswith(r) for r in _watch["roots"]):
            _watch["opens"].append(path)


sys.addaudithook(_audit)


@pytest.fixture
def models(tiny_models, tmp_path):
    """Private copies (so other tests' cached pipelines are not involved) of the tiny base and ControlNet, twice."""
    folders = {k: tiny_models[k] for k in ("checkpoint", "controlnet")}  # (tiny_models also holds a LoRA file)
    a = {k: shutil.copytree(v, tmp_path / "a" / Path(v).name) for k, v in folders.items()}
    b = {k: shutil.copytree(v, tmp_path / "b" / Path(v).name) for k, v in folders.items()}
    yield a, b
    free_cached_pipeline()


@pytest.fixture
def count_builds(monkeypatch):
    """Wrap the real (uncached) loader to count how often it runs."""
    calls = []
    real = loading.build_pipeline

    def counted(*args, **kw):
        calls.append(args[:2])
        return real(*args, **kw)

    monkeypatch.setattr(loading, "build_pipeline", counted)
    return calls


def test_cache_hit_reads_nothing_from_disk(models, count_builds, tmp_path):
    a, _ = models
    _watch["roots"], _watch["opens"] = (str(tmp_path),), []
    try:
        p1 = load_pipeline(a["checkpoint"], a["controlnet"], CPU)
        assert len(count_builds) == 1 and len(_watch["opens"]) > 5  # the miss opened the model files
        _watch["opens"].clear()
        p2 = load_pipeline(a["checkpoint"], a["controlnet"], device="cpu", dtype="fp32")  # same options, spelled differently
        assert p2 is p1 and cached_pipeline() is p1
        assert len(count_builds) == 1 and _watch["opens"] == []
    finally:
        _watch["roots"] = ()


def test_other_options_or_changed_files_reload(models, count_builds):
    a, _ = models
    p1 = load_pipeline(a["checkpoint"], a["controlnet"], CPU)
    p2 = load_pipeline(a["checkpoint"], a["controlnet"], LoadOptions(device="cpu", dtype="fp32", vae_tiling=True))
    assert p2 is not p1 and p2.vae.use_tiling and len(count_builds) == 2
    weights = Path(a["controlnet"]) / "diffusion_pytorch_model.safetensors"
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10_000_000))  # the file was replaced
    p3 = load_pipeline(a["checkpoint"], a["controlnet"], LoadOptions(device="cpu", dtype="fp32", vae_tiling=True))
    assert p3 is not p2 and len(count_builds) == 3


def test_a_different_model_releases_the_previous_one(models):
    a, b = models
    p1 = load_pipeline(a["checkpoint"], a["controlnet"], CPU)
    refs = [weakref.ref(p1), weakref.ref(p1.unet), weakref.ref(p1.controlnet)]
    del p1
    p2 = load_pipeline(b["checkpoint"], b["controlnet"], CPU)
    assert cached_pipeline() is p2
    assert all(r() is None for r in refs), "the previous pipeline is still alive"


def test_free_cached_pipeline(models):
    a, _ = models
    ref = weakref.ref(load_pipeline(a["checkpoint"], a["controlnet"], CPU).unet)
    gc.collect()
    assert ref() is not None  # held by the cache
    assert free_cached_pipeline() is True
    assert ref() is None and cached_pipeline() is None
    assert free_cached_pipeline() is False


def test_before_load_runs_only_on_a_cache_miss(models):
    a, b = models
    calls = []
    free_cached_pipeline()
    load_pipeline(a["checkpoint"], a["controlnet"], CPU, before_load=lambda: calls.append("a"))
    load_pipeline(a["checkpoint"], a["controlnet"], CPU, before_load=lambda: calls.append("a again"))
    load_pipeline(b["checkpoint"], b["controlnet"], CPU, before_load=lambda: calls.append("b"))
    assert calls == ["a", "b"]


def test_load_options_defaults_and_resolution():
    import torch

    o = LoadOptions()
    assert (o.memory_mode, o.vae_tiling, o.vae, o.config_dir, o.allow_pickle, o.compile, o.attention) == (
        "auto", False, None, None, False, False, "sdpa")
    r = LoadOptions(device="cpu").resolved()
    assert r.device == "cpu" and r.dtype is torch.float32
    assert LoadOptions(device="cpu", dtype="bf16").resolved().dtype is torch.bfloat16
    from sdxl_controlnet_img2img.pipeline.local.memory.devices import default_dtype

    assert default_dtype("mps") is torch.float16
    if not torch.cuda.is_available():  # a device that cannot be used is refused before anything loads
        with pytest.raises(loading.ModelLoadError, match="device: cuda was asked for"):
            LoadOptions(device="cuda", dtype="bf16").resolved()
