"""The frontend extension in the real ComfyUI frontend, driven through Debian's Chromium with Playwright.

Skipped unless ``COMFYUI_DIR`` points at a ComfyUI 0.8.0 checkout, the ``playwright`` Python package is
importable and ``/usr/bin/chromium`` (or ``SDXLCN_CHROMIUM``) exists; never a downloaded browser.
Run it (about 3 minutes on 2 CPU cores)::

    .venv/bin/pip install playwright   # the Python package only; no `playwright install`
    COMFYUI_DIR=/work/comfyui COMFYUI_PYTHON=/work/comfyui-venv/bin/python \\
        .venv/bin/python -m pytest --rootdir=tests tests/test_browser.py -v

Screenshots and the browser console go to ``test-artifacts/browser/``. The README's picture
(``docs/workflow-screenshot.png``) and the templates' thumbnails are made by ``scripts/make_screenshot.py``.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

import pytest

from comfyui_harness import PACK_FOLDER, ROOT, SKIP_REASON, comfyui_dir, running_comfyui

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent / "helpers"))
import fal_server  # noqa: E402
from fal_server import fal_test_server  # noqa: E402,F401  (one fal-protocol server per session, shared)

CHROMIUM = os.environ.get("SDXLCN_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
ARTIFACTS = ROOT / "test-artifacts" / "browser"
EXT = f"/extensions/{PACK_FOLDER}"


def _skip_reason() -> str | None:
    if comfyui_dir() is None:
        return SKIP_REASON
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright Python package is not installed (pip install playwright; no browser download needed)"
    if not Path(CHROMIUM).is_file():
        return f"no Chromium at {CHROMIUM} (apt install chromium, or set SDXLCN_CHROMIUM)"
    return None


pytestmark = pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or "")

# UI-format workflows: the shipped ones (top level, listed in ComfyUI's Templates) and the tiny-model variant.
UI_WORKFLOWS = sorted(p for d in ("workflows", "workflows/tiny") for p in (ROOT / d).glob("*.json")
                      if "nodes" in json.loads(p.read_text()))
EXAMPLE = ROOT / "workflows" / "sdxl_controlnet_img2img.json"
TINY = ROOT / "workflows" / "tiny" / "sdxl_controlnet_img2img_tiny.json"
FAL = ROOT / "workflows" / "sdxl_controlnet_img2img_fal.json"

# fal's defaults, documented in the README and the node tooltips; the example workflows keep them.
FAL_DEFAULTS = {"controlnet_conditioning_scale": 0.5, "num_inference_steps": 25, "guidance_scale": 7.5,
                "strength": 0.95, "num_images": 1, "expand_prompt": False}
FAST_CHANGES = {"num_inference_steps": 4, "guidance_scale": 1.0}
HARMLESS_CONSOLE = ("Failed to load resource", "api.comfy.org")


@pytest.fixture(scope="module")
def comfy(tmp_path_factory, tiny_models, fal_test_server):
    """ComfyUI with the pack and the tiny models; its fal client talks to the fal-protocol test server
    (configure_environment set FAL_*_HOST and SSL_CERT_FILE in this process; ComfyUI inherits them)."""
    base = tmp_path_factory.mktemp("comfyui-browser")
    models = {"diffusers": {"tiny-sdxl": tiny_models["checkpoint"]},
              "controlnet": {"tiny-controlnet-canny": tiny_models["controlnet"]}}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FAL_KEY", fal_server.TEST_KEY)
        mp.delenv("FAL_KEY_ID", raising=False)
        mp.delenv("FAL_KEY_SECRET", raising=False)
        server_cm = running_comfyui(base, models)
        server = server_cm.__enter__()
    try:
        server.fal = fal_test_server
        # the Missing Models dialog (the shipped workflows name real models this server lacks) would cover the
        # graph: tests/test_browser_missing_models.py checks it; a missing node type still shows its own dialog
        for setting, value in (("Comfy.TutorialCompleted", True), ("Comfy.Minimap.Visible", False),
                               ("Comfy.Workflow.ShowMissingModelsWarning", False)):
            status, body = server.post(f"/api/settings/{setting}", value)
            assert status == 200, (setting, status, body)
        yield server
    finally:
        server_cm.__exit__(None, None, None)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


class Page:
    """A ComfyUI tab plus everything the console and network said about it."""

    def __init__(self, page, name: str):
        self.page, self.name = page, name
        self.console: list[str] = []
        self.pack_problems: list[str] = []
        self.loaded_pack_files: set[str] = set()
        page.on("console", self._on_console)
        page.on("pageerror", self._on_page_error)
        page.on("response", self._on_response)
        page.on("requestfailed", lambda r: self._pack(r.url, f"request failed: {r.url} {r.failure}"))

    def _pack(self, where: str, message: str):
        # the pack's files as the browser names them (its extension URLs), not a folder name a path may hold anyway
        if f"{EXT}/" in (where or "") or "sdxlcn" in (where or "").lower():
            self.pack_problems.append(message)

    def _on_console(self, msg):
        url = (msg.location or {}).get("url", "")
        self.console.append(f"[{msg.type}] {msg.text} ({url})")
        if msg.type in ("error", "warning"):
            self._pack(url + " " + msg.text, f"console {msg.type}: {msg.text} ({url})")

    def _on_page_error(self, err):
        text = f"{err}\n{getattr(err, 'stack', '') or ''}"
        self.console.append(f"[pageerror] {text}")
        self._pack(text, f"uncaught: {text}")

    def _on_response(self, resp):
        if EXT + "/" in resp.url:
            if resp.status >= 400:
                self.pack_problems.append(f"HTTP {resp.status} for {resp.url}")
            else:
                self.loaded_pack_files.add(resp.url.split(EXT, 1)[1].split("?")[0])

    def eval(self, script: str, arg=None):
        return self.page.evaluate(script, arg)

    def wait(self, script: str, arg=None, timeout_s: float = 60):
        return self.page.wait_for_function(script, arg=arg, timeout=timeout_s * 1000)

    def load(self, workflow: dict):
        self.eval("async (wf) => { await window.app.loadGraphData(wf); }", workflow)
        self.fit()

    def fit(self):
        """Zoom so every node shows (the canvas's own fitToBounds over the node boxes)."""
        self.eval("""() => {
            const ns = window.app.graph.nodes; if (!ns.length) return;
            const title = window.LiteGraph.NODE_TITLE_HEIGHT;
            const x0 = Math.min(...ns.map(n => n.pos[0])), y0 = Math.min(...ns.map(n => n.pos[1] - title));
            const x1 = Math.max(...ns.map(n => n.pos[0] + n.size[0])), y1 = Math.max(...ns.map(n => n.pos[1] + n.size[1]));
            window.app.canvas.ds.fitToBounds([x0 - 20, y0 - 20, x1 - x0 + 40, y1 - y0 + 80], {zoom: 0.9});
            window.app.canvas.setDirty(true, true);
        }""")

    def screenshot(self, name: str) -> Path:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / f"{name}.png"
        self.page.wait_for_timeout(300)  # let the canvas paint the last change (a frame, not a readiness wait)
        self.page.screenshot(path=str(path))
        return path

    def node_state(self, node_type: str) -> dict:
        return self.eval("""(type) => {
            const n = window.app.graph.nodes.find(n => n.type === type);
            return n && {id: n.id, size: [...n.size],
                         widgets: n.widgets.map(w => ({name: w.name, value: w.value, hidden: !!w.hidden, label: w.label ?? null}))};
        }""", node_type)


@pytest.fixture
def page(comfy, browser, request):
    ctx = browser.new_context(viewport={"width": 1600, "height": 1000})
    tab = Page(ctx.new_page(), request.node.name)
    try:
        tab.page.goto(comfy.url)
        tab.wait("() => !!(window.app && window.app.graph && window.app.canvas && window.LiteGraph"
                 " && window.LiteGraph.registered_node_types['SDXLCNImg2Img'])", timeout_s=120)
        yield tab
    finally:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in request.node.name)
        (ARTIFACTS / f"{safe}.console.txt").write_text("\n".join(tab.console))
        ctx.close()
    assert not tab.pack_problems, "\n".join(tab.pack_problems)


