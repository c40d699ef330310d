"""Shipped workflows bring their models: loaded in the real ComfyUI frontend (Playwright, Debian's Chromium) on a
server that lacks them, each shows ComfyUI's Missing Models dialog listing every absent file as "folder / name" with
its download link, and not a file the server has.

Skipped as tests/test_browser.py is (COMFYUI_DIR, the playwright package, /usr/bin/chromium or SDXLCN_CHROMIUM)."""

from __future__ import annotations

import json

import pytest

from comfyui_harness import ROOT, running_comfyui
from test_browser import CHROMIUM, CHROMIUM_ARGS, _skip_reason  # one browser set-up for the browser tests

pytestmark = pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or "")

SHIPPED = sorted((ROOT / "workflows").glob("*.json"))  # what ComfyUI lists in its Templates browser
PRESENT = ("checkpoints", "sd_xl_base_1.0.safetensors")  # the one model this server has


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    files = tmp_path_factory.mktemp("present")
    (files / PRESENT[1]).write_bytes(b"\0" * 16)  # ComfyUI lists model files by name; nothing reads it here
    with running_comfyui(tmp_path_factory.mktemp("comfyui-missing-models"),
                         {PRESENT[0]: {PRESENT[1]: files / PRESENT[1]}}) as server:
        status, body = server.post("/api/settings/Comfy.TutorialCompleted", True)  # no first-run Templates dialog
        assert status == 200, body
        yield server


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(comfy, browser):
    ctx = browser.new_context(viewport={"width": 1400, "height": 1000})
    tab = ctx.new_page()
    try:
        tab.goto(comfy.url)
        tab.wait_for_function("() => !!(window.app && window.app.graph && window.LiteGraph"
                              " && window.LiteGraph.registered_node_types['SDXLCNLoader'])", timeout=120_000)
        yield tab
    finally:
        ctx.close()


ROWS = """() => {
    const dialog = [...document.querySelectorAll('.p-dialog')].find(d => d.querySelector('.comfy-missing-models'));
    if (!dialog) return null;
    return {title: dialog.innerText.split('\\n')[0],
            rows: [...dialog.querySelectorAll('.comfy-missing-models li')].map(li => ({
                label: li.querySelector('span[title]')?.innerText,
                url: li.querySelector('button[title]')?.getAttribute('title'),
                text: li.innerText}))};
}"""


# the ComfyUI model folder each model-naming widget reads (ComfyUI's loaders and ours)
FOLDERS = {"checkpoint": "checkpoints", "ckpt_name": "checkpoints", "controlnet": "controlnet",
           "control_net_name": "controlnet", "lora_name": "loras", "vae": "vae"}
NAMED = """(names) => window.app.graph.nodes.flatMap(n => (n.widgets || [])
    .filter(w => names.includes(w.name) && w.value && w.value !== 'none').map(w => [w.name, w.value]))"""


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_missing_models_dialog_lists_each_absent_model_with_its_folder(page, path):
    page.evaluate("async (wf) => { await window.app.loadGraphData(wf); }", json.loads(path.read_text()))
    # what the loaded nodes name, as the page holds it: a file, or a diffusers folder (listed by its weights file)
    named = {(FOLDERS[w], value) for w, value in page.evaluate(NAMED, list(FOLDERS))} - {PRESENT}
    if not named:  # the fal workflow names no model
        page.wait_for_timeout(500)  # the dialog would open within the load; give it a frame to show
        assert page.evaluate(ROWS) is None
        return
    page.wait_for_function(f"() => ({ROWS})()?.rows.length > 0", timeout=30_000)
    dialog = page.evaluate(ROWS)
    assert dialog["title"] == "Missing Models", dialog
    labels = [r["label"] for r in dialog["rows"]]
    for folder, value in named:
        assert sum(label == f"{folder} / {value}" or label.startswith(f"{folder} / {value}/") for label in labels) == 1, \
            (folder, value, labels)
    assert len(labels) == len(named), labels  # nothing else, and not the model the server has
    for row in dialog["rows"]:
        # a direct download from Hugging Face of the file the row names; a row the frontend refuses (source,
        # suffix, unknown folder) shows its reason instead of a working Download
        assert row["url"].startswith("https://huggingface.co/") and "/resolve/" in row["url"], row
        assert not any(word in row["text"] for word in ("not allowed", "Only allowed", "Invalid directory")), row
