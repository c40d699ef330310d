"""The SDXLCN_PIPELINE value is light: ComfyUI's output cache may keep old values (--cache-lru, --cache-ram), and
they must keep no pipeline alive; a value whose pipeline was freed loads it again when next used."""

from __future__ import annotations

import gc
import weakref

from sdxl_controlnet_img2img import NODE_CLASS_MAPPINGS
from sdxl_controlnet_img2img.pipeline.local.models.loading import cached_pipeline, free_cached_pipeline


def _load(tiny_models, **options):
    loader = NODE_CLASS_MAPPINGS["SDXLCNLoader"]()
    return loader.load(str(tiny_models["checkpoint"]), str(tiny_models["controlnet"]), device="cpu", **options)[0]


def test_old_values_keep_no_pipeline_alive_and_reload_when_used(tiny_models):
    free_cached_pipeline()
    kept = []  # what ComfyUI's LRU cache would hold: every value ever output
    a = _load(tiny_models, dtype="fp32")
    kept.append(a)
    pipe_a = weakref.ref(a.get_pipe())
    b = _load(tiny_models, dtype="bf16")  # another loader option: a second pipeline
    kept.append(b)
    gc.collect()
    assert pipe_a() is None, "the first pipeline is still alive although only old values refer to it"
    assert cached_pipeline() is b.get_pipe()
    # the old value still works: it loads its pipeline again (and the other one goes)
    pipe_b = weakref.ref(b.get_pipe())
    again = a.get_pipe()
    gc.collect()
    assert pipe_b() is None and cached_pipeline() is again and again.unet.dtype.is_floating_point
    assert str(again.unet.dtype) == "torch.float32"
    # freeing (the /sdxlcn/free route, ComfyUI's Unload models) leaves no pipeline behind either
    pipe_again = weakref.ref(again)
    del again
    free_cached_pipeline()
    gc.collect()
    assert pipe_again() is None and cached_pipeline() is None
    assert a.get_pipe() is cached_pipeline()  # and the value still works
    free_cached_pipeline()


def test_a_lora_value_reaches_the_pipeline_through_the_reference(tiny_models):
    from sdxl_controlnet_img2img.pipeline.request import LoraSpec

    free_cached_pipeline()
    a = _load(tiny_models)
    with_lora = a.with_lora(LoraSpec("x.safetensors", 0.5))
    assert with_lora.get_pipe() is a.get_pipe() and with_lora.loras == (LoraSpec("x.safetensors", 0.5),)
    assert with_lora.pipe is None  # the value itself holds no pipeline
    free_cached_pipeline()
