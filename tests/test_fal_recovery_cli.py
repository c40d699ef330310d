"""Recovering paid fal results from where users run the pack, and the CLI's fal refusals (issue 25 items 1, 2, 4; a
new-user review of issue 30: a file given as the request log folder, a request log damaged by a full disk).

- A ComfyUI install (ComfyUI-Manager clones the pack into ``custom_nodes/<folder with dashes>`` and installs only its
  requirements, so ``sdxl_controlnet_img2img`` is not importable): ``python custom_nodes/<folder> fal-pending`` lists
  and fetches pending requests with ComfyUI's request log and key file, against the fal-protocol test server.
- A plain (non-editable) pip install: ``python -m sdxl_controlnet_img2img fal-pending`` does the same.
Both run in a child interpreter started with ``-S`` and the dependencies' site-packages on ``PYTHONPATH``: the
editable install of this checkout (a ``.pth`` file) is then invisible, as it is to a ComfyUI user.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent / "helpers"))
import fal_server  # noqa: E402

fal_server.configure_environment()

from fal_server import TEST_KEY, fal, fal_test_server, fast_settings  # noqa: E402,F401
from PIL import Image, ImageOps  # noqa: E402

from sdxl_controlnet_img2img.pipeline import request_log  # noqa: E402
from sdxl_controlnet_img2img.pipeline.cli import main  # noqa: E402
from sdxl_controlnet_img2img.pipeline.fal.client import run_remote  # noqa: E402
from sdxl_controlnet_img2img.pipeline.fal.errors import FalTimeout  # noqa: E402
from sdxl_controlnet_img2img.pipeline.request import GenerationRequest  # noqa: E402

PACK = Path(__file__).resolve().parent.parent
FOLDER = "comfyui-sdxl-controlnet-img2img"  # the folder name a ComfyUI-Manager install uses


def _request_file(tmp_path, **fields):
    rng = np.random.default_rng(5)
    Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(tmp_path / "init.png")
    data = {"prompt": "a cat", "image_url": "init.png", "control_image_url": "init.png", "seed": 11, **fields}
    p = tmp_path / "req.json"
    p.write_text(json.dumps(data))
    return p


# ---- item 2: refusals before the billing line ---------------------------------------------------------------------

@pytest.mark.parametrize("fields, named, not_named", [
    ({"local_scheduler": "euler_ancestral"}, "local_scheduler", "Canny"),
    ({"local_control_end": 0.5}, "local_control_end", "Canny"),
    ({"apply_canny": False}, "apply_canny", "sampler"),
    ({"control_image_url": "missing.png"}, "missing.png", "bills"),
    # the value as the request file writes it (a list), in a plain sentence
    ({"local_timesteps": [999, 749, 499, 249], "num_inference_steps": 4},
     "local_timesteps: [999, 749, 499, 249] is a local-only setting",
     "(999,"),
])
def test_remote_refusals_come_before_the_billing_line(fal, tmp_path, capsys, fields, named, not_named):
    req = _request_file(tmp_path, **fields)
    assert main(["generate", "--remote", "fal", "--request", str(req), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "bills" not in err and "error:" in err and named in err and not_named not in err
    assert fal.submissions == 0


# ---- item 4: a request log folder that does not exist ------------------------------------------------------------

def test_fal_pending_on_a_missing_folder_or_log_says_so(tmp_path, capsys):
    assert main(["fal-pending", "--request-log-dir", str(tmp_path / "typo")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and str(tmp_path / "typo") in err and "no pending" not in err
    assert main(["fal-pending", "--request-log-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no request log" in err and "fal_requests.jsonl" in err and "no pending" not in err
    (tmp_path / "a-file").write_text("not a folder")
    assert main(["fal-pending", "--request-log-dir", str(tmp_path / "a-file")]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'a-file'} is a file, not a folder" in err and "does not exist" not in err


# ---- a request log damaged by a full disk: no paid id hidden behind "no pending" -----------------------------------

def _cut_last_line(log: Path, keep) -> str:
    """Cut the log's last line as a full disk leaves it (no newline); ``keep(line)`` is how many characters stay."""
    lines = log.read_text().splitlines()
    lines[-1] = lines[-1][:keep(lines[-1])]
    log.write_text("\n".join(lines))
    return lines[-1]


def test_an_id_on_a_cut_off_line_is_listed_fetched_and_the_damage_named(fal, tmp_path, capsys):
    fal.reset(run_s=0.8)
    log_dir = tmp_path / "log"
    (a, a_img), (b, b_img) = _pending_ids(log_dir, 2)
    log = request_log.log_path(log_dir)
    _cut_last_line(log, lambda line: line.index(b) + len(b) + 12)  # the id whole, the rest of the record lost
    assert main(["fal-pending", "--request-log-dir", str(log_dir)]) == 0
    out, err = capsys.readouterr()
    assert a in out and b in out
    assert f"{log}, line 2" in err and b in err
    got = tmp_path / "got"
    assert main(["fal-pending", "--request-log-dir", str(log_dir), "--fetch", str(got)]) == 0
    for rid, img in ((a, a_img), (b, b_img)):
        assert np.array_equal(np.asarray(Image.open(got / rid / "image_000.png")), np.asarray(img))
    assert request_log.pending(log_dir) == [] and fal.submissions == 2
    for line in log.read_text().splitlines()[2:]:  # records written after the cut line start on their own line
        assert json.loads(line)["event"] == "completed"


