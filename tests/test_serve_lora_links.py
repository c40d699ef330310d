"""A LoRA name on `serve` (pipeline/serve/loras.py) stays inside the operator's --loras-dir: a link in it that points
elsewhere (a folder, /etc/passwd) serves nothing, is refused at the submit like a missing name, and is not counted
in the start-up line (break-it review: such names were run, or told the caller what kind of file lay beyond)."""

import pytest

from sdxl_controlnet_img2img.pipeline.serve.loras import LoraRules
from sdxl_controlnet_img2img.pipeline.serve.protocol import HttpError


def test_links_out_of_the_lora_folder_serve_nothing(tmp_path):
    loras, outside = tmp_path / "loras", tmp_path / "outside"
    (loras / "sub").mkdir(parents=True)
    outside.mkdir()
    (loras / "good.safetensors").write_bytes(b"x")
    (loras / "sub" / "also.safetensors").write_bytes(b"x")
    (outside / "secret.safetensors").write_bytes(b"x")
    (loras / "link").symlink_to(outside)
    (loras / "pw.safetensors").symlink_to("/etc/passwd")
    (loras / "inner.safetensors").symlink_to(loras / "good.safetensors")  # a link inside the folder still serves
    rules = LoraRules(dirs=(loras,))
    assert sorted(rules.names(loras)) == ["good.safetensors", "inner.safetensors", "sub/also.safetensors"]
    for name in ("good.safetensors", "sub/also.safetensors", "inner.safetensors"):
        rules.check([{"path": name}])
    for name in ("link/secret.safetensors", "link//secret.safetensors", "pw.safetensors"):
        with pytest.raises(HttpError) as err:
            rules.check([{"path": name}])
        assert err.value.status == 422 and "not in this server's LoRA folder" in str(err.value.detail), name
