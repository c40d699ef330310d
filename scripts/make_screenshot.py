"""Remake the pictures of the shipped workflows from the real ComfyUI frontend.

- ``docs/workflow-screenshot.png``: the README's picture, the example workflow (``workflows/sdxl_controlnet_img2img.json``)
  loaded in ComfyUI's page at 1600x1000.
- ``workflows/<name>.jpg`` beside each template (every top-level UI workflow): its thumbnail in ComfyUI's Templates
  browser, which takes a custom node's thumbnails from a same-named .jpg (docs.comfy.org/custom-nodes/workflow_templates).
  The graph alone (the page in focus mode), 512x512.

It starts ComfyUI with the pack as the tests do (``tests/helpers/comfyui_harness.py``: ``COMFYUI_DIR``, ``COMFYUI_PYTHON``, a
temporary base folder, no models: the workflows show the model names they ship with) and drives it with Playwright's
Python package and Debian's Chromium (``/usr/bin/chromium`` or ``SDXLCN_CHROMIUM``; no downloaded browser)::

    eval "$(cat .comfyui-env)"; export COMFYUI_DIR COMFYUI_PYTHON
    .venv/bin/python scripts/make_screenshot.py            # or --only readme / --only thumbnails

Each picture records which workflow it shows (:func:`drawn_digest`, in the PNG's text or the JPEG's comment), so
``tests/test_template_media.py`` says which ones a changed workflow left out of date.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "workflows" / "sdxl_controlnet_img2img.json"
README_SHOT = ROOT / "docs" / "workflow-screenshot.png"
THUMB_SIZE = 512
CHROMIUM = os.environ.get("SDXLCN_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
RECORD_KEY = "sdxlcn"  # the PNG text key / the JPEG comment's JSON holds {"workflow", "digest", "comfyui", "frontend"}


def templates() -> list[Path]:
    """The workflows ComfyUI lists as the pack's templates: every top-level UI-format workflow."""
    return sorted(p for p in (ROOT / "workflows").glob("*.json") if "nodes" in json.loads(p.read_text()))


def thumbnail_path(workflow: Path) -> Path:
    return workflow.with_suffix(".jpg")


def drawn_digest(workflow: Path) -> str:
    """sha256 of what the page draws from a workflow file: all of it but its ``models`` list (the Missing Models
    dialog's data, never drawn)."""
    data = {k: v for k, v in json.loads(workflow.read_text()).items() if k != "models"}
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def recorded(picture: Path) -> dict:
    """What :func:`main` wrote into a picture about the workflow it shows ({} when nothing)."""
    from PIL import Image

    with Image.open(picture) as im:
        raw = im.info.get(RECORD_KEY) if im.format == "PNG" else im.info.get("comment", b"").decode("utf-8", "replace")
    try:
        data = json.loads(raw or "{}")
    except ValueError:
        return {}
    return data.get(RECORD_KEY, data) if isinstance(data, dict) else {}


def _record(workflow: Path, versions: dict) -> dict:
    return {"workflow": workflow.relative_to(ROOT).as_posix(), "digest": drawn_digest(workflow), **versions}


FIT = """(zoom) => {
    const ns = window.app.graph.nodes; if (!ns.length) return;
    const title = window.LiteGraph.NODE_TITLE_HEIGHT;
    const x0 = Math.min(...ns.map(n => n.pos[0])), y0 = Math.min(...ns.map(n => n.pos[1] - title));
    const x1 = Math.max(...ns.map(n => n.pos[0] + n.size[0])), y1 = Math.max(...ns.map(n => n.pos[1] + n.size[1]));
    window.app.canvas.ds.fitToBounds([x0 - 20, y0 - 20, x1 - x0 + 40, y1 - y0 + 80], {zoom});
    window.app.canvas.setDirty(true, true);
}"""
# the LoadImage node's preview of the example picture has arrived (it is part of what the picture shows)
PREVIEWS_LOADED = """() => window.app.graph.nodes.filter(n => n.type === 'LoadImage')
    .every(n => n.imgs && n.imgs.length && n.imgs.every(i => i.complete && i.naturalWidth > 0))"""
# a thumbnail's view: a square as tall as the graph (or half as wide, when wider), centred on the pack's sampler
# (fal or local) as far as the graph allows, filling the canvas; returns the canvas's box on the page
THUMB_VIEW = """() => {
    const ns = window.app.graph.nodes, ds = window.app.canvas.ds, title = window.LiteGraph.NODE_TITLE_HEIGHT;
    const r = window.app.canvas.canvas.getBoundingClientRect(), m = 30;
    const x0 = Math.min(...ns.map(n => n.pos[0])), y0 = Math.min(...ns.map(n => n.pos[1] - title));
    const x1 = Math.max(...ns.map(n => n.pos[0] + n.size[0])), y1 = Math.max(...ns.map(n => n.pos[1] + n.size[1]));
    const side = Math.max(y1 - y0, (x1 - x0) / 2) + 2 * m;
    const s = ns.find(n => /^SDXLCN(Fal)?Img2Img$/.test(n.type)) || ns[0];
    const want = s.pos[0] + s.size[0] / 2;
    const cx = Math.min(Math.max(want, x0 - m + side / 2), Math.max(x0 - m + side / 2, x1 + m - side / 2));
    const cy = (y0 + y1) / 2;
    ds.scale = Math.min(r.width, r.height) / side;
    ds.offset[0] = r.width / 2 / ds.scale - cx;
    ds.offset[1] = r.height / 2 / ds.scale - cy;
    window.app.canvas.setDirty(true, true);
    return {x: r.left, y: r.top, width: Math.min(r.width, r.height), height: Math.min(r.width, r.height)};
}"""


