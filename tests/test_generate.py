"""The library's result equals a plain diffusers call, pixel for pixel, and seeds behave as documented."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sdxl_controlnet_img2img.pipeline.canny import canny_image
from sdxl_controlnet_img2img.pipeline.local.generate import generate, prepare_inputs
from sdxl_controlnet_img2img.pipeline.request import GenerationRequest
from sdxl_controlnet_img2img.pipeline.sizes import cover_resize


@pytest.fixture(scope="module")
def plain_pipe(tiny_models):
    from diffusers import ControlNetModel, StableDiffusionXLControlNetImg2ImgPipeline

    cn = ControlNetModel.from_pretrained(tiny_models["controlnet"])
    pipe = StableDiffusionXLControlNetImg2ImgPipeline.from_pretrained(tiny_models["checkpoint"], controlnet=cn)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _request(image, control, **kw):
    base = {"prompt": "ice fortress aurora", "image_url": str(image), "control_image_url": str(control),
            "enable_safety_checker": False}
    base.update(kw)
    return GenerationRequest.from_dict(base)


def _plain(plain_pipe, init, control, width, height, seeds, **kw):
    """What a user would write by hand with diffusers: Canny by OpenCV, every parameter explicit."""
    from PIL import Image

    init = cover_resize(Image.open(init).convert("RGB"), (width, height))
    control = canny_image(cover_resize(Image.open(control).convert("RGB"), (width, height)))
    args = dict(negative_prompt="", strength=0.95, num_inference_steps=25, guidance_scale=7.5,
                controlnet_conditioning_scale=0.5)
    args.update(kw)
    images = []
    for s in seeds:
        images += plain_pipe(
            prompt="ice fortress aurora", image=init, control_image=control, height=height, width=width,
            num_images_per_prompt=1, generator=torch.Generator("cpu").manual_seed(s), **args,
        ).images
    return images


def _same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.size == y.size
        assert np.array_equal(np.asarray(x), np.asarray(y))


def test_defaults_equal_plain_diffusers(tiny_pipe, plain_pipe, image_files):
    img, ctl = image_files(64, 64, 1), image_files(64, 64, 2)
    result = generate(tiny_pipe, _request(img, ctl, seed=42))
    assert result.seed == 42 and result.has_nsfw_concepts == [False]
    _same(result.images, _plain(plain_pipe, img, ctl, 64, 64, [42]))


def test_custom_size_equals_plain_diffusers(tiny_pipe, plain_pipe, image_files):
    img, ctl = image_files(80, 60, 3), image_files(50, 70, 4)
    req = _request(img, ctl, seed=7, image_size={"width": 76, "height": 68}, num_inference_steps=6)
    result = generate(tiny_pipe, req)
    assert (result.width, result.height) == (72, 64)  # floored to multiples of 8
    assert result.images[0].size == (72, 64)
    _same(result.images, _plain(plain_pipe, img, ctl, 72, 64, [7], num_inference_steps=6))


def test_image_size_none_uses_control_size_with_differently_sized_inputs(tiny_pipe, plain_pipe, image_files):
    img, ctl = image_files(96, 64, 5), image_files(80, 70, 6)
    result = generate(tiny_pipe, _request(img, ctl, seed=3, num_inference_steps=6))
    assert result.images[0].size == (80, 64)
    _same(result.images, _plain(plain_pipe, img, ctl, 80, 64, [3], num_inference_steps=6))


def test_three_images_equal_plain_and_each_alone(tiny_pipe, plain_pipe, image_files):
    img, ctl = image_files(64, 64, 7), image_files(64, 64, 8)
    result = generate(tiny_pipe, _request(img, ctl, seed=100, num_images=3, num_inference_steps=6))
    assert len(result.images) == 3 and result.has_nsfw_concepts == [False] * 3
    _same(result.images, _plain(plain_pipe, img, ctl, 64, 64, [100, 101, 102], num_inference_steps=6))
    alone = generate(tiny_pipe, _request(img, ctl, seed=102, num_images=1, num_inference_steps=6))
    _same(alone.images, result.images[2:3])
    assert not np.array_equal(np.asarray(result.images[0]), np.asarray(result.images[1]))


def test_strength_03_equals_plain(tiny_pipe, plain_pipe, image_files):
    img, ctl = image_files(64, 64, 9), image_files(64, 64, 10)
    result = generate(tiny_pipe, _request(img, ctl, seed=5, strength=0.3))
    _same(result.images, _plain(plain_pipe, img, ctl, 64, 64, [5], strength=0.3))


def test_seedless_run_returns_a_seed_that_reproduces_it(tiny_pipe, image_files):
    img, ctl = image_files(64, 64, 11), image_files(64, 64, 12)
    first = generate(tiny_pipe, _request(img, ctl, num_inference_steps=4))
    assert isinstance(first.seed, int)
    again = generate(tiny_pipe, _request(img, ctl, num_inference_steps=4, seed=first.seed))
    _same(first.images, again.images)
    other = generate(tiny_pipe, _request(img, ctl, num_inference_steps=4, seed=first.seed + 1))
    assert not np.array_equal(np.asarray(first.images[0]), np.asarray(other.images[0]))


def test_step_callback_counts_steps_actually_run_and_can_cancel(tiny_pipe, image_files):
    from sdxl_controlnet_img2img.pipeline.errors import GenerationCancelled

    img, ctl = image_files(64, 64, 13), image_files(64, 64, 14)
    seen = []
    req = _request(img, ctl, seed=1, num_inference_steps=10, strength=0.55)
    generate(tiny_pipe, req, on_step=lambda s, t, lat: seen.append((s, t, tuple(lat.shape))))
    assert [s for s, _, _ in seen] == list(range(1, 6)) and {t for _, t, _ in seen} == {5}
    assert seen[0][2] == (1, 4, 8, 8)  # 64 px / the VAE's factor 8

    seen.clear()
    generate(tiny_pipe, _request(img, ctl, seed=1, num_inference_steps=4, num_images=2),
             on_step=lambda s, t, lat: seen.append((s, t)))
    assert seen == [(s, 6) for s in range(1, 7)]  # int(4 * 0.95) = 3 steps for each of 2 images

    def cancel_at_2(step, total, _):
        if step == 2:
            raise GenerationCancelled("stop")

    with pytest.raises(GenerationCancelled):
        generate(tiny_pipe, req, on_step=cancel_at_2)


def test_apply_canny_false_uses_control_image_as_given(image_files):
    img, ctl = image_files(64, 64, 15), image_files(64, 64, 16)
    with_canny = prepare_inputs(_request(img, ctl))
    raw = prepare_inputs(_request(img, ctl, apply_canny=False))
    edges = np.asarray(with_canny.control_image)
    assert set(np.unique(edges)) <= {0, 255}
    from PIL import Image

    assert np.array_equal(np.asarray(raw.control_image), np.asarray(Image.open(ctl).convert("RGB")))


def test_prompt_and_init_image_are_encoded_once_per_request(tiny_pipe, image_files, monkeypatch):
    """num_images 3: the text encoders and the VAE encoder run as often as for one image (the images themselves
    stay pixel-equal to separate calls: test_three_images_equal_plain_and_each_alone)."""
    calls = {"vae": 0, "te": 0, "te2": 0}

    def counting(name, fn):
        def wrapped(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(tiny_pipe.vae, "encode", counting("vae", tiny_pipe.vae.encode))
    monkeypatch.setattr(tiny_pipe.text_encoder, "forward", counting("te", tiny_pipe.text_encoder.forward))
    monkeypatch.setattr(tiny_pipe.text_encoder_2, "forward", counting("te2", tiny_pipe.text_encoder_2.forward))
    img, ctl = image_files(64, 64, 1), image_files(64, 64, 2)
    generate(tiny_pipe, _request(img, ctl, seed=5, num_images=1, num_inference_steps=2))
    one = dict(calls)
    calls.update(vae=0, te=0, te2=0)
    generate(tiny_pipe, _request(img, ctl, seed=5, num_images=3, num_inference_steps=2))
    assert calls == one and one["vae"] == 1 and one["te"] >= 1
