"""Model files the OS refuses to read (permissions) get the pack's error naming the file and the fix.

The tests run as root here, and root reads every file whatever its mode: the checks run in a child process that is
root without the capabilities that override file permissions (``setpriv``), so the OS refuses a mode-000 file to it
as it does to an ordinary user. The child first checks that the OS does refuse (``open`` raises PermissionError):
that is the outside truth the pack's answer is held to."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

CHILD = r"""
import json, sys
from sdxl_controlnet_img2img.pipeline.errors import ModelLoadError
from sdxl_controlnet_img2img.pipeline.local.models.loading import LoadOptions, build_pipeline, check_sources

cases = json.loads(sys.argv[1])
got = []
for base, cn, locked in cases:
    try:
        open(locked, "rb").close()
        got.append({"os": "read it"})
        continue
    except PermissionError:
        pass
    row = {"os": "refused"}
    for name, call in (("check_sources", check_sources), ("build_pipeline", build_pipeline)):
        try:
            call(base, cn, LoadOptions(device="cpu", dtype="bf16"))
            row[name] = "loaded"
        except ModelLoadError as exc:
            row[name] = "ModelLoadError: " + str(exc)
        except Exception as exc:
            row[name] = f"{type(exc).__name__}: {exc}"
    got.append(row)
print("RESULT " + json.dumps(got))
"""


def _without_override() -> list[str]:
    """The command prefix that runs a child whose file reads obey permissions (nothing when not root)."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv: no way to make a file unreadable")
    caps = "-dac_override,-dac_read_search"
    return [setpriv, f"--bounding-set={caps}", f"--inh-caps={caps}", "--"]


@pytest.mark.skipif(not hasattr(os, "geteuid"), reason="POSIX permissions")
def test_unreadable_model_files_are_named_with_the_fix(tiny_models, tmp_path):
    base, cn = Path(tiny_models["checkpoint"]), Path(tiny_models["controlnet"])
    weights = tmp_path / "cn-weights" / "diffusion_pytorch_model.safetensors"  # a ControlNet folder's weights
    shutil.copytree(cn, weights.parent)
    config = tmp_path / "cn-config" / "config.json"  # its config
    shutil.copytree(cn, config.parent)
    single = tmp_path / "controlnet.safetensors"  # a ControlNet file
    shutil.copyfile(cn / "diffusion_pytorch_model.safetensors", single)
    index = tmp_path / "base" / "model_index.json"  # a base folder's model index
    shutil.copytree(base, index.parent)
    for locked in (weights, config, single, index):
        locked.chmod(0)
    cases = [(str(base), str(weights.parent), str(weights)), (str(base), str(config.parent), str(config)),
             (str(base), str(single), str(single)), (str(index.parent), str(cn), str(index))]
    p = subprocess.run([*_without_override(), sys.executable, "-c", CHILD, json.dumps(cases)], capture_output=True,
                       text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    got = json.loads([ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")][-1][7:])
    for (_base, _cn, locked), row in zip(cases, got):
        assert row["os"] == "refused", (locked, row)  # the OS does refuse the file to the child
        label = "checkpoint" if locked == str(index) else "controlnet"
        for name in ("check_sources", "build_pipeline"):
            assert row[name].startswith(f"ModelLoadError: {label}: {locked} cannot be read (Permission denied). "
                                        f"Check its permissions"), (name, row[name])
