"""Local prompt expansion: a real GPT2LMHeadModel (tiny, random weights, written vocabulary) loaded from
disk; deterministic per seed, different across seeds; end to end through generate() and result.json."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import torch

from sdxl_controlnet_img2img.pipeline.errors import ModelLoadError
from sdxl_controlnet_img2img.pipeline.local.generate import generate
from sdxl_controlnet_img2img.pipeline.local.request_models.locate import MissingModelError, find_prompt_expander, resolve_hooks
from sdxl_controlnet_img2img.pipeline.local.request_models.prompt_expansion import (
    cached_prompt_expander,
    free_prompt_expander,
    load_prompt_expander,
)
from sdxl_controlnet_img2img.pipeline.request import GenerationRequest
from sdxl_controlnet_img2img.pipeline.result import write_result
from sdxl_controlnet_img2img.pipeline.local.tiny_models import (
    TINY_EXPANSION_WORDS,
    build_tiny_prompt_expander,
    build_tiny_safety_checker,
)

PROMPT = "a photo of a cat"


@pytest.fixture(scope="module")
def expansion_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("expansion")
    build_tiny_prompt_expander(root / "models" / "prompt_expansion" / "tiny_expansion")
    return root


@pytest.fixture
def expander_dir(expansion_root):
    return expansion_root / "models" / "prompt_expansion" / "tiny_expansion"


@pytest.fixture(autouse=True)
def _fresh_cache():
    free_prompt_expander()
    yield
    free_prompt_expander()


def _request(image, control, **kw):
    base = {"prompt": PROMPT, "image_url": str(image), "control_image_url": str(control),
            "num_inference_steps": 4, "seed": 11, "enable_safety_checker": False}
    base.update(kw)
    return GenerationRequest.from_dict(base)


def test_deterministic_per_seed_and_different_across_seeds(expander_dir):
    expand = load_prompt_expander(expander_dir, device="cpu")
    first = [expand(PROMPT, s) for s in (1, 2, 3)]
    again = [expand(PROMPT, s) for s in (1, 2, 3)]
    assert first == again
    assert len(set(first)) == 3
    # a freshly loaded copy of the model gives the same texts (nothing depends on process state)
    free_prompt_expander()
    assert [load_prompt_expander(expander_dir, device="cpu")(PROMPT, s) for s in (1, 2, 3)] == first


def test_expansion_keeps_the_prompt_and_adds_only_listed_words(expander_dir):
    text = load_prompt_expander(expander_dir, device="cpu")(PROMPT + ", ", 5)
    assert text.startswith(PROMPT + ",") and len(text) > len(PROMPT) + 10
    added = [w for w in re.split(r"[,\s]+", text[len(PROMPT):]) if w]
    assert added and set(added) <= set(TINY_EXPANSION_WORDS)
    assert len(added) == len(set(added))  # no word twice


def test_leaves_the_callers_random_state_alone(expander_dir):
    expand = load_prompt_expander(expander_dir, device="cpu")
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    expand(PROMPT, 9)
    assert torch.equal(torch.rand(3), expected)


def test_without_word_list_any_token_may_follow(expander_dir, tmp_path):
    free_dir = tmp_path / "no_list"
    shutil.copytree(expander_dir, free_dir)
    (free_dir / "positive.txt").unlink()
    expand = load_prompt_expander(free_dir, device="cpu")
    assert expand.allowed_bias is None
    a, b = expand(PROMPT, 1), expand(PROMPT, 2)
    assert a == expand(PROMPT, 1) and a != b and a.startswith(PROMPT)


def test_end_to_end_expanded_prompt_is_used_and_reported(tiny_pipe, expander_dir, image_files, tmp_path):
    img, ctl = image_files(64, 64, 1), image_files(64, 64, 2)
    expand = load_prompt_expander(expander_dir, device="cpu")
    result = generate(tiny_pipe, _request(img, ctl, expand_prompt=True), prompt_expander=expand)
    expected = expand(PROMPT, 11)
    assert result.expanded_prompt == expected == result.prompt and expected != PROMPT
    # the pipeline ran on the expanded text: same pixels as asking for that text directly
    direct = generate(tiny_pipe, _request(img, ctl, prompt=expected))
    assert np.array_equal(np.asarray(result.images[0]), np.asarray(direct.images[0]))
    doc = write_result(result, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "result.json").read_text())["expanded_prompt"] == expected
    assert doc["prompt"] == expected


def test_loaded_once_and_freed(expander_dir):
    first = load_prompt_expander(expander_dir, device="cpu")
    assert load_prompt_expander(expander_dir, device="cpu") is first is cached_prompt_expander()
    assert free_prompt_expander() is True and cached_prompt_expander() is None


def test_find_and_missing_model_errors(expansion_root, expander_dir, tmp_path):
    assert find_prompt_expander([expansion_root / "models"]) == expander_dir
    assert find_prompt_expander([expander_dir.parent]) == expander_dir
    with pytest.raises(MissingModelError) as exc:
        find_prompt_expander([tmp_path])
    assert exc.value.field == "expand_prompt"
    assert str(tmp_path / "prompt_expansion") in str(exc.value) and "fooocus_expansion" in str(exc.value)

    # a safety checker put in the expansion folder is named, not silently used or skipped
    wrong = tmp_path / "prompt_expansion" / "oops"
    build_tiny_safety_checker(wrong)
    with pytest.raises(MissingModelError, match="not a causal language model"):
        find_prompt_expander([tmp_path])
    no_weights = tmp_path / "w" / "prompt_expansion" / "half"
    shutil.copytree(expander_dir, no_weights)
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="no weights"):
        load_prompt_expander(no_weights, device="cpu")


def test_resolve_hooks_for_expansion(expansion_root, image_files, tmp_path):
    img, ctl = image_files(64, 64, 1), image_files(64, 64, 2)
    req = _request(img, ctl, expand_prompt=True)
    safety, expand = resolve_hooks(req, [expansion_root / "models"], device="cpu")
    assert safety is None and expand is cached_prompt_expander()
    with pytest.raises(MissingModelError, match="expand_prompt"):
        resolve_hooks(req, expansion_dirs=[tmp_path], device="cpu")


def test_cli_options_pass_both_hooks(tiny_models, expander_dir, image_files, tmp_path, monkeypatch, capsys):
    from sdxl_controlnet_img2img.pipeline.cli import main

    monkeypatch.chdir(tmp_path)  # no ./models here: only the options can supply the models
    img, ctl = image_files(64, 64, 1), image_files(64, 64, 2)
    req = tmp_path / "req.json"
    req.write_text(json.dumps({"prompt": PROMPT, "image_url": str(img), "control_image_url": str(ctl),
                               "num_inference_steps": 2, "seed": 3, "enable_safety_checker": True,
                               "expand_prompt": True}))
    common = ["generate", "--request", str(req), "--checkpoint", str(tiny_models["checkpoint"]),
              "--controlnet", str(tiny_models["controlnet"]), "--device", "cpu", "--dtype", "fp32"]

    assert main(common + ["--out", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert "enable_safety_checker" in err and "--safety-checker PATH" in err and "safety_checker" in err

    checker = build_tiny_safety_checker(tmp_path / "checker", flag_everything=True)
    assert main(common + ["--out", str(tmp_path / "out"), "--safety-checker", str(checker),
                          "--prompt-expansion", str(expander_dir)]) == 0
    doc = json.loads((tmp_path / "out" / "result.json").read_text())
    assert doc["has_nsfw_concepts"] == [True]
    assert doc["expanded_prompt"] == doc["prompt"] == load_prompt_expander(expander_dir, device="cpu")(PROMPT, 3)