def _serialized_leaks(tab: Page, known_secrets=()):
    return tab.eval("""async (secrets) => {
        const { findLeaks } = await import('%s/lib/sanitize.js');
        return findLeaks(window.app.graph.serialize(), secrets);
    }""" % EXT, list(known_secrets))


def _set_combo(tab: Page, node_id, name: str, value):
    """Choose a combo value as the canvas does when the user picks it (setValue runs the widget callback)."""
    tab.eval("""([id, name, value]) => {
        const node = window.app.graph.getNodeById(id);
        const w = node.widgets.find(w => w.name === name);
        w.setValue(value, {e: undefined, node, canvas: window.app.canvas});
    }""", [node_id, name, value])


def test_extension_files_are_served_and_loaded(comfy, page):
    listed = comfy.get("/extensions")
    ours = sorted(u for u in listed if u.startswith(EXT + "/"))
    assert f"{EXT}/sdxlcn.js" in ours, listed
    assert all(u.endswith(".js") for u in ours)
    for url in ours:
        assert url.split(EXT, 1)[1] in page.loaded_pack_files, (url, page.loaded_pack_files)


@pytest.mark.parametrize("path", UI_WORKFLOWS, ids=[p.stem for p in UI_WORKFLOWS])
def test_workflow_loads_with_defaults_and_size_widgets(comfy, page, path):
    wf = json.loads(path.read_text())
    types = sorted({n["type"] for n in wf["nodes"]})
    missing = page.eval("(types) => types.filter(t => !window.LiteGraph.registered_node_types[t])", types)
    assert not missing, f"missing node types {missing}"
    page.load(wf)
    dialogs = page.eval("""() => [...document.querySelectorAll('[role=dialog], .p-dialog')]
        .filter(d => d.offsetParent !== null).map(d => d.innerText)""")
    assert not [d for d in dialogs if "missing" in d.lower()], dialogs

    info = comfy.get("/object_info")
    for saved in wf["nodes"]:
        state = page.eval("""(id) => { const n = window.app.graph.getNodeById(id);
            return n.widgets.map(w => ({name: w.name, value: w.value, hidden: !!w.hidden, label: w.label ?? null})); }""",
                          saved["id"])
        values = {w["name"]: w["value"] for w in state}
        # the page holds exactly what the file says, in order (widgets_values follow INPUT_TYPES order)
        for i, v in enumerate(saved.get("widgets_values") or []):
            assert state[i]["value"] == v, (saved["type"], state[i]["name"], state[i]["value"], v)
        if saved["type"].startswith("SDXLCN") and saved["type"].endswith("Img2Img"):
            # the _fast example runs a few-step LoRA at its own schedule (4 steps, CFG 1): the rest stays fal's
            changed = FAST_CHANGES if path.stem.removesuffix("_tiny").endswith("_fast") else {}
            for name, default in FAL_DEFAULTS.items():
                assert values[name] == changed.get(name, default), (path.name, name, values[name])
                spec = info[saved["type"]]["input"]["required"][name]
                assert spec[1]["default"] == default, (name, spec)
            hidden = {w["name"]: w["hidden"] for w in state}
            custom = values["image_size"] == "custom"
            assert hidden["width"] == hidden["height"] == (not custom), (path.name, hidden)
            assert all(not h for n, h in hidden.items() if n not in ("width", "height")), hidden
            if not custom:
                label = next(w["label"] for w in state if w["name"] == "image_size")
                assert values["image_size"] == "none" and label == "image_size · control image size", label
        if saved["type"] == "SDXLCNCanny":
            assert values["low_threshold"] == 100 and values["high_threshold"] == 200
    page.screenshot(path.stem)

    # The saved/exported workflow has nothing of ours beyond widget values.
    assert _serialized_leaks(page) == []


