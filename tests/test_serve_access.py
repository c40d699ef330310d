"""No web page can use the endpoint (issue 31, item 4), and the URLs it answers keep the scheme the client used
(item 5): a real server on 127.0.0.1, plain HTTP clients sending the headers browsers and proxies send, and real
Chromium (Playwright) on a page from a second loopback origin, as the browser case of the issue was found.

- No key: no CORS headers at all; a Host that is not a loopback name (DNS rebinding), an Origin other than the
  server's own, Sec-Fetch-Site cross-site/same-site and X-Forwarded-* are refused with 403, nothing queued.
- A key: CORS only for the origins the operator listed (``--cors-origin``).
- Behind a TLS-terminating proxy the status/result URLs are https when the proxy is listed (``--trusted-proxy``),
  and a client's own X-Forwarded-Proto is ignored otherwise.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from loopback import Loopback, Quiet
from test_serve import APP, KEY, call, fal_input
from test_serve_http import Running

ZERO = "00000000-0000-0000-0000-000000000000"


def cors_headers(headers: dict) -> list:
    return [h for h in headers if h.lower().startswith("access-control-")]


def test_without_a_key_only_this_machines_programs_are_answered(tmp_path):
    with Running(tmp_path, key=None) as srv:
        submit = f"{srv.url}/{APP}"
        code, body, headers = call("POST", submit, fal_input(), key=None)  # a program here: no Origin, loopback Host
        assert code == 200 and not cors_headers(headers), headers
        assert srv.store.waiting() == 1
        code, _b, headers = call("GET", f"{srv.url}/{APP}/requests/{ZERO}/status", key=None,
                                 headers={"Host": f"localhost:{srv.port}"})
        assert code == 404 and not cors_headers(headers)
        same = {"Origin": srv.url}  # the server's own origin (it serves no page, but that one is not another site)
        assert call("GET", f"{srv.url}/{APP}/requests/{ZERO}/status", key=None, headers=same)[0] == 404
        for name, headers in (
                ("a page on another loopback port", {"Origin": "http://127.0.0.1:9"}),
                ("a page on another site", {"Origin": "https://evil.example"}),
                ("an opaque origin", {"Origin": "null"}),
                ("DNS rebinding", {"Host": f"rebind.evil.example:{srv.port}"}),
                ("a no-cors request from a page", {"Sec-Fetch-Site": "same-site"}),
                ("through a proxy", {"X-Forwarded-For": "203.0.113.9"}),
                ("through a proxy (RFC 7239)", {"Forwarded": "for=203.0.113.9"})):
            code, body, got = call("POST", submit, fal_input(), key=None,
                                   headers={"Content-Type": "text/plain", **headers})
            assert code == 403 and not cors_headers(got), (name, code, body, got)
            assert "key" in body["detail"], body
            code, _b, got = call("OPTIONS", submit, key=None, headers=headers)
            assert code == 403 and not cors_headers(got), (name, code, got)
        assert srv.store.waiting() == 1  # none of them was queued


def test_with_a_key_cors_only_for_the_listed_origins(tmp_path):
    page = "https://app.example:8080"
    with Running(tmp_path, key=KEY, app={"cors_origins": {page}}) as srv:
        preflight = {"Origin": page, "Access-Control-Request-Method": "POST",
                     "Access-Control-Request-Headers": "authorization,content-type,x-fal-target-url"}
        code, _b, headers = call("OPTIONS", f"{srv.url}/proxy", key=None, headers=preflight)
        assert code == 204 and headers["Access-Control-Allow-Origin"] == page, headers
        allowed = {h.strip() for h in headers["Access-Control-Allow-Headers"].split(",")}
        assert {"authorization", "content-type", "x-fal-target-url"} <= allowed
        code, _b, headers = call("GET", f"{srv.url}/{APP}/requests/{ZERO}/status", headers={"Origin": page})
        assert code == 404 and headers["Access-Control-Allow-Origin"] == page
        assert "x-fal-request-id" in headers["Access-Control-Expose-Headers"]
        for other in ("https://evil.example", "https://app.example:8081", "null"):
            code, _b, headers = call("OPTIONS", f"{srv.url}/proxy", key=None, headers={**preflight, "Origin": other})
            assert code == 403 and not cors_headers(headers), (other, headers)
            code, _b, headers = call("GET", f"{srv.url}/{APP}/requests/{ZERO}/status", headers={"Origin": other})
            assert code == 404 and not cors_headers(headers), (other, headers)
    with Running(tmp_path / "nolist", key=KEY) as srv:  # no origin listed: none
        code, _b, headers = call("GET", f"{srv.url}/{APP}/requests/{ZERO}/status", headers={"Origin": page})
        assert code == 404 and not cors_headers(headers)


def test_cors_origins_are_checked_when_given():
    from sdxl_controlnet_img2img.pipeline.errors import SDXLCNError
    from sdxl_controlnet_img2img.pipeline.serve.access import parse_origins

    assert parse_origins(["https://App.example:8080/", "http://127.0.0.1:3000"], "--cors-origin") == {
        "https://app.example:8080", "http://127.0.0.1:3000"}
    for bad in ("*", "app.example", "https://app.example/page", "ftp://app.example"):
        with pytest.raises(SDXLCNError, match="--cors-origin"):
            parse_origins([bad], "--cors-origin")


PAGE = """<!doctype html><title>elsewhere</title><script>
window.attempt = async (url, body) => {
  const out = {};
  try {
    const r = await fetch(url, {method: "POST", body, headers: {"Content-Type": "text/plain"}});
    out.read = await r.text();
  } catch (e) { out.error = String(e); }
  try { await fetch(url, {method: "POST", body, mode: "no-cors"}); out.sent = true; } catch (e) { out.sent = false; }
  return out;
};
</script>"""


def chromium_reason() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright Python package is not installed"
    path = os.environ.get("SDXLCN_CHROMIUM", "/usr/bin/chromium")
    return None if Path(path).is_file() else f"no Chromium at {path}"


@pytest.mark.skipif(chromium_reason() is not None, reason=chromium_reason() or "")
def test_a_page_on_another_loopback_origin_cannot_use_a_keyless_server(tmp_path):
    """Real Chromium opens a page served from 127.0.0.1 on another port, which POSTs a submit to the key-less server
    (a 'simple' request: no preflight) and tries to read the answer: nothing is queued and nothing is read."""
    from playwright.sync_api import sync_playwright

    from test_browser import CHROMIUM, CHROMIUM_ARGS

    class Page(Quiet):
        def do_GET(self):
            data = PAGE.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    site = Loopback(Page)
    try:
        with Running(tmp_path, key=None) as srv, sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page()
                page.goto(f"{site.url}/")
                out = page.evaluate("([u, b]) => window.attempt(u, b)", [f"{srv.url}/{APP}", json.dumps(fal_input())])
            finally:
                browser.close()
            assert "read" not in out and "error" in out, out  # the browser kept the answer from the page
            assert srv.store.waiting() == 0, "a page on another origin queued a request"
    finally:
        site.close()


PROXY_HEADERS = {"Via": "1.1 proxy.example (nginx)", "X-Forwarded-Server": "proxy.example",
                 "X-Client-IP": "203.0.113.9", "True-Client-IP": "203.0.113.9", "CF-Connecting-IP": "203.0.113.9",
                 "X-Real-IP": "203.0.113.9", "Forwarded": "for=203.0.113.9;proto=https",
                 "X-Forwarded-Ssl": "on", "X-Original-Forwarded-For": "203.0.113.9"}


@pytest.mark.parametrize("header", list(PROXY_HEADERS))
def test_any_header_a_proxy_adds_is_refused_by_a_keyless_server(tmp_path, header):
    """The headers proxies, load balancers and CDNs add (RFC 9110 Via, RFC 7239 Forwarded, nginx's X-Real-IP,
    Apache's X-Forwarded-Server, Akamai's True-Client-IP, Cloudflare's CF-Connecting-IP, ...): each means others
    reach the key-less server through a proxy, so it answers 403 naming the header and the key (only X-Forwarded-For,
    -Host, -Proto, -Port, -Prefix, X-Real-IP and Forwarded were refused); a keyed server takes the same request."""
    extra = {header: PROXY_HEADERS[header]}
    with Running(tmp_path / "nokey", key=None) as srv:
        code, body, got = call("POST", f"{srv.url}/{APP}", fal_input(), key=None, headers=extra)
        assert code == 403 and header.lower() in body["detail"] and "key" in body["detail"], (code, body)
        assert srv.store.waiting() == 0
    with Running(tmp_path / "keyed", key=KEY) as srv:
        assert call("POST", f"{srv.url}/{APP}", fal_input(), headers=extra)[0] == 200
