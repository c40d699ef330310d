"""torch.compile that stays compiled (``pipeline/local/memory/compile.py``, ``lora_fused.py``), counted with a counting
backend on the CPU: after the first call has traced the UNet and the ControlNet once each, neither the six fal
size presets nor LoRA switches, scale changes or removing every LoRA trace anything again; fused LoRAs give the
images PEFT's adapters give, and removing them gives the base model's images exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from sdxl_controlnet_img2img.pipeline.local.memory.compile import compile_models, is_compiled
from sdxl_controlnet_img2img.pipeline.local.generate import generate
from sdxl_controlnet_img2img.pipeline.local.tiny_models import tiny_components
from sdxl_controlnet_img2img.pipeline.request import GenerationRequest

import lora_factory
from pictures import make_test_image

# fal's presets (square_hd, square, portrait_4_3, portrait_16_9, landscape_4_3, landscape_16_9) at a quarter of
# their size, so the tiny models run them in seconds; a quarter keeps their aspect ratios and their even latents
PRESETS_QUARTER = [(256, 256), (128, 128), (192, 256), (144, 256), (256, 192), (256, 144)]


def _pipe():
    from diffusers import StableDiffusionXLControlNetImg2ImgPipeline

    parts, controlnet = tiny_components(seed=4)
    return StableDiffusionXLControlNetImg2ImgPipeline(controlnet=controlnet, **parts)


def _request(width=128, height=128, loras=()):
    return GenerationRequest.from_dict({
        "prompt": "a photo of a red castle", "image_url": make_test_image(width, height, 1),
        "control_image_url": make_test_image(width, height, 2), "image_size": {"width": width, "height": height},
        "num_inference_steps": 2, "strength": 1.0, "seed": 3,
        "loras": [{"path": str(p), "scale": s} for p, s in loras]})


def _pixels(result):
    return np.asarray(result.images[0], dtype=int)


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras")
    pipe = _pipe()
    a = lora_factory.write(lora_factory.kohya_state_dict(pipe, seed=1, amp=0.3), folder / "a.safetensors")
    b = lora_factory.write(lora_factory.kohya_state_dict(pipe, seed=2, te=False, amp=0.3), folder / "b.safetensors")
    return a, b


def test_presets_and_lora_switches_do_not_recompile(loras):
    a, b = loras
    compiles = []

    def counting(graph_module, example_inputs):
        compiles.append(len(example_inputs))
        return graph_module.forward

    torch._dynamo.reset()
    pipe = _pipe()
    compile_models(pipe, backend=counting)
    assert is_compiled(pipe)
    base = _pixels(generate(pipe, _request()))
    assert len(compiles) == 2  # the UNet and the ControlNet, once each
    for width, height in PRESETS_QUARTER:
        generate(pipe, _request(width, height))
    with_a = _pixels(generate(pipe, _request(loras=[(a, 1.0)])))
    generate(pipe, _request(loras=[(b, 0.5)]))
    generate(pipe, _request(loras=[(a, 0.7), (b, 0.5)]))
    after_all = _pixels(generate(pipe, _request()))
    again_a = _pixels(generate(pipe, _request(192, 256, loras=[(a, 1.0)])))
    assert len(compiles) == 2, f"{len(compiles)} compilations"
    assert np.abs(with_a - base).max() > 20  # the LoRA acts
    assert np.array_equal(after_all, base)  # the original weights come back exactly
    assert again_a.shape == (256, 192, 3)


def test_fused_loras_give_the_adapters_images(loras):
    a, b = loras
    torch._dynamo.reset()
    compiled = _pipe()
    compile_models(compiled, backend=lambda gm, _inputs: gm.forward)
    plain = _pipe()  # the same weights, PEFT adapters, not compiled
    for chosen in ([(a, 1.0)], [(a, 0.7), (b, 0.5)], [(b, -0.5)]):
        ours = _pixels(generate(compiled, _request(loras=chosen)))
        theirs = _pixels(generate(plain, _request(loras=chosen)))
        assert np.abs(ours - theirs).max() <= 2, chosen  # merged vs added at run time: float rounding apart


class OutOfMemoryMidMerge(TorchDispatchMode):
    """The allocator giving out halfway through a LoRA merge: the in-place update of the ``at``-th weight of
    ``weights`` raises torch's out-of-memory error, after the ones before it were merged for real."""

    def __init__(self, weights, at):
        super().__init__()
        self.storages = {w.untyped_storage().data_ptr() for w in weights}
        self.at, self.merged = at, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.add_.Tensor and args[0].untyped_storage().data_ptr() in self.storages:
            if self.merged == self.at:
                raise torch.OutOfMemoryError("out of memory merging a LoRA layer (simulated at a real weight)")
            self.merged += 1
        return func(*args, **(kwargs or {}))


def test_a_fuse_that_fails_halfway_leaves_the_original_weights(loras):
    a, b = loras
    torch._dynamo.reset()
    pipe = _pipe()
    compile_models(pipe, backend=lambda gm, _inputs: gm.forward)
    base = _pixels(generate(pipe, _request()))
    with_a = _pixels(generate(pipe, _request(loras=[(a, 1.0)])))
    unet_linears = [m.weight for m in pipe.unet.modules() if isinstance(m, torch.nn.Linear)]
    failing = OutOfMemoryMidMerge(unet_linears, at=len(unet_linears) // 3)
    with failing, pytest.raises(torch.OutOfMemoryError):
        generate(pipe, _request(loras=[(b, 1.0)]))
    assert failing.merged > 0  # it failed halfway: layers before it had b merged in
    assert np.array_equal(_pixels(generate(pipe, _request())), base)  # the next request without LoRAs: the base
    assert np.array_equal(_pixels(generate(pipe, _request(loras=[(a, 1.0)]))), with_a)