def test_width_height_follow_image_size(page):
    page.load(json.loads(EXAMPLE.read_text()))
    node = page.node_state("SDXLCNImg2Img")
    by = lambda st: {w["name"]: w for w in st["widgets"]}  # noqa: E731
    start = by(node)
    assert start["image_size"]["value"] == "none" and start["width"]["hidden"] and start["height"]["hidden"]

    _set_combo(page, node["id"], "image_size", "custom")
    custom = page.node_state("SDXLCNImg2Img")
    w = by(custom)
    assert not w["width"]["hidden"] and not w["height"]["hidden"]
    assert w["image_size"]["label"] == "image_size"
    assert custom["size"][1] > node["size"][1]  # the node grew to show them
    page.screenshot("image_size_custom")

    _set_combo(page, node["id"], "image_size", "landscape_4_3")
    preset = by(page.node_state("SDXLCNImg2Img"))
    assert preset["width"]["hidden"] and preset["height"]["hidden"]
    assert preset["image_size"]["label"] == "image_size · 1024×768"
    page.screenshot("image_size_preset")

    # Hidden widgets still save their values, in place; no label or runtime state is saved.
    saved = page.eval("(id) => window.app.graph.serialize().nodes.find(n => n.id === id)", node["id"])
    names = [x["name"] for x in custom["widgets"]]
    assert saved["widgets_values"][names.index("image_size")] == "landscape_4_3"
    assert saved["widgets_values"][names.index("width")] == 1024
    assert len(saved["widgets_values"]) == len(names)
    assert not [i for i in saved.get("inputs", []) if "·" in str(i.get("label", ""))], saved["inputs"]
    assert _serialized_leaks(page) == []


