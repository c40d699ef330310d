"""The local safety checker: real StableDiffusionSafetyChecker (tiny random weights) loaded from disk,
flags forced both ways through its own thresholds, end to end through generate() and result.json."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from sdxl_controlnet_img2img.pipeline.errors import ModelLoadError, RequestError
from sdxl_controlnet_img2img.pipeline.local.generate import generate
from sdxl_controlnet_img2img.pipeline.local.request_models.locate import (
    MissingModelError,
    find_safety_checker,
    resolve_hooks,
)
from sdxl_controlnet_img2img.pipeline.request import GenerationRequest
from sdxl_controlnet_img2img.pipeline.result import write_result
from sdxl_controlnet_img2img.pipeline.local.request_models.safety import (
    cached_safety_checker,
    free_safety_checker,
    load_safety_checker,
)
from sdxl_controlnet_img2img.pipeline.local.tiny_models import build_tiny_safety_checker

from pictures import make_test_image


@pytest.fixture(scope="module")
def checker_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("safety")
    return {
        "pass": build_tiny_safety_checker(root / "models" / "safety_checker" / "tiny-pass"),
        "flag": build_tiny_safety_checker(root / "flag", flag_everything=True),
        "root": root,
    }


@pytest.fixture(autouse=True)
def _fresh_cache():
    free_safety_checker()
    yield
    free_safety_checker()


def _request(image, control, **kw):
    base = {"prompt": "ice fortress aurora", "image_url": str(image), "control_image_url": str(control),
            "num_inference_steps": 4, "seed": 7}
    base.update(kw)
    return GenerationRequest.from_dict(base)


def _is_black(img):
    return img.mode == "RGB" and not np.asarray(img).any()


def test_not_flagged_images_come_back_untouched(checker_dirs):
    checker = load_safety_checker(checker_dirs["pass"], device="cpu")
    images = [make_test_image(64, 48, 1), make_test_image(40, 40, 2)]
    out, flags = checker(images)
    assert flags == [False, False]
    assert out[0] is images[0] and out[1] is images[1]


def test_flagged_images_become_black_of_the_same_size(checker_dirs):
    checker = load_safety_checker(checker_dirs["flag"], device="cpu")
    images = [make_test_image(64, 48, 1), make_test_image(40, 40, 2)]
    out, flags = checker(images)
    assert flags == [True, True]
    assert [im.size for im in out] == [(64, 48), (40, 40)]
    assert all(_is_black(im) for im in out)


def test_concept_threshold_flags_one_image_and_not_the_other(checker_dirs, tmp_path):
    """Put image A's own CLIP embedding in as concept 0 with threshold 0.999: A scores cos=1 > 0.999 (flagged),
    B scores below it (kept). Every other concept and special-care threshold is out of reach (2.0)."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

    a, b = make_test_image(64, 64, 3), make_test_image(64, 64, 4).transpose(0)
    base = load_safety_checker(checker_dirs["pass"], device="cpu")
    model = StableDiffusionSafetyChecker.from_pretrained(checker_dirs["pass"])
    with torch.no_grad():
        pixels = base.processor(images=[a, b], return_tensors="pt").pixel_values
        embeds = model.visual_projection(model.vision_model(pixels)[1])
        cos_ab = torch.nn.functional.cosine_similarity(embeds[0], embeds[1], dim=0).item()
        assert cos_ab < 0.99, "test images must differ for the checker"
        model.concept_embeds[0] = embeds[0]
        model.concept_embeds_weights.fill_(2.0)
        model.concept_embeds_weights[0] = 0.999
        model.special_care_embeds_weights.fill_(2.0)
    folder = tmp_path / "threshold"
    model.save_pretrained(folder)
    shutil.copy(checker_dirs["pass"] / "preprocessor_config.json", folder)

    checker = load_safety_checker(folder, device="cpu")
    out, flags = checker([a, b])
    assert flags == [True, False]
    assert _is_black(out[0]) and out[1] is b


