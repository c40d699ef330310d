"""The shipped UI workflows carry ComfyUI's `models` list ({name, url, directory}) for every model their nodes name,
in the shape ComfyUI's frontend (1.35, MissingModelsWarning) takes: a direct Hugging Face download (`/resolve/`, not a
`/blob/` page) of a `.safetensors` file, into the model folder the node reads. The browser shows them:
tests/test_browser_missing_models.py."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from test_workflows import API_FILES, node_spec

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = sorted((ROOT / "workflows").glob("*.json"))  # the templates (tiny/ names models make-tiny-models writes)

# the ComfyUI model folder each model-naming input reads: ComfyUI's CheckpointLoaderSimple (checkpoints), LoraLoader
# (loras), ControlNetLoader (controlnet), and ours, which read the same folders (a single-file base: checkpoints)
FOLDERS = {"checkpoint": "checkpoints", "ckpt_name": "checkpoints", "controlnet": "controlnet",
           "control_net_name": "controlnet", "lora_name": "loras", "vae": "vae"}
# the frontend offers a Download only from these sources and for these suffixes (others show an error in the row)
RESOLVE = re.compile(r"^https://huggingface\.co/([\w.-]+/[\w.-]+)/resolve/main/(?:[\w.-]+/)*([\w.-]+\.safetensors)$")


def named_models(wf) -> set[tuple[str, str]]:
    """(folder, value) of every model-naming widget in a UI workflow (widgets_values follow INPUT_TYPES order)."""
    named = set()
    for node in wf["nodes"]:
        values = list(node["widgets_values"])
        for name, _ in node_spec(node["type"])["widgets"]:
            value = values.pop(0)
            if name == "seed":
                values.pop(0)  # the control_after_generate value
            if name in FOLDERS and value not in ("", "none"):
                named.add((FOLDERS[name], value))
    return named


def covers(entry, folder, value) -> bool:
    """The entry is the file, or a diffusers folder's weights file (the frontend lists files, not folders)."""
    return entry["directory"] == folder and (entry["name"] == value or entry["name"].startswith(value + "/"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_every_model_a_node_names_is_listed_with_a_direct_download(path):
    wf = json.loads(path.read_text())
    models, named = wf.get("models", []), named_models(wf)
    for m in models:
        assert set(m) == {"name", "url", "directory"}, m
        match = RESOLVE.match(m["url"])
        assert match, f"{path.name}: not a direct Hugging Face download of a .safetensors file: {m['url']}"
        # the URL fetches the file the entry names (or its fp16 variant, saved under the plain name)
        base = m["name"].rsplit("/", 1)[-1]
        assert match.group(2) in (base, base.replace(".safetensors", ".fp16.safetensors")), m
        assert m["name"].endswith(".safetensors") and m["directory"] in FOLDERS.values(), m
    for folder, value in named:
        assert sum(covers(m, folder, value) for m in models) == 1, f"{path.name}: {folder}/{value} is not listed once"
    for m in models:
        assert any(covers(m, *n) for n in named), f"{path.name}: {m['name']} is listed but no node names it"
    assert len({m["url"] for m in models}) == len(models)  # the frontend keeps one entry per URL


def test_the_listed_models_come_from_the_repos_the_readme_names():
    """README's "What to download" table and the lists agree on where the base and the ControlNet come from."""
    readme = (ROOT / "README.md").read_text()
    after = readme[readme.index("**What to download**"):].splitlines()
    start = next(i for i, line in enumerate(after) if line.startswith("|"))
    table = "\n".join(after[start:next(i for i in range(start, len(after)) if not after[i].startswith("|"))])
    entries = {m["name"]: m for p in SHIPPED for m in json.loads(p.read_text()).get("models", [])}
    checked = 0
    for name, m in entries.items():
        rows = [row for row in table.splitlines() if f"`{name.split('/')[0]}`" in row]
        for row in rows:
            assert f"https://huggingface.co/{RESOLVE.match(m['url']).group(1)})" in row, (name, row)
            checked += 1
    assert checked >= 2  # the base and the ControlNet


def test_api_workflows_carry_no_models_list():
    for path in API_FILES:
        wf = json.loads(path.read_text())
        assert all(isinstance(node, dict) and "class_type" in node for node in wf.values()), path.name
