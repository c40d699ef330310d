"""Every memory mode on the CPU: the loader's own placement (``placement.apply_memory_mode``: diffusers' offload
with accelerate's real hooks) with the CPU as the execution device, so CI runs the branches GPU users hit.

In ``none``, ``model_cpu_offload`` and ``sequential_cpu_offload`` a run of requests that switches LoRA sets and
forces the fp32 re-decode gives the pictures ``none`` gives. The forced decode: a forward hook on the real VAE
decoder turns its output to NaN whenever it computes below fp32, which is what an fp16 overflow of the stock SDXL
VAE does; the re-decode in fp32 then runs for real (under sequential offload, with the weights on ``meta``).

``compile`` (a counting backend) runs with ``none`` and ``model_cpu_offload`` through LoRA switches without
tracing again; with ``sequential_cpu_offload`` it is refused when the pipeline loads."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from sdxl_controlnet_img2img.pipeline.errors import ModelLoadError
from sdxl_controlnet_img2img.pipeline.local.memory.compile import compile_models
from sdxl_controlnet_img2img.pipeline.local.generate import generate
from sdxl_controlnet_img2img.pipeline.local.models.loading import LoadOptions, build_pipeline
from sdxl_controlnet_img2img.pipeline.local.memory.placement import apply_memory_mode, compile_conflict, memory_mode_of
from sdxl_controlnet_img2img.pipeline.request import GenerationRequest

import lora_factory
from pictures import make_test_image

MODES = ("none", "model_cpu_offload", "sequential_cpu_offload")


def _pipe(tiny_models, mode, dtype="bf16"):
    """The tiny pipeline as the loader builds it, then placed in ``mode`` by the loader's own placement."""
    pipe = build_pipeline(tiny_models["checkpoint"], tiny_models["controlnet"], LoadOptions(device="cpu", dtype=dtype))
    apply_memory_mode(pipe, mode, "cpu")
    assert memory_mode_of(pipe) == mode
    return pipe


def _request(loras=()):
    return GenerationRequest.from_dict({
        "prompt": "a photo of a red castle", "image_url": make_test_image(64, 64, 1),
        "control_image_url": make_test_image(64, 64, 2), "image_size": {"width": 64, "height": 64},
        "num_inference_steps": 2, "strength": 1.0, "seed": 3,
        "loras": [{"path": str(p), "scale": s} for p, s in loras]})


def _pixels(result):
    return np.asarray(result.images[0], dtype=int)


def _nan_below_fp32(_module, _inputs, output):
    """What an fp16 overflow does to the stock SDXL VAE: NaN out when the decoder runs below fp32."""
    return output * float("nan") if output.dtype != torch.float32 else output


@pytest.fixture(scope="module")
def loras(tiny_models, tmp_path_factory):
    folder = tmp_path_factory.mktemp("mode-loras")
    pipe = build_pipeline(tiny_models["checkpoint"], tiny_models["controlnet"], LoadOptions(device="cpu"))
    a = lora_factory.write(lora_factory.kohya_state_dict(pipe, seed=1, amp=0.3), folder / "a.safetensors")
    b = lora_factory.write(lora_factory.kohya_state_dict(pipe, seed=2, te=False, amp=0.3), folder / "b.safetensors")
    return a, b


def _session(pipe, loras, caplog):
    """A user's session: a LoRA, a switch to another, none, then the first again with a decode that overflows."""
    a, b = loras
    out = [_pixels(generate(pipe, _request([(a, 1.0)]))),
           _pixels(generate(pipe, _request([(b, 0.5)]))),
           _pixels(generate(pipe, _request()))]
    hook = pipe.vae.decoder.register_forward_hook(_nan_below_fp32)
    try:
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            out.append(_pixels(generate(pipe, _request([(a, 1.0)]))))
    finally:
        hook.remove()
    assert "decoding again in fp32" in caplog.text
    assert pipe.vae.dtype == torch.bfloat16  # the VAE is back in its own dtype
    return out


@pytest.fixture(scope="module")
def reference(tiny_models, loras):
    """The session's pictures in memory mode none (without the forced overflow)."""
    pipe = _pipe(tiny_models, "none")
    a, b = loras
    return [_pixels(generate(pipe, _request([(a, 1.0)]))), _pixels(generate(pipe, _request([(b, 0.5)]))),
            _pixels(generate(pipe, _request()))]


@pytest.mark.parametrize("mode", MODES)
def test_each_memory_mode_gives_the_pictures_of_none(tiny_models, loras, reference, mode, caplog):
    pipe = _pipe(tiny_models, mode)
    got = _session(pipe, loras, caplog)
    with_a, with_b, base, rescued = got
    assert np.abs(with_a - base).max() > 20 and np.abs(with_b - base).max() > 20  # the LoRAs act
    assert rescued.std() > 10  # a picture, not a black image
    for name, ours, theirs in zip(("lora a", "lora b", "no lora"), got, reference):
        assert np.abs(ours - theirs).max() <= 2, (mode, name)
    assert np.abs(rescued - reference[0]).mean() < 3.0, mode  # the same picture, decoded in fp32 instead of bf16
    if mode != "none":
        assert torch.device(pipe._execution_device).type == "cpu"
        assert memory_mode_of(pipe) == mode  # placed again after the LoRA loads


@pytest.mark.parametrize("mode", ("none", "model_cpu_offload"))
def test_compile_stays_compiled_in_each_memory_mode_through_lora_switches(tiny_models, loras, mode):
    a, b = loras
    compiles = []

    def counting(graph_module, example_inputs):
        compiles.append(len(example_inputs))
        return graph_module.forward

    plain = _pipe(tiny_models, "none", dtype="fp32")  # PEFT adapters, not compiled
    torch._dynamo.reset()
    pipe = _pipe(tiny_models, mode, dtype="fp32")
    compile_models(pipe, backend=counting)
    base = _pixels(generate(pipe, _request()))
    traced = len(compiles)
    switches = ([(a, 1.0)], [(a, 0.7), (b, 0.5)])
    runs = [_pixels(generate(pipe, _request(chosen))) for chosen in (*switches, [])]
    assert len(compiles) == traced, f"{mode}: {len(compiles) - traced} more compilations after the first call"
    assert np.array_equal(runs[-1], base)  # the originals come back exactly
    assert np.abs(runs[0] - base).max() > 20  # the LoRA acts
    for chosen, ours in zip(switches, runs):
        theirs = _pixels(generate(plain, _request(chosen)))
        assert np.abs(ours - theirs).max() <= 2, (mode, chosen)  # fused vs adapters: float rounding apart


def test_compile_with_sequential_offload_is_refused_when_the_pipeline_loads(tiny_models):
    with pytest.raises(ModelLoadError, match=r"compile: cannot be used with memory_mode sequential_cpu_offload.*"
                                             r"Turn compile off, or choose memory_mode model_cpu_offload or none"):
        build_pipeline(tiny_models["checkpoint"], tiny_models["controlnet"],
                       LoadOptions(device="cpu", compile=True, memory_mode="sequential_cpu_offload"))
    # auto choosing sequential offload on a small GPU (placement.place) is refused with auto's reason
    why = compile_conflict("sequential_cpu_offload", "too little free GPU memory for the other modes")
    assert why.startswith("compile: cannot be used with memory_mode auto chose sequential_cpu_offload (too little")
    assert compile_conflict("model_cpu_offload") is None and compile_conflict("none") is None
