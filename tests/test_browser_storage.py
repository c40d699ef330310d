"""A web page on another origin, in Debian's Chromium (Playwright), picks a file with a file input and hands it to fal's
own JS client (@fal-ai/client from tests/js/node_modules, loaded unbundled by a small CommonJS loader): the client
uploads it to `serve` through ``proxyUrl`` (fal.storage.upload: the initiate call with ``x-fal-target-url``, then the
PUT to the upload URL, both cross-origin: CORS preflights included), and a ``subscribe`` whose ``image_url`` is the
picked ``File`` (auto-upload) gives the pixels of the same request with the file as a data URI.

Skipped unless the ``playwright`` package, ``/usr/bin/chromium`` (or ``SDXLCN_CHROMIUM``) and tests/js/node_modules
(``npm ci --prefix tests/js``) are there.
"""

from __future__ import annotations

import dataclasses
import io
import json
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from comfyui_harness import ROOT
from pictures import make_test_image
from test_browser import CHROMIUM, CHROMIUM_ARGS
from test_serve import APP, KEY, call, data_uri, start

MODULES = ROOT / "tests" / "js" / "node_modules"


def _skip_reason() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright Python package is not installed (pip install playwright; no browser download needed)"
    if not Path(CHROMIUM).is_file():
        return f"no Chromium at {CHROMIUM} (apt install chromium, or set SDXLCN_CHROMIUM)"
    if not (MODULES / "@fal-ai" / "client" / "package.json").is_file():
        return "@fal-ai/client is not installed: run 'npm ci --prefix tests/js' (scripts/test.sh does)"
    return None


pytestmark = pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or "")

# the page: CommonJS modules fetched from /require (resolved as Node resolves them), fal's client configured as a
# browser app is (a plain proxyUrl string proxies in a browser), and a file input whose pick runs both requests
PAGE = """<!doctype html><meta charset="utf-8"><title>pick a file</title>
<input type="file" id="pick" accept="image/*">
<script>
const cache = {};
function load(from, spec) {
  const xhr = new XMLHttpRequest();
  xhr.open("GET", "/require?" + new URLSearchParams({ from, spec }), false);
  xhr.send();
  if (xhr.status !== 200) throw new Error(`require(${spec}) from ${from}: ${xhr.responseText}`);
  const { path, source } = JSON.parse(xhr.responseText);
  if (cache[path]) return cache[path].exports;
  const module = { exports: {} };
  cache[path] = module;
  if (path.endsWith(".json")) { module.exports = JSON.parse(source); return module.exports; }
  const dir = path.slice(0, path.lastIndexOf("/"));
  new Function("exports", "require", "module", source + "\\n//# sourceURL=" + path)(
    module.exports, (s) => load(dir, s), module);
  return module.exports;
}
const { fal } = load("", "@fal-ai/client");
const SETTINGS = %(settings)s;
fal.config({ credentials: SETTINGS.key, proxyUrl: SETTINGS.server + "/proxy", suppressLocalCredentialsWarning: true });
const asDataUri = (file) => new Promise((resolve) => {
  const reader = new FileReader(); reader.onload = () => resolve(reader.result); reader.readAsDataURL(file);
});
document.getElementById("pick").addEventListener("change", async (event) => {
  const file = event.target.files[0];
  try {
    const uploaded = await fal.storage.upload(file);
    const viaFile = await fal.subscribe(SETTINGS.app,
      { input: { ...SETTINGS.input, image_url: file }, pollInterval: 100 });
    const viaData = await fal.subscribe(SETTINGS.app,
      { input: { ...SETTINGS.input, image_url: await asDataUri(file) }, pollInterval: 100 });
    window.outcome = { uploaded, viaFile: viaFile.data.images[0].url, viaData: viaData.data.images[0].url };
  } catch (err) {
    window.outcome = { error: `${err.message} ${JSON.stringify(err.body || null)}` };
  }
});
</script>"""


