"""Two loads at once in one process, in two threads (a server answering two users, ComfyUI beside a script).

diffusers', transformers' and accelerate's loaders patch torch for the whole process while they build a model
(``torch.nn.init``'s functions made no-ops, ``nn.Module.register_parameter`` putting every new parameter on
``meta``), and put back what they found. Overlapping in two threads, one load's parameters landed on ``meta`` (the
other's patch was on while it filled its model) and the patches stayed for good. Each load here must give what it
gives alone, and torch must be torch's own afterwards."""

from __future__ import annotations

import functools
import threading

import numpy as np
import pytest
import torch
from torch import nn

from sdxl_controlnet_img2img.pipeline.local.models.loading import LoadOptions, build_pipeline, load_controlnet

NORMAL, REGISTER = nn.init.normal_, nn.Module.register_parameter  # torch's own, before any load of this module


def _torch_is_its_own():
    assert nn.init.normal_ is NORMAL and nn.init.normal_.__module__ == "torch.nn.init", nn.init.normal_
    assert nn.Module.register_parameter is REGISTER, nn.Module.register_parameter
    assert REGISTER.__qualname__ == "Module.register_parameter"
    linear = nn.Linear(64, 64)
    assert linear.weight.device.type == "cpu" and linear.weight.std() > 0.01  # on the CPU and initialised


def _same_weights(a, b, what: str) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys(), what
    for k in sa:
        assert sa[k].device.type == "cpu", f"{what}.{k} is on {sa[k].device}"
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), f"{what}.{k}"


def _at_once(*jobs) -> list:
    """Run each job in its own thread, all released at the same moment; their results (or the exception)."""
    start = threading.Barrier(len(jobs))
    results = [None] * len(jobs)

    def run(i, job):
        start.wait(30)
        try:
            results[i] = job()
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i, job), name=f"load-{i}") for i, job in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    return results


def _picture(pipe, image_files):
    from sdxl_controlnet_img2img.pipeline.local.generate import generate
    from sdxl_controlnet_img2img.pipeline.request import GenerationRequest

    req = GenerationRequest.from_dict({
        "prompt": "lighthouse in fog", "image_url": str(image_files(64, 64, 1)),
        "control_image_url": str(image_files(64, 64, 2)), "num_inference_steps": 3, "seed": 5,
        "enable_safety_checker": False})
    return np.asarray(generate(pipe, req).images[0])


@pytest.mark.parametrize("dtypes", [("bf16", "bf16"), ("fp32", "fp32"), ("fp32", "bf16")])
def test_two_pipelines_loaded_at_once_are_each_a_lone_load(tiny_models, image_files, dtypes):
    """bf16: the pack builds each model empty and fills it (the other thread's init_empty_weights put the filled
    parameters on meta: NotImplementedError from placing them); fp32: diffusers' from_pretrained in both threads (its
    patches crossed: "Unsupported device type 'meta'" for both)."""
    base, cn = tiny_models["checkpoint"], tiny_models["controlnet"]
    got = _at_once(*(lambda d=d: build_pipeline(base, cn, LoadOptions(device="cpu", dtype=d)) for d in dtypes))
    failed = [r for r in got if isinstance(r, BaseException)]
    assert not failed, [f"{type(e).__name__}: {e}" for e in failed]
    _torch_is_its_own()
    for dtype, pipe in zip(dtypes, got):
        alone = build_pipeline(base, cn, LoadOptions(device="cpu", dtype=dtype))
        for name in ("unet", "vae", "text_encoder", "text_encoder_2", "controlnet"):
            _same_weights(getattr(pipe, name), getattr(alone, name), f"{dtype} {name}")
        if dtype == "fp32":
            assert np.array_equal(_picture(pipe, image_files), _picture(alone, image_files))


def test_diffusers_own_load_beside_the_packs_leaves_torch_as_it_was(tiny_models, monkeypatch):
    """A ControlNet stored in the load dtype goes through diffusers' from_pretrained (init_empty_weights and its own
    no_init_weights), one that needs a cast through the pack's empty model (transformers' no_init_weights): with the
    two overlapping, the later-ending one put back the other's patches, and every nn.Linear built afterwards was on
    meta. The construction of the first is held open for a moment (the real constructor, then a wait) so that the
    second starts inside it, as a full-size model's construction would let it."""
    from diffusers import ControlNetModel

    cn = tiny_models["controlnet"]
    inside = threading.Event()
    construct = ControlNetModel.__init__

    @functools.wraps(construct)  # diffusers reads the config's names from the constructor's signature
    def held_open(self, *args, **kwargs):
        construct(self, *args, **kwargs)
        if threading.current_thread().name == "load-0" and not inside.is_set():
            inside.set()
            threading.Event().wait(1.5)

    monkeypatch.setattr(ControlNetModel, "__init__", held_open)

    def second():
        inside.wait(30)
        return load_controlnet(cn, LoadOptions(device="cpu", dtype="bf16"))

    stored, cast = _at_once(lambda: load_controlnet(cn, LoadOptions(device="cpu", dtype="fp32")), second)
    monkeypatch.undo()
    assert inside.is_set()
    for model in (stored, cast):
        assert not isinstance(model, BaseException), f"{type(model).__name__}: {model}"
    _torch_is_its_own()
    _same_weights(stored, ControlNetModel.from_pretrained(cn, torch_dtype=torch.float32), "fp32 controlnet")
    _same_weights(cast, ControlNetModel.from_pretrained(cn, torch_dtype=torch.bfloat16), "bf16 controlnet")