class Shooter:
    """One ComfyUI page per picture size, with the workflow loaded and fitted."""

    def __init__(self, browser, url: str):
        self.browser, self.url = browser, url

    def open(self, width: int, height: int, focus: bool = False):
        page = self.browser.new_context(viewport={"width": width, "height": height}).new_page()
        page.goto(self.url)
        page.wait_for_function("() => !!(window.app && window.app.graph && window.app.canvas && window.LiteGraph"
                               " && window.LiteGraph.registered_node_types['SDXLCNImg2Img'])", timeout=120_000)
        if focus:  # the graph alone: no menus, sidebars or toolbars over it (focus mode keeps a "Show Menu" button)
            page.evaluate("() => window.app.extensionManager.command.execute('Workspace.ToggleFocusMode')")
            page.add_style_tag(content='button[aria-label="Show Menu"] { visibility: hidden !important; }')
        return page

    @staticmethod
    def show(page, workflow: Path, zoom: float):
        page.evaluate("async ([wf, name]) => { await window.app.loadGraphData(wf, true, true, name); }",
                      [json.loads(workflow.read_text()), workflow.stem])  # the tab shows the file's name
        page.evaluate(FIT, zoom)
        page.wait_for_function(PREVIEWS_LOADED, timeout=60_000)
        page.wait_for_timeout(500)  # a frame or two for the canvas to paint the fitted view

    @staticmethod
    def versions(page) -> dict:
        return page.evaluate("""async () => ({
            comfyui: (await (await fetch('/api/system_stats')).json()).system.comfyui_version,
            frontend: window.__COMFYUI_FRONTEND_VERSION__ || ''})""")


def readme_shot(shooter: Shooter, out: Path = README_SHOT) -> Path:
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    page = shooter.open(1600, 1000)
    shooter.show(page, EXAMPLE, zoom=0.9)
    png = page.screenshot()
    info = PngInfo()
    info.add_text(RECORD_KEY, json.dumps(_record(EXAMPLE, shooter.versions(page))))
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.open(io.BytesIO(png)).save(out, pnginfo=info, optimize=True)
    page.context.close()
    return out


def thumbnails(shooter: Shooter, workflows: list[Path]) -> list[Path]:
    from PIL import Image

    page = shooter.open(2 * THUMB_SIZE, 2 * THUMB_SIZE, focus=True)  # drawn at twice the size, then scaled down
    versions = shooter.versions(page)
    written = []
    for wf in workflows:
        shooter.show(page, wf, zoom=0.95)
        clip = page.evaluate(THUMB_VIEW)
        page.wait_for_timeout(500)  # the canvas and its text boxes follow the new view in a frame or two
        shot = page.screenshot(clip=clip)
        im = Image.open(io.BytesIO(shot)).convert("RGB").resize((THUMB_SIZE, THUMB_SIZE), Image.LANCZOS)
        out = thumbnail_path(wf)
        comment = json.dumps({RECORD_KEY: _record(wf, versions)}).encode()
        im.save(out, "JPEG", quality=88, optimize=True, comment=comment)
        written.append(out)
    page.context.close()
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=("readme", "thumbnails"), help="make only these pictures")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT / "tests" / "helpers"))
    from comfyui_harness import SKIP_REASON, comfyui_dir, running_comfyui

    if comfyui_dir() is None:
        print(f"error: {SKIP_REASON}", file=sys.stderr)
        return 2
    if not Path(CHROMIUM).is_file():
        print(f"error: no Chromium at {CHROMIUM} (apt install chromium, or set SDXLCN_CHROMIUM)", file=sys.stderr)
        return 2
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory(prefix="sdxlcn-screenshot-") as tmp, contextlib.ExitStack() as stack:
        server = stack.enter_context(running_comfyui(Path(tmp)))
        # the first-run Templates dialog and the Missing Models dialog (the models are absent here) would cover the
        # graph; the minimap would sit on it
        for setting, value in (("Comfy.TutorialCompleted", True), ("Comfy.Workflow.ShowMissingModelsWarning", False),
                               ("Comfy.Minimap.Visible", False), ("Comfy.Graph.CanvasInfo", False),
                               ("Comfy.Graph.CanvasMenu", False)):
            status, body = server.post(f"/api/settings/{setting}", value)
            if status != 200:
                raise RuntimeError(f"setting {setting}: HTTP {status} {body}")
        playwright = stack.enter_context(sync_playwright())
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        stack.callback(browser.close)
        shooter = Shooter(browser, server.url)
        made = []
        if args.only in (None, "readme"):
            made.append(readme_shot(shooter))
        if args.only in (None, "thumbnails"):
            made += thumbnails(shooter, templates())
    for path in made:
        print(path.relative_to(ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
