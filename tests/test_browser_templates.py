"""The pack's templates in ComfyUI's Templates browser (issue 35 item 3), in the real frontend (Playwright, Debian's
Chromium): under Extensions → the pack's folder, each shipped workflow's card shows its title and one-line
description from web/templates.json (the frontend alone shows the file name twice) and its own thumbnail
(workflows/<name>.jpg, which ComfyUI serves beside the workflow; without it the card shows a generic picture).

Skipped as tests/test_browser.py is (COMFYUI_DIR, the playwright package, /usr/bin/chromium or SDXLCN_CHROMIUM)."""

from __future__ import annotations

import contextlib
import json
import urllib.request

import pytest

from comfyui_harness import PACK_FOLDER, ROOT, running_comfyui
from test_browser import CHROMIUM, CHROMIUM_ARGS, _skip_reason

pytestmark = pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or "")

INDEX = json.loads((ROOT / "web" / "templates.json").read_text())
LABELS = {t["name"]: t for category in INDEX for t in category["templates"]}

CARDS = """(names) => names.map(name => {
    const card = document.querySelector(`[data-testid="template-workflow-${name}"]`);
    if (!card) return null;
    const img = card.querySelector('img');
    return {name, title: card.querySelector('h3')?.textContent.trim(), text: card.querySelector('p')?.textContent.trim(),
            src: img?.src ?? '', settled: !!img && img.complete && /^blob:|default-template/.test(img.src),
            loaded: !!img && img.complete && img.naturalWidth > 0, size: img ? [img.naturalWidth, img.naturalHeight] : null};
})"""


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    with running_comfyui(tmp_path_factory.mktemp("comfyui-templates")) as server:
        status, body = server.post("/api/settings/Comfy.TutorialCompleted", True)  # no first-run Templates dialog
        assert status == 200, body
        yield server


def test_templates_show_titles_descriptions_and_their_thumbnails(comfy):
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import sync_playwright

    listed = comfy.get("/api/workflow_templates")[PACK_FOLDER]
    assert sorted(listed) == sorted(LABELS), listed
    for name in listed:  # ComfyUI serves each thumbnail beside its workflow
        with urllib.request.urlopen(f"{comfy.url}/api/workflow_templates/{PACK_FOLDER}/{name}.jpg", timeout=10) as r:
            assert r.status == 200 and r.headers["Content-Type"] == "image/jpeg", name

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            fetched = {}  # thumbnail URL -> HTTP status (the frontend fetches each, then shows it from a blob: URL)
            page.on("response", lambda r: fetched.__setitem__(r.url.split("?")[0], r.status) if r.url.split("?")[0]
                    .endswith(".jpg") else None)
            page.goto(comfy.url)
            page.wait_for_function("() => !!(window.app && window.app.graph && window.app.extensionManager)",
                                   timeout=120_000)
            page.evaluate("() => window.app.extensionManager.command.execute('Comfy.BrowseTemplates')")
            page.get_by_text(PACK_FOLDER, exact=True).first.click()  # Extensions → the pack's folder
            names = sorted(LABELS)
            # the cards are built and their pictures shown (the frontend fetches each thumbnail and shows it from a blob:
            # URL, or its generic picture when that fails); then our titles come within a frame or two
            page.wait_for_function(f"(names) => ({CARDS})(names).every(c => c && c.settled)", arg=names, timeout=60_000)
            with contextlib.suppress(PlaywrightTimeout):
                page.wait_for_function(f"(names) => ({CARDS})(names).every(c => c.title !== c.name)", arg=names,
                                       timeout=5_000)
            cards = page.evaluate(CARDS, names)
            page.screenshot(path=str(_artifact("templates_browser.png")))
        finally:
            browser.close()
    for card in cards:
        label = LABELS[card["name"]]
        assert card["title"] == label["title"] and card["text"] == label["description"], card
        assert card["loaded"], card
        assert fetched.get(f"{comfy.url}/api/workflow_templates/{PACK_FOLDER}/{card['name']}.jpg") == 200, fetched
        assert card["size"] == [512, 512] and "default-template" not in card["src"], card  # ours, not the generic one


def _artifact(name: str):
    out = ROOT / "test-artifacts" / "browser"
    out.mkdir(parents=True, exist_ok=True)
    return out / name
