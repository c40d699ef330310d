"""An input scaled up more than 4 times to cover the output size (a 1x1 image with a custom size) runs, with one
warning line naming the input, its size, the factor and the smallest size that would do; 4 times or less is quiet.
The factor is worked out here from the sizes alone: cover-resize scales by max(out_w / w, out_h / h)."""

from __future__ import annotations

import json
import logging

import numpy as np
import torch

from sdxl_controlnet_img2img import NODE_CLASS_MAPPINGS
from sdxl_controlnet_img2img.pipeline.cli import main
from sdxl_controlnet_img2img.pipeline.handle import PipelineHandle


def _cli(tiny_models, tmp_path, image_files, init_size, size="64x64"):
    from PIL import Image

    init = tmp_path / "init.png"
    pixels = np.random.default_rng(1).integers(0, 256, (init_size[1], init_size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(init)
    req = tmp_path / "req.json"
    req.write_text(json.dumps({"prompt": "a cat", "image_url": str(init),
                               "control_image_url": str(image_files(64, 64, seed=2, name="control.png")),
                               "strength": 1.0, "seed": 1}))
    return main(["generate", "--request", str(req), "--checkpoint", str(tiny_models["checkpoint"]), "--controlnet",
                 str(tiny_models["controlnet"]), "--out", str(tmp_path / "out"), "--overwrite", "--steps", "1",
                 "--size", size])


def test_the_cli_warns_once_when_an_input_is_scaled_up_more_than_4_times(tiny_models, image_files, tmp_path,
                                                                         capsys):
    assert _cli(tiny_models, tmp_path, image_files, (1, 1)) == 0
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("warning:")]
    assert lines == ["warning: image_url is 1x1 and is scaled up 64 times to cover 64x64, so the result will be "
                     "blurry or blocky; use an image of at least 16x16 (at most 4 times smaller than the output) or a "
                     "smaller image_size"], lines


def test_4_times_or_less_is_quiet(tiny_models, image_files, tmp_path, capsys):
    assert _cli(tiny_models, tmp_path, image_files, (16, 20), size="64x80") == 0  # exactly 4 times on both sides
    assert "warning:" not in capsys.readouterr().err
    assert _cli(tiny_models, tmp_path, image_files, (15, 40), size="64x80") == 0  # 64 / 15 = 4.27 times
    assert "image_url is 15x40 and is scaled up 4.27 times" in capsys.readouterr().err


def test_the_sampler_node_logs_it_once_for_a_batch(tiny_pipe, caplog):
    node = NODE_CLASS_MAPPINGS["SDXLCNImg2Img"]
    spec = node.INPUT_TYPES()
    args = {name: opts[0]["default"] for section in ("required", "optional")
            for name, (_typ, *opts) in spec[section].items() if opts and "default" in opts[0]}
    rng = np.random.default_rng(0)
    tiny = torch.from_numpy(rng.random((2, 2, 2, 3), dtype=np.float32))  # two 2x2 init images
    control = torch.from_numpy(rng.random((1, 4, 4, 3), dtype=np.float32))  # one 4x4 control image
    args.update(pipeline=PipelineHandle(tiny_pipe), image=tiny, control_image=control, prompt="a cat",
                num_inference_steps=1, strength=1.0, image_size="custom", width=64, height=64)
    with caplog.at_level(logging.WARNING, logger="sdxl_controlnet_img2img"):
        images = node().sample(**args)[0]
    assert tuple(images.shape) == (2, 64, 64, 3)
    said = [r.getMessage() for r in caplog.records if "scaled up" in r.getMessage()]
    # named as the node's inputs (image, control_image), not as fal's fields (image_url, control_image_url)
    assert said == ["SDXLCNImg2Img: image is 2x2 and is scaled up 32 times to cover 64x64, so the result will be "
                    "blurry or blocky; use an image of at least 16x16 (at most 4 times smaller than the output) or a "
                    "smaller image_size",
                    "SDXLCNImg2Img: control_image is 4x4 and is scaled up 16 times to cover 64x64, so the result will "
                    "be blurry or blocky; use an image of at least 16x16 (at most 4 times smaller than the output) or "
                    "a smaller image_size"], said
