"""scripts/run_example.sh installs only what running needs; the test setup (scripts/test.sh, CI) keeps its test tools.

The scripts run for real (bash) in a copy of the repository whose .venv holds stand-ins for python and pip that
record how they were called: pip "installs" by writing down what it was asked for, python answers the scripts'
import checks from that."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

FAKE_PIP = """#!/usr/bin/env bash
echo "pip $*" >> "$(dirname "$0")/../calls.log"
for a in "$@"; do case "$a" in .|.\\[*) echo "$a" > "$(dirname "$0")/../installed";; esac; done
"""
# python -c "import ..." succeeds for torch, and for the pack (and pytest) once pip installed them
FAKE_PYTHON = """#!/usr/bin/env bash
venv="$(dirname "$0")/.."
echo "python $*" >> "$venv/calls.log"
if [ "$1" = "-c" ]; then
  case "$2" in *torch*) exit 0;; esac
  [ -f "$venv/installed" ] || exit 1
  case "$2" in *pytest*) grep -q test "$venv/installed" || exit 1;; esac
  exit 0
fi
exit 0
"""


@pytest.fixture
def repo(tmp_path):
    for rel in ("scripts/setup_venv.sh", "scripts/run_example.sh", "pyproject.toml", "workflows/requests/default.json"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, tmp_path / rel)
    bin_dir = tmp_path / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    for name, text in (("pip", FAKE_PIP), ("python", FAKE_PYTHON)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return tmp_path


def _run(repo, *command):
    done = subprocess.run(["bash", *command], cwd=repo, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    log = repo / ".venv" / "calls.log"
    calls = log.read_text().splitlines() if log.exists() else []
    log.unlink(missing_ok=True)
    return calls


def _installs(calls):
    return [c for c in calls if c.startswith("pip install")]


def test_run_example_installs_only_what_running_needs(repo):
    calls = _run(repo, "scripts/run_example.sh")
    assert _installs(calls) == ["pip install --progress-bar on -e ."], calls
    assert not any("pytest" in c or "playwright" in c or "[test" in c for c in calls), calls
    # and then runs the example: tiny models, the default request
    assert "python -m sdxl_controlnet_img2img make-tiny-models --out .tiny-models" in calls
    assert any(c.startswith("python -m sdxl_controlnet_img2img generate --request workflows/requests/default.json "
                            "--checkpoint .tiny-models/tiny-sdxl --controlnet .tiny-models/tiny-controlnet-canny")
               for c in calls), calls
    assert _installs(_run(repo, "scripts/run_example.sh")) == []  # set up once


def test_the_test_setup_installs_the_test_tools(repo):
    assert _installs(_run(repo, "scripts/setup_venv.sh")) == ["pip install --progress-bar on -e .[test,browser,redis]"]
    assert _installs(_run(repo, "scripts/setup_venv.sh")) == []
    assert _installs(_run(repo, "scripts/setup_venv.sh", "run")) == []  # a test setup can run too


def test_a_run_setup_then_a_test_setup_adds_the_test_tools(repo):
    assert _installs(_run(repo, "scripts/setup_venv.sh", "run")) == ["pip install --progress-bar on -e ."]
    assert _installs(_run(repo, "scripts/setup_venv.sh")) == ["pip install --progress-bar on -e .[test,browser,redis]"]
