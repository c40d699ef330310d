"""What the browser shows of the shipped workflows is current (issue 35 item 3): the README's screenshot and each
template's thumbnail were made by scripts/make_screenshot.py from the workflow as it is now, and every template has
a title and a one-line description for ComfyUI's Templates browser (web/templates.json). Each picture records the
digest of the workflow it shows; a changed workflow makes its pictures out of date until the script is run again.
How the browser shows them: tests/test_browser_templates.py."""

from __future__ import annotations

import importlib.util
import json

import pytest
from PIL import Image

from comfyui_harness import ROOT

_spec = importlib.util.spec_from_file_location("make_screenshot", ROOT / "scripts" / "make_screenshot.py")
shots = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(shots)

TEMPLATES = shots.templates()
REMAKE = "remake it: scripts/make_screenshot.py (see its docstring)"


def test_the_templates_are_the_top_level_ui_workflows():
    names = sorted(p.stem for p in TEMPLATES)
    assert "sdxl_controlnet_img2img" in names and len(names) >= 5, names
    listed = {p.stem for p in (ROOT / "workflows").glob("*.json")}  # what ComfyUI's Templates browser lists
    assert set(names) == listed, "an API-format workflow at the top level would be listed as a template"


@pytest.mark.parametrize("workflow", TEMPLATES, ids=[p.stem for p in TEMPLATES])
def test_each_template_has_a_current_thumbnail(workflow):
    thumb = shots.thumbnail_path(workflow)
    assert thumb.is_file(), f"{thumb.relative_to(ROOT)} is missing (ComfyUI shows a generic picture); {REMAKE}"
    with Image.open(thumb) as im:
        assert im.format == "JPEG" and im.size == (shots.THUMB_SIZE, shots.THUMB_SIZE), (im.format, im.size)
    made = shots.recorded(thumb)
    assert made.get("workflow") == workflow.relative_to(ROOT).as_posix(), made
    assert made.get("digest") == shots.drawn_digest(workflow), f"{thumb.name} shows an older {workflow.name}; {REMAKE}"


def test_no_thumbnail_without_its_workflow():
    orphans = [p.name for p in (ROOT / "workflows").glob("*.jpg") if not p.with_suffix(".json").is_file()]
    assert not orphans, orphans


def test_the_readme_screenshot_shows_the_shipped_example_workflow():
    assert "docs/workflow-screenshot.png" in (ROOT / "README.md").read_text()
    with Image.open(shots.README_SHOT) as im:
        assert im.format == "PNG" and im.size == (1600, 1000), (im.format, im.size)
    made = shots.recorded(shots.README_SHOT)
    assert made.get("workflow") == "workflows/sdxl_controlnet_img2img.json", made
    assert made.get("digest") == shots.drawn_digest(shots.EXAMPLE), f"the screenshot shows an older workflow; {REMAKE}"
    assert made.get("comfyui") and made.get("frontend"), made  # which ComfyUI drew it


def test_the_digest_follows_what_is_drawn_not_the_models_list(tmp_path):
    wf = json.loads(shots.EXAMPLE.read_text())
    a, b, c = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "c.json"
    a.write_text(json.dumps(wf))
    b.write_text(json.dumps({**wf, "models": []}, indent=1))
    wf["nodes"][0]["widgets_values"] = ["another.png", "image"]
    c.write_text(json.dumps(wf))
    assert shots.drawn_digest(a) == shots.drawn_digest(b) != shots.drawn_digest(c)


def test_each_template_has_a_title_and_a_one_line_description():
    index = json.loads((ROOT / "web" / "templates.json").read_text())
    entries = [t for category in index for t in category["templates"]]
    assert sorted(t["name"] for t in entries) == sorted(p.stem for p in TEMPLATES)
    titles = [t["title"] for t in entries]
    assert len(set(titles)) == len(titles), titles
    for t in entries:
        raw = t["name"].replace("_", " ")
        assert t["title"].strip() and t["title"] not in (t["name"], raw), t
        assert t["description"].strip() and "\n" not in t["description"], t
        # the card shows the title on one line and the description on two, of about 35 characters each at the
        # browser's narrowest cards; longer ones are cut with an ellipsis
        assert len(t["title"]) <= 32 and len(t["description"]) <= 70, (t["title"], t["description"])
        assert t["mediaType"] == "image" and t["mediaSubtype"] == "jpg", t  # the thumbnails are .jpg, as ComfyUI reads
