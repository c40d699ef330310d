"""Known-harmless library chatter stays out of CLI runs; other warnings still show (issue 25 item 6)."""

from __future__ import annotations

import importlib.util
import json
import logging
import re
import subprocess
import sys
import warnings

import pytest


def test_make_tiny_models_prints_no_torchvision_fallback_warnings(tmp_path):
    """The first README command runs make-tiny-models then generate: neither may print transformers'
    "`CLIPImageProcessor` requires torchvision (not installed); falling back to ...Pil" lines."""
    out = subprocess.run([sys.executable, "-m", "sdxl_controlnet_img2img", "make-tiny-models", "--out",
                          str(tmp_path / "m")], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert "requires torchvision" not in out.stderr + out.stdout
    assert not TQDM_BAR.search(out.stderr), out.stderr  # transformers' "Writing model shards" bars (issue 35 item 5)
    if importlib.util.find_spec("torchvision") is None:
        # and the filter is what keeps them out: without it the same import prints them
        raw = subprocess.run([sys.executable, "-c", "import transformers; transformers.CLIPImageProcessor"],
                             capture_output=True, text=True, timeout=300)
        assert "`CLIPImageProcessor` requires torchvision (not installed)" in raw.stderr


def test_only_the_known_message_is_dropped(caplog):
    import sdxl_controlnet_img2img.pipeline.local  # noqa: F401 - installs the filters

    logger = logging.getLogger("transformers.utils.import_utils")
    with caplog.at_level(logging.WARNING, logger="transformers.utils.import_utils"):
        logger.warning("`XImageProcessor` requires torchvision (not installed); falling back to `XImageProcessorPil`")
        logger.warning("Disabling PyTorch because PyTorch >= 2.6 is required")
    assert [r.getMessage() for r in caplog.records] == ["Disabling PyTorch because PyTorch >= 2.6 is required"]


def _generate(tiny_models, tmp_path, control, image_size="custom"):
    """The CLI's generate in a child process, as a user runs it: (exit code, stderr)."""
    req = {"prompt": "a house", "image_url": str(_picture(tmp_path, "init.png", 64, 64)),
           "control_image_url": str(control), "num_inference_steps": 2, "strength": 1.0, "seed": 1}
    if image_size == "custom":
        req["image_size"] = {"width": 64, "height": 64}
    (tmp_path / "req.json").write_text(json.dumps(req))
    out = subprocess.run([sys.executable, "-m", "sdxl_controlnet_img2img", "generate", "--request",
                          str(tmp_path / "req.json"), "--checkpoint", str(tiny_models["checkpoint"]), "--controlnet",
                          str(tiny_models["controlnet"]), "--out", str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=600)
    return out.returncode, out.stderr


def _picture(tmp_path, name, w, h, mode="RGB"):
    from PIL import Image

    from pictures import make_test_image

    p = tmp_path / name
    (make_test_image(w, h, 1) if mode == "RGB" else Image.new(mode, (w, h), 1)).save(p)
    return p


TQDM_BAR = re.compile(r"\d+%\||it/s\]|s/it\]")  # tqdm's "57%|█████▋ | 4/7 [00:00<00:00, 15.97it/s]"


def test_a_local_run_prints_no_library_progress_bars(tiny_models, tmp_path):
    """diffusers' "Loading pipeline components..." and transformers' "Loading weights" bars stay off (the CLI says
    what it loaded, and in how long, in one line of its own)."""
    code, err = _generate(tiny_models, tmp_path, _picture(tmp_path, "control.png", 64, 64))
    assert code == 0, err
    assert not TQDM_BAR.search(err), err
    assert "loaded models in" in err


def test_bars_come_back_after_a_load_and_stay_off_while_any_load_runs():
    import diffusers.utils.logging as dl
    import transformers.utils.logging as tl

    from sdxl_controlnet_img2img.pipeline.local.models.load_lock import load_lock

    assert dl.is_progress_bar_enabled() and tl.is_progress_bar_enabled()
    with load_lock():
        with load_lock():
            assert not dl.is_progress_bar_enabled() and not tl.is_progress_bar_enabled()
        assert not dl.is_progress_bar_enabled() and not tl.is_progress_bar_enabled()
    assert dl.is_progress_bar_enabled() and tl.is_progress_bar_enabled()


def test_an_image_over_pillows_warning_limit_gives_only_our_words(tiny_models, tmp_path):
    """A 90 MP control image with image_size none: Pillow's DecompressionBombWarning (a line naming its own file in
    site-packages) used to come before the pack's one error line, which says the same thing (the size) better."""
    from PIL import Image

    big = _picture(tmp_path, "big.png", 9500, 9500, mode="1")
    assert 9500 * 9500 > Image.MAX_IMAGE_PIXELS  # Pillow's own limit: it would warn
    code, err = _generate(tiny_models, tmp_path, big, image_size=None)
    assert code != 0
    assert err.strip().splitlines() == [err.strip()], err  # one line
    assert err.startswith("error: image_size:") and "is 9500x9500 (9496x9496 in multiples of 8: 90.2 MP)" in err
    assert "DecompressionBomb" not in err and "site-packages" not in err


def test_an_image_over_pillows_refusal_is_our_error_naming_the_input(tmp_path):
    """Twice Pillow's limit: it raises a bare DecompressionBombError (a traceback in the CLI); now the pack's error
    naming the input, its file and the fix."""
    from PIL import Image

    from sdxl_controlnet_img2img.pipeline.errors import ImageInputError
    from sdxl_controlnet_img2img.pipeline.images import load_image

    huge = _picture(tmp_path, "huge.png", 14200, 14200, mode="1")
    assert 14200 * 14200 > 2 * Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and no warning either
        with pytest.raises(ImageInputError) as err:
            load_image(str(huge), "control_image_url")
    assert err.value.field == "control_image_url"
    assert str(huge) in str(err.value) and "scale it down" in str(err.value)


def test_peft_second_adapter_warning_is_ours_once(tiny_pipe, tmp_path, caplog):
    """PEFT warns "Already found a `peft_config` attribute" (warnings.warn, with its site-packages path) for every
    LoRA after the first; the pack keeps several on purpose and says so in its own line."""
    import lora_factory

    from sdxl_controlnet_img2img.pipeline.local.lora.adapters import load_lora, unload_all

    unload_all(tiny_pipe)  # none kept by earlier tests
    paths = []
    for seed in (1, 2):
        paths.append(tmp_path / f"style_{seed}.safetensors")
        lora_factory.write(lora_factory.kohya_state_dict(tiny_pipe, seed=seed), paths[-1])
    try:
        with warnings.catch_warnings(record=True) as seen, caplog.at_level(logging.INFO, "sdxl_controlnet_img2img"):
            warnings.simplefilter("always")
            for p in paths:
                load_lora(tiny_pipe, str(p))
    finally:
        unload_all(tiny_pipe)
    assert not [w for w in seen if "peft_config" in str(w.message)], [str(w.message) for w in seen]
    said = [r.getMessage() for r in caplog.records if r.name.endswith("lora.adapters")]
    assert said == ["LoRA style_1.safetensors: loaded",
                    "LoRA style_2.safetensors: loaded (kept beside 1 other LoRA: switching between them reads no "
                    "file)"]


def test_httpx_request_lines_are_dropped_only_for_the_packs_own_calls(caplog):
    from sdxl_controlnet_img2img.pipeline.fal.settings import own_http_calls

    httpx_log = logging.getLogger("httpx")
    with caplog.at_level(logging.INFO, logger="httpx"):
        httpx_log.info('HTTP Request: GET https://example.com/a "HTTP/1.1 200 OK"')
        with own_http_calls():
            httpx_log.info('HTTP Request: GET https://queue.fal.run/x "HTTP/1.1 200 OK"')
    assert [r.getMessage() for r in caplog.records] == ['HTTP Request: GET https://example.com/a "HTTP/1.1 200 OK"']