def _wait_for_saved_image(page: Page, timeout_s: float):
    page.wait("""() => { const n = window.app.graph.nodes.find(n => n.type === 'SaveImage');
        return !!(n && n.imgs && n.imgs.length && n.imgs[0].complete && n.imgs[0].naturalWidth > 0); }""",
              timeout_s=timeout_s)
    return page.eval("""() => window.app.graph.nodes.filter(n => n.imgs && n.imgs.length).map(n => ({
        type: n.type, src: n.imgs[0].src, w: n.imgs[0].naturalWidth, h: n.imgs[0].naturalHeight}))""")


def test_tiny_workflow_runs_and_shows_results(comfy, page):
    page.load(json.loads(TINY.read_text()))
    page.eval("() => window.app.queuePrompt(0, 1)")
    shown = {s["type"]: s for s in _wait_for_saved_image(page, timeout_s=400)}
    assert "type=output" in shown["SaveImage"]["src"] and (shown["SaveImage"]["w"], shown["SaveImage"]["h"]) == (64, 64)
    # The Canny node shows its edge map (ComfyUI's preview of the node's ui output), no Preview node needed.
    page.wait("""() => { const n = window.app.graph.nodes.find(n => n.type === 'SDXLCNCanny');
        return !!(n.imgs && n.imgs.length && n.imgs[0].complete && n.imgs[0].naturalWidth > 0); }""", timeout_s=30)
    canny = page.eval("""() => { const i = window.app.graph.nodes.find(n => n.type === 'SDXLCNCanny').imgs[0];
        return {src: i.src, w: i.naturalWidth, h: i.naturalHeight}; }""")
    assert "type=temp" in canny["src"] and "sdxlcn_canny_" in canny["src"] and canny["w"] == 512
    page.fit()
    page.screenshot("tiny_workflow_after_run")
    assert _serialized_leaks(page) == []


@pytest.mark.skipif(not FAL.is_file(), reason="no fal example workflow yet")
def test_fal_status_shows_on_the_node_and_clears(comfy, page):
    comfy.fal.reset(queue_s=3.0, queue_ahead=3, run_s=3.0, logs=["loading model", "step 1/2", "step 2/2"])
    page.load(json.loads(FAL.read_text()))
    fal_id = page.node_state("SDXLCNFalImg2Img")["id"]
    page.eval("""async (id) => {
        const mod = await import('%s/sdxlcn.js');
        window.__sdxlcnSeen = [];
        window.app.api.addEventListener('sdxlcn.fal_status', (e) =>
            window.__sdxlcnSeen.push({detail: e.detail, lines: mod.falStatus.lines(id)}));
        window.__sdxlcnLines = () => mod.falStatus.lines(id);
    }""" % EXT, fal_id)
    page.eval("() => window.app.queuePrompt(0, 1)")
    page.wait("() => window.__sdxlcnLines().some(l => l.includes('queue position'))", timeout_s=60)
    page.screenshot("fal_status_in_queue")
    page.wait("() => window.__sdxlcnLines().length === 2", timeout_s=60)  # running, with the last log line
    page.screenshot("fal_status_running")
    shown = {s["type"]: s for s in _wait_for_saved_image(page, timeout_s=120)}
    assert "type=output" in shown["SaveImage"]["src"]
    page.wait("() => window.__sdxlcnLines().length === 0", timeout_s=10)  # cleared when it finished

    seen = page.eval("() => window.__sdxlcnSeen")
    states = [s["detail"]["state"] for s in seen]
    assert "IN_QUEUE" in states and "IN_PROGRESS" in states and states[-1] == "COMPLETED", states
    queued = next(s for s in seen if s["detail"]["state"] == "IN_QUEUE")
    assert str(queued["detail"]["node"]) == str(fal_id)
    assert queued["lines"][0].startswith("fal: in queue · queue position ")
    logs = [s["lines"] for s in seen if s["detail"]["state"] == "IN_PROGRESS" and len(s["lines"]) == 2]
    assert logs and logs[-1][1] in ("loading model", "step 1/2", "step 2/2"), seen
    assert seen[-1]["lines"] == []
    page.screenshot("fal_after_run")
    assert _serialized_leaks(page, [fal_server.TEST_KEY, "test-secret-not-real"]) == []
    with contextlib.suppress(Exception):
        page.eval("() => { delete window.__sdxlcnSeen; delete window.__sdxlcnLines; }")


# ---- the newer Vue node renderer (a frontend setting): the same behaviour, read from the DOM ------------------------

