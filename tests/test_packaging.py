"""What ComfyUI-Manager installs (requirements.txt) and what pip installs (pyproject.toml) are the same list."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_requirements_txt_equals_pyproject_dependencies():
    text = (ROOT / "pyproject.toml").read_text()
    block = re.search(r"^dependencies = \[(.*?)\]", text, re.S | re.M).group(1)
    pyproject = re.findall(r'"([^"]+)"', block)
    requirements = [ln.strip() for ln in (ROOT / "requirements.txt").read_text().splitlines()
                    if ln.strip() and not ln.startswith("#")]
    assert pyproject == requirements
    assert not any(re.match(r"torch(vision|audio)?\b", r) for r in requirements)  # ComfyUI owns torch
    assert all(">=" in r and "==" not in r for r in requirements)  # floors, never pins