def test_a_line_cut_inside_its_id_is_not_passed_off_as_nothing_pending(fal, tmp_path, capsys):
    fal.reset(run_s=0.8)
    log_dir = tmp_path / "log"
    (b, _img), = _pending_ids(log_dir, 1)
    log = request_log.log_path(log_dir)
    _cut_last_line(log, lambda line: line.index(b) + 13)
    assert main(["fal-pending", "--request-log-dir", str(log_dir)]) == 2
    err = capsys.readouterr().err
    assert f"{log}, line 1 could not be read" in err and b[:13] in err  # the file, the line, the id's start
    assert "no pending fal requests in" not in err and "damaged" in err


# ---- item 1: the recovery commands from a ComfyUI install and from a plain pip install ------------------------------

def _bare_python_env(extra_path: list[Path] = ()) -> dict:
    """The environment of a child ``python -S`` that sees the dependencies but not this checkout's editable install."""
    paths = [str(p) for p in extra_path] + site.getsitepackages()
    env = {k: v for k, v in os.environ.items() if k not in ("FAL_KEY", "FAL_KEY_ID", "FAL_KEY_SECRET", "PYTHONPATH")}
    env["PYTHONPATH"] = os.pathsep.join(paths)
    probe = subprocess.run([sys.executable, "-S", "-c", "import sdxl_controlnet_img2img"], env=env, cwd="/",
                           capture_output=True, text=True, timeout=120)
    if not extra_path:
        assert probe.returncode != 0, "the child interpreter must not see the editable install"
    return env


def _pending_ids(log_dir: Path, n: int) -> list[tuple[str, Image.Image]]:
    out = []
    for seed in range(n):
        rng = np.random.default_rng(seed)
        init = Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8))
        req = GenerationRequest.from_dict({"prompt": f"lost {seed}", "image_url": init, "control_image_url": init,
                                           "seed": seed})
        with pytest.raises(FalTimeout) as err:
            run_remote(req, timeout_s=0.3, request_log_dir=log_dir, settings=fast_settings())
        out.append((err.value.request_id, ImageOps.invert(init)))
    return out


def _copy_pack(dest: Path) -> Path:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    dest.mkdir(parents=True)
    for name in ("__init__.py", "__main__.py", "requirements.txt"):
        shutil.copy2(PACK / name, dest / name)
    for name in ("pipeline", "nodes"):
        shutil.copytree(PACK / name, dest / name, ignore=ignore)
    return dest


def test_comfyui_users_run_the_pack_folder_to_list_and_fetch_pending_requests(fal, tmp_path):
    fal.reset(run_s=0.8)
    comfy = tmp_path / "ComfyUI"
    _copy_pack(comfy / "custom_nodes" / FOLDER)
    user = comfy / "user" / "sdxl_controlnet_img2img"  # where the fal node keeps its request log and key file
    pending = _pending_ids(user, 2)
    (user / "fal_key.txt").write_text(TEST_KEY + "\n")  # no FAL_KEY in the child's environment: the key file
    env = _bare_python_env()
    command = [sys.executable, "-S", f"custom_nodes/{FOLDER}"]

    run = subprocess.run(command + ["fal-pending"], cwd=comfy, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "Traceback" not in run.stderr and str(user) in run.stderr
    for rid, _img in pending:
        assert rid in run.stdout

    got = tmp_path / "got"
    run = subprocess.run(command + ["fal-pending", "--fetch", str(got)], cwd=comfy, env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    for rid, img in pending:
        assert np.array_equal(np.asarray(Image.open(got / rid / "image_000.png")), np.asarray(img))
    assert request_log.pending(user) == [] and fal.submissions == 2  # fetched, nothing paid again
    assert TEST_KEY not in run.stdout + run.stderr

    # the command the pack names in its messages is the one that works from this install
    run = subprocess.run(command + ["fal-fetch", "--help"], cwd=comfy, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0 and f"usage: python custom_nodes/{FOLDER} fal-fetch" in run.stdout


def test_a_plain_pip_install_lists_and_fetches_pending_requests(fal, tmp_path):
    fal.reset(run_s=0.8)
    src = _copy_pack(tmp_path / "src")  # what the wheel is built from
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(PACK / name, src / name)
    for name in ("web", "workflows"):
        shutil.copytree(PACK / name, src / name)
    target = tmp_path / "site"
    build = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                            "--quiet", "--target", str(target), str(src)], capture_output=True, text=True,
                           timeout=600)
    assert build.returncode == 0, build.stderr
    assert not (target / "sdxl_controlnet_img2img").is_symlink()
    log_dir = tmp_path / "requests"
    pending = _pending_ids(log_dir, 1)
    env = _bare_python_env([target])
    env["FAL_KEY"] = TEST_KEY
    command = [sys.executable, "-S", "-m", "sdxl_controlnet_img2img"]
    run = subprocess.run(command + ["fal-pending", "--request-log-dir", str(log_dir), "--fetch", str(tmp_path / "got")],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    rid, img = pending[0]
    assert rid in run.stdout
    assert np.array_equal(np.asarray(Image.open(tmp_path / "got" / rid / "image_000.png")), np.asarray(img))
    assert request_log.pending(log_dir) == [] and fal.submissions == 1