@pytest.fixture
def vue_page(comfy, browser, request):
    status, body = comfy.post("/api/settings/Comfy.VueNodes.Enabled", True)
    assert status == 200, body
    try:
        ctx = browser.new_context(viewport={"width": 1600, "height": 1000})
        tab = Page(ctx.new_page(), request.node.name)
        try:
            tab.page.goto(comfy.url)
            tab.wait("() => !!(window.app && window.app.graph && window.LiteGraph"
                     " && window.LiteGraph.registered_node_types['SDXLCNImg2Img'])", timeout_s=120)
            assert tab.eval("() => window.app.extensionManager.setting.get('Comfy.VueNodes.Enabled')") is True
            yield tab
        finally:
            ctx.close()
        assert not tab.pack_problems, "\n".join(tab.pack_problems)
    finally:
        comfy.post("/api/settings/Comfy.VueNodes.Enabled", False)


def _vue_rows(tab: Page, node_type: str) -> list[str]:
    """The text rows of a node as the Vue renderer draws it (its DOM element, data-node-id)."""
    tab.wait("(t) => { const n = window.app.graph.nodes.find(n => n.type === t);"
             " return !!(n && document.querySelector(`[data-node-id=\"${n.id}\"]`)); }", node_type, timeout_s=30)
    return tab.eval("""(t) => { const n = window.app.graph.nodes.find(n => n.type === t);
        return document.querySelector(`[data-node-id="${n.id}"]`).innerText.split('\\n'); }""", node_type)


def test_vue_renderer_shows_width_height_only_for_custom(vue_page):
    vue_page.load(json.loads(EXAMPLE.read_text()))
    rows = _vue_rows(vue_page, "SDXLCNImg2Img")
    assert "image_size · control image size" in rows and "width" not in rows and "height" not in rows, rows
    node_id = vue_page.node_state("SDXLCNImg2Img")["id"]
    _set_combo(vue_page, node_id, "image_size", "custom")
    vue_page.wait("(id) => document.querySelector(`[data-node-id=\"${id}\"]`).innerText.split('\\n')"
                  ".includes('width')", node_id, timeout_s=10)
    rows = _vue_rows(vue_page, "SDXLCNImg2Img")
    assert "width" in rows and "height" in rows, rows
    vue_page.screenshot("vue_image_size_custom")
    _set_combo(vue_page, node_id, "image_size", "landscape_4_3")
    vue_page.wait("(id) => !document.querySelector(`[data-node-id=\"${id}\"]`).innerText.split('\\n')"
                  ".includes('width')", node_id, timeout_s=10)
    saved = vue_page.eval("(id) => window.app.graph.serialize().nodes.find(n => n.id === id)", node_id)
    assert "landscape_4_3" in saved["widgets_values"] and 1024 in saved["widgets_values"]
    assert _serialized_leaks(vue_page) == []


@pytest.mark.skipif(not FAL.is_file(), reason="no fal example workflow yet")
def test_vue_renderer_shows_the_fal_status_under_the_node(comfy, vue_page):
    comfy.fal.reset(queue_s=3.0, queue_ahead=3, run_s=3.0, logs=["loading model", "step 1/2", "step 2/2"])
    vue_page.load(json.loads(FAL.read_text()))
    fal_id = vue_page.node_state("SDXLCNFalImg2Img")["id"]
    # another seed than the classic-renderer test's run, so ComfyUI does not answer from its cache
    vue_page.eval("(id) => { window.app.graph.getNodeById(id).widgets.find(w => w.name === 'seed').value = 4242; }", fal_id)
    box = f'[data-node-id="{fal_id}"] > .sdxlcn-fal-status'
    vue_page.eval("() => window.app.queuePrompt(0, 1)")
    vue_page.wait("(sel) => { const b = document.querySelector(sel); return !!(b && b.innerText.includes('queue position')); }",
                  box, timeout_s=60)
    vue_page.screenshot("vue_fal_status_in_queue")
    vue_page.wait("(sel) => !document.querySelector(sel)", box, timeout_s=120)  # cleared when it finished
    vue_page.wait("async () => Object.values(await (await fetch('/api/history')).json())"
                  ".some(e => e.prompt[2] && Object.values(e.prompt[2]).some(n => n.class_type === 'SDXLCNFalImg2Img'))",
                  timeout_s=120)
    entry = vue_page.eval("""async () => Object.values(await (await fetch('/api/history')).json())
        .find(e => Object.values(e.prompt[2]).some(n => n.class_type === 'SDXLCNFalImg2Img'))""")
    assert entry["status"]["status_str"] == "success" and any("images" in o for o in entry["outputs"].values())
    assert _serialized_leaks(vue_page, [fal_server.TEST_KEY, "test-secret-not-real"]) == []