def test_end_to_end_flags_reach_result_and_result_json(tiny_pipe, checker_dirs, image_files, tmp_path):
    img, ctl = image_files(64, 64, 1), image_files(64, 64, 2)
    req = _request(img, ctl, num_images=2, enable_safety_checker=True)
    flagged = generate(tiny_pipe, req, safety_checker=load_safety_checker(checker_dirs["flag"], device="cpu"))
    assert flagged.has_nsfw_concepts == [True, True]
    assert all(_is_black(im) and im.size == (64, 64) for im in flagged.images)
    doc = write_result(flagged, tmp_path / "out")
    assert doc["has_nsfw_concepts"] == [True, True]
    assert json.loads((tmp_path / "out" / "result.json").read_text())["has_nsfw_concepts"] == [True, True]

    passed = generate(tiny_pipe, req, safety_checker=load_safety_checker(checker_dirs["pass"], device="cpu"))
    unchecked = generate(tiny_pipe, _request(img, ctl, num_images=2, enable_safety_checker=False))
    assert passed.has_nsfw_concepts == [False, False] == unchecked.has_nsfw_concepts
    for x, y in zip(passed.images, unchecked.images):
        assert np.array_equal(np.asarray(x), np.asarray(y))


def test_loaded_once_per_folder_and_freed(checker_dirs):
    first = load_safety_checker(checker_dirs["pass"], device="cpu")
    assert load_safety_checker(checker_dirs["pass"], device="cpu") is first
    assert cached_safety_checker() is first
    assert free_safety_checker() is True
    assert cached_safety_checker() is None
    assert load_safety_checker(checker_dirs["pass"], device="cpu") is not first


def test_find_in_models_folder_and_diffusers_layout(checker_dirs, tmp_path):
    # models root -> models/safety_checker/<one subfolder>
    assert find_safety_checker([checker_dirs["root"] / "models"]) == checker_dirs["pass"]
    # the safety_checker folder itself (what ComfyUI's folder_paths gives)
    assert find_safety_checker([checker_dirs["root"] / "models" / "safety_checker"]) == checker_dirs["pass"]
    # a diffusers pipeline folder: safety_checker/ + feature_extractor/
    pipe_dir = tmp_path / "sd15"
    shutil.copytree(checker_dirs["pass"], pipe_dir / "safety_checker")
    (pipe_dir / "feature_extractor").mkdir()
    shutil.move(pipe_dir / "safety_checker" / "preprocessor_config.json", pipe_dir / "feature_extractor")
    assert find_safety_checker([pipe_dir]) == pipe_dir
    out, flags = load_safety_checker(pipe_dir, device="cpu")([make_test_image(32, 32)])
    assert flags == [False]


def test_missing_checker_is_a_clear_error(tmp_path):
    empty = tmp_path / "models"
    empty.mkdir()
    with pytest.raises(MissingModelError) as exc:
        find_safety_checker([empty])
    msg = str(exc.value)
    assert exc.value.field == "enable_safety_checker"
    assert str(empty / "safety_checker") in msg and "CompVis/stable-diffusion-safety-checker" in msg
    with pytest.raises(MissingModelError):
        find_safety_checker([])


def test_unusable_checker_folders_are_named(checker_dirs, tmp_path):
    no_weights = tmp_path / "safety_checker" / "broken"
    no_weights.mkdir(parents=True)
    shutil.copy(checker_dirs["pass"] / "config.json", no_weights)
    with pytest.raises(MissingModelError, match="no weights"):
        find_safety_checker([tmp_path])
    with pytest.raises(ModelLoadError, match="no weights"):
        load_safety_checker(no_weights, device="cpu")
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_safety_checker(tmp_path / "nowhere", device="cpu")
    with pytest.raises(ModelLoadError, match="local Hugging Face cache only"):
        load_safety_checker("nobody/no-such-checker", device="cpu")


def test_resolve_hooks_loads_only_what_is_enabled(checker_dirs, image_files, tmp_path):
    img, ctl = image_files(64, 64, 1), image_files(64, 64, 2)
    models = checker_dirs["root"] / "models"
    off = _request(img, ctl, enable_safety_checker=False)
    assert resolve_hooks(off, [tmp_path]) == (None, None)
    assert cached_safety_checker() is None  # nothing loaded when disabled
    on = _request(img, ctl, enable_safety_checker=True)
    safety, expander = resolve_hooks(on, safety_dirs=[models], expansion_dirs=[], device="cpu")
    assert safety is cached_safety_checker() and expander is None
    with pytest.raises(MissingModelError, match="enable_safety_checker"):
        resolve_hooks(on, [tmp_path], device="cpu")
    with pytest.raises(RequestError, match="enable_safety_checker"):
        generate(object(), on)  # the library refuses to run an enabled checker without one