def resolve(start_dir: str, spec: str) -> Path:
    """Node's resolution of ``require(spec)`` from the module folder ``start_dir`` (a path under node_modules)."""
    if spec.startswith("."):
        base = (MODULES / start_dir.lstrip("/") / spec).resolve()
    else:
        parts = spec.split("/")
        name, rest = ("/".join(parts[:2]), parts[2:]) if spec.startswith("@") else (parts[0], parts[1:])
        base = MODULES / name
        if not rest:
            meta = json.loads((base / "package.json").read_text())
            entry = (meta.get("exports") or {}).get(".") if isinstance(meta.get("exports"), dict) else None
            entry = entry.get("require") or entry.get("default") if isinstance(entry, dict) else entry
            base = (base / (entry or meta.get("main") or "index.js")).resolve()
        else:
            base = base.joinpath(*rest)
    for candidate in (base, Path(f"{base}.js"), Path(f"{base}.cjs"), Path(f"{base}.json"), base / "index.js"):
        if candidate.is_file() and MODULES.resolve() in candidate.resolve().parents:
            return candidate.resolve()
    raise FileNotFoundError(spec)


def page_server(settings: dict) -> ThreadingHTTPServer:
    page = (PAGE % {"settings": json.dumps(settings)}).encode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            url = urllib.parse.urlsplit(self.path)
            if url.path == "/":
                return self._send(200, page, "text/html")
            if url.path == "/require":
                q = dict(urllib.parse.parse_qsl(url.query, keep_blank_values=True))
                try:
                    path = resolve(q["from"], q["spec"])
                except (FileNotFoundError, KeyError) as exc:
                    return self._send(404, str(exc).encode(), "text/plain")
                shown = "/" + str(path.relative_to(MODULES.resolve()))
                body = json.dumps({"path": shown, "source": path.read_text()}).encode()
                return self._send(200, body, "application/json")
            return self._send(404, b"", "text/plain")

        def _send(self, code, body, kind):
            self.send_response(code)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd


def test_a_picked_file_is_uploaded_by_fals_client_and_runs_as_its_data_uri_does(tmp_path, tiny_pipe):
    from playwright.sync_api import sync_playwright

    server = start(tmp_path, pipe=tiny_pipe)
    picked = tmp_path / "picked.png"
    make_test_image(64, 64, 1).save(picked)
    settings = {"key": KEY, "server": server.url, "app": APP, "input": {
        "prompt": "a red fortress", "control_image_url": data_uri(make_test_image(64, 64, 2)),
        "num_inference_steps": 2, "strength": 1.0, "seed": 7, "guidance_scale": 1.0}}
    pages = page_server(settings)
    origin = f"http://127.0.0.1:{pages.server_address[1]}"
    server.app.access = dataclasses.replace(server.app.access, cors_origins=frozenset({origin}))  # --cors-origin
    console: list[str] = []
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
            try:
                page = browser.new_page()
                page.on("console", lambda msg: console.append(f"[{msg.type}] {msg.text}"))
                page.on("pageerror", lambda err: console.append(f"[pageerror] {err}"))
                page.goto(origin + "/")
                page.set_input_files("#pick", str(picked))
                page.wait_for_function("window.outcome !== undefined", timeout=180_000)
                outcome = page.evaluate("window.outcome")
            finally:
                browser.close()
        assert "error" not in outcome, (outcome, console)
        assert outcome["uploaded"].startswith(f"{server.url}/storage/files/"), outcome
        code, stored, headers = call("GET", outcome["uploaded"], key=None, raw=True)
        assert code == 200 and stored == picked.read_bytes() and headers["Content-Type"] == "image/png"
        got = {k: np.asarray(Image.open(io.BytesIO(call("GET", outcome[k], key=None, raw=True)[1])).convert("RGB"))
               for k in ("viaFile", "viaData")}
        assert got["viaFile"].shape == (64, 64, 3) and np.array_equal(got["viaFile"], got["viaData"])
    finally:
        pages.shutdown()
        server.stop_all()
